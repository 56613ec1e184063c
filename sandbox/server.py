"""Running the sandbox: a threaded werkzeug server plus the pickup cadence, started and
stopped as one.

:class:`SandboxServer` is what tests, the demo and ``otacm sandbox`` use::

    with SandboxServer(SandboxConfig(pickup_interval=0)) as sandbox:
        client = httpx.Client(base_url=sandbox.base_url,
                              headers={"x-np-api-key": sandbox.api_key})
        ...
        sandbox.tick()          # one pickup cycle, in-process (or POST /_sandbox/tick)

It binds ``127.0.0.1`` on a free port by default (``.url`` says which), owns its
:class:`~sandbox.runtime.SandboxRuntime` unless given one, and on stop shuts the server,
the pickup thread and the runtime (webhook thread, store) down in that order.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from werkzeug.serving import BaseWSGIServer, make_server

from sandbox.app import create_sandbox_app
from sandbox.config import SandboxConfig
from sandbox.pipeline import CycleReport
from sandbox.runtime import SandboxRuntime
from sandbox.state import Clock

logger = logging.getLogger(__name__)


class SandboxServer:
    """The sandbox on a real HTTP port, with its pickup cadence; a context manager.

    Args:
        config: the venue to simulate (defaults when omitted); ignored if ``runtime`` is
            given.
        host: the interface to bind.
        port: the port; 0 picks a free one.
        clock: the runtime's time source (a real-time clock when omitted).
        runtime: serve this runtime instead of building one; the caller keeps it and
            closes it.
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
        runtime: SandboxRuntime | None = None,
    ) -> None:
        self._owns_runtime = runtime is None
        self.runtime = runtime or SandboxRuntime(config or SandboxConfig(), clock=clock)
        self._host = host
        self._port = port
        self._server: BaseWSGIServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def config(self) -> SandboxConfig:
        """The configuration being served."""
        return self.runtime.config

    @property
    def url(self) -> str:
        """The server's root, e.g. ``http://127.0.0.1:54321`` (``/_sandbox/`` is below it)."""
        if self._server is None:
            raise RuntimeError("the sandbox server is not running")
        host = str(self._server.host)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self._server.server_port}"

    @property
    def base_url(self) -> str:
        """The venue's API base: ``{url}/{tenant}/{environment}/{company}``, the company in
        the one form the sandbox answers (``company_path_form``)."""
        config = self.config
        return f"{self.url}/{config.tenant}/{config.environment}/{config.company_path}"

    @property
    def api_key(self) -> str:
        """The API key the sandbox accepts."""
        return self.config.api_key.get_secret_value()

    def tick(self) -> CycleReport:
        """Run one pickup cycle now, in this thread."""
        return self.runtime.pipeline.run_cycle()

    def start(self) -> SandboxServer:
        """Bind, serve on a thread, and start the pickup cadence (unless it is 0).

        Raises:
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("the sandbox server is already running")
        app = create_sandbox_app(runtime=self.runtime)
        try:
            self._server = make_server(self._host, self._port, app, threaded=True)
        except BaseException:
            if self._owns_runtime:
                self.runtime.close()
            raise
        self._stopping.clear()
        serving = threading.Thread(
            target=self._server.serve_forever,
            # A short poll keeps stop() quick; shutdown waits for the poll loop to notice.
            kwargs={"poll_interval": 0.05},
            name="sandbox-http",
            daemon=True,
        )
        self._threads = [serving]
        if self.config.pickup_interval > 0:
            self._threads.append(
                threading.Thread(target=self._pickup, name="sandbox-pickup", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        logger.info("sandbox listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and picking up, then close the runtime if this server owns it."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
        for thread in self._threads:
            thread.join()
        self._threads = []
        if self._server is not None:
            self._server.server_close()
            self._server = None
        if self._owns_runtime:
            self.runtime.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _pickup(self) -> None:
        interval = self.config.pickup_interval
        while not self._stopping.wait(interval):
            try:
                self.runtime.pipeline.run_cycle()
            except Exception:
                # The cadence must survive one bad cycle, as the venue's job queue does.
                logger.exception("pickup cycle failed")
