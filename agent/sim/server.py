"""Serve a SIMULATED engine with uvicorn, with vLLM's SIGTERM/SIGINT behaviour:

- shutdown timeout 0 (vLLM's default): stop accepting, abort everything in flight (streams end with
  `finish_reason: "abort"`, non-streaming answers 200 with truncated text), exit 0;
- shutdown timeout N: stop accepting, let in-flight requests finish for up to N s, abort the rest,
  exit 0.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from agent.sim.app import build_app
from agent.sim.engine import SimEngine

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Beyond the engine's own deadline, how long uvicorn waits for responses to be written out.
GRACE_AFTER_ABORT_S = 5.0


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    shutdown_timeout_s: float = 0.0
    log_level: str = "warning"
    allow_faults: bool = False
    api_keys: tuple[str, ...] = ()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (it re-raises the signal after shutdown, which would
    turn a clean exit into death by SIGTERM); ours is installed on the loop instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Shutdown:
    def __init__(self, engine: SimEngine, server: _Server, timeout_s: float) -> None:
        self.engine = engine
        self.server = server
        self.timeout_s = timeout_s
        self.signals = 0

    def on_signal(self, sig: signal.Signals) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("simulated engine %s: second %s, exiting now", self.engine.config.name, sig.name)
            self.engine.abort_all("forced shutdown")
            self.server.force_exit = True
            self.server.should_exit = True
            return
        if self.timeout_s <= 0:
            n = self.engine.abort_all("shutdown")
            log.warning(
                "simulated engine %s: %s, aborted %d request(s) in flight", self.engine.config.name, sig.name, n
            )
        else:
            self.engine.begin_shutdown()
            log.warning(
                "simulated engine %s: %s, draining %d request(s) for up to %.1f s",
                self.engine.config.name,
                sig.name,
                self.engine.in_flight,
                self.timeout_s,
            )
            asyncio.get_running_loop().call_later(self.timeout_s, self._deadline)
        self.server.should_exit = True

    def _deadline(self) -> None:
        n = self.engine.abort_all("shutdown timeout")
        if n:
            log.warning(
                "simulated engine %s: shutdown timeout reached, aborted %d request(s)", self.engine.config.name, n
            )


async def serve(engine: SimEngine, options: ServeOptions) -> int:
    """Run until a signal has shut the engine down; returns the process exit code."""
    config = uvicorn.Config(
        build_app(engine, allow_faults=options.allow_faults, api_keys=options.api_keys),
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        lifespan="off",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(options.shutdown_timeout_s + GRACE_AFTER_ABORT_S + 1),
    )
    server = _Server(config)
    shutdown = _Shutdown(engine, server, options.shutdown_timeout_s)
    loop = asyncio.get_running_loop()
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, shutdown.on_signal, sig)
    try:
        await server.serve()
    finally:
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)
    if not server.started:
        log.error("simulated engine %s: could not listen on %s:%d", engine.config.name, options.host, options.port)
        return 1
    return 0
