"""Running an app under uvicorn with a bounded, graceful shutdown.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the open ones; we also
refuse new requests (503) and, `shutdown_timeout` seconds later, stop what still runs, so every
stream ends with a final event and the process exits 0 instead of waiting on long generations.
"""

from __future__ import annotations

import logging
import signal

import uvicorn
from fastapi import FastAPI


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float):
        super().__init__(config)
        self.app, self.shutdown_timeout = app, shutdown_timeout

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:  # the first signal starts the drain; a second one forces the exit
            self.app.state.serving.worker.drain(self.shutdown_timeout)
        super().handle_exit(sig, frame)


def serve(app: FastAPI, *, host: str, port: int, shutdown_timeout: float = 10.0, log_level: str = "warning") -> None:
    """log_level "info" adds one line per request (mistral7b.access) to the warnings and errors."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Past our deadline, requests end within a step; uvicorn's own bound is only a backstop. Our
    # access log replaces uvicorn's (it has the tokens and the request id).
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout + 5)
    # After its graceful shutdown uvicorn raises the signal again under the previous handler; with
    # the default one SIGTERM would kill the process (status 143) when it is done and should exit 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        _DrainingServer(config, app, shutdown_timeout).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
