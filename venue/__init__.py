"""The venue's OTA Channel Manager API, as the partner sees it: wire models and the client.

Everything that crosses the wire to or from the venue is parsed here, at this boundary,
and nowhere else: into the pydantic models of :mod:`venue.models` (orders, summaries,
requests), :mod:`venue.webhooks` (the webhook's body) and the value types of
:mod:`venue.values` (GUIDs, blank texts, references, row versions).
"""
