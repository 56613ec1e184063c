"""The venue's OTA Channel Manager API, as the partner sees it: wire models and the client.

Everything that crosses the wire to or from the venue is parsed into the pydantic models
of :mod:`venue.models` here, at this boundary, and nowhere else.
"""
