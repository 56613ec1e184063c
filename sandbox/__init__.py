"""A faithful simulation of the venue's OTA Channel Manager API, served over real HTTP.

Same paths, states, cadence, webhook envelope and errors as the venue (``spec/API.md``),
plus fault injection, call counters and a clock tests can advance, so otacm's client,
receiver and poller run and are tested with no venue account. Start it with
:class:`sandbox.server.SandboxServer` (tests, the demo) or ``otacm sandbox``
(:mod:`sandbox.cli`); importing this package starts nothing.
"""

from sandbox.app import create_sandbox_app
from sandbox.config import Partner, SandboxConfig
from sandbox.faults import Faults
from sandbox.server import SandboxServer

__all__ = ["Faults", "Partner", "SandboxConfig", "SandboxServer", "create_sandbox_app"]
