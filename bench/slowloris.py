"""Slow clients for the slowloris drill: N connections to an HTTP server that never finish their
request. Half trickle the request headers (one header line every interval), half send complete
headers announcing a large JSON body and trickle the body (one byte every interval). Each stops
when the server answers or closes its connection; what the server did, and when, is counted.

    python -m bench.slowloris --address 127.0.0.1:8080 --connections 1000 --out slow.json

Runs until SIGTERM/SIGINT (or --seconds), then writes the counts as JSON to --out. Used by
`ernie-mesh drill slowloris` as a separate process, so that its thousand sockets and their timers
do not share the load generator's interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.keys import AUTH

KINDS = ("headers", "body")
PATH = "/v1/chat/completions"
BODY_BYTES = 1_000_000  # announced, never sent
CONNECT_TIMEOUT_S = 10.0
OPEN_RATE_PER_S = 1000.0


@dataclass
class KindStats:
    opened: int = 0
    connect_failed: int = 0
    closed_by_server: list[float] = field(default_factory=list)  # seconds from connect to close
    answers: dict[str, int] = field(default_factory=dict)  # status line -> count (before the close)
    open_at_end: int = 0
    bytes_trickled: int = 0

    def to_json(self) -> dict[str, Any]:
        closed = sorted(self.closed_by_server)
        return {
            "opened": self.opened,
            "connect_failed": self.connect_failed,
            "closed_by_server": len(closed),
            "closed_after_s_min": round(closed[0], 2) if closed else None,
            "closed_after_s_median": round(closed[len(closed) // 2], 2) if closed else None,
            "closed_after_s_max": round(closed[-1], 2) if closed else None,
            "answers": dict(sorted(self.answers.items())),
            "open_at_end": self.open_at_end,
            "bytes_trickled": self.bytes_trickled,
        }


def _start(kind: str, host: str) -> bytes:
    # with the benchmarks' API key: a client the gateway admits, only slow (bench/keys.py)
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: slowloris-drill\r\n"
        f"Authorization: {AUTH['Authorization']}\r\n"
    )
    if kind == "headers":
        return head.encode()
    return (head + f"Content-Type: application/json\r\nContent-Length: {BODY_BYTES}\r\n\r\n{{").encode()


def _chunk(kind: str, n: int) -> bytes:
    return f"X-Slow-{n}: {n}\r\n".encode() if kind == "headers" else b" "


async def slow_client(
    kind: str, host: str, port: int, interval_s: float, stats: KindStats, stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError):
        stats.connect_failed += 1
        return
    t0 = loop.time()
    stats.opened += 1
    read = asyncio.ensure_future(reader.read(4096))
    stopping = asyncio.ensure_future(stop.wait())
    closed = False
    try:
        writer.write(_start(kind, host))
        n = 0
        await asyncio.sleep(random.uniform(0, interval_s))  # spread the trickle over the interval
        while True:
            done, _ = await asyncio.wait({read, stopping}, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                data = b""
                try:
                    data = read.result()
                except OSError:
                    pass
                if data:
                    line = data.split(b"\r\n", 1)[0].decode(errors="replace")[:60]
                    stats.answers[line] = stats.answers.get(line, 0) + 1
                closed = True
                break
            if stopping in done:
                break
            try:
                writer.write(_chunk(kind, n))
                await writer.drain()
            except OSError:
                closed = True
                break
            stats.bytes_trickled += len(_chunk(kind, n))
            n += 1
    finally:
        if closed:
            stats.closed_by_server.append(loop.time() - t0)
        else:
            stats.open_at_end += 1
        read.cancel()
        stopping.cancel()
        writer.close()


async def run(host: str, port: int, connections: int, interval_s: float, seconds: float | None) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if seconds is not None:
        loop.call_later(seconds, stop.set)
    stats = {k: KindStats() for k in KINDS}
    started = time.time()
    tasks = []
    for i in range(connections):
        if stop.is_set():
            break
        kind = KINDS[i % len(KINDS)]
        tasks.append(asyncio.create_task(slow_client(kind, host, port, interval_s, stats[kind], stop)))
        await asyncio.sleep(1.0 / OPEN_RATE_PER_S)
    opened_in_s = time.time() - started
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "connections": connections,
        "interval_s": interval_s,
        "opened_in_s": round(opened_in_s, 2),
        "ran_s": round(time.time() - started, 1),
        **{k: v.to_json() for k, v in stats.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.slowloris", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="host:port of the server")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between two trickled pieces (default 1)")
    p.add_argument("--seconds", type=float, help="stop after this long (default: at SIGTERM)")
    p.add_argument("--out", required=True, help="write the counts here (JSON) when stopped")
    a = p.parse_args(argv)
    host, _, port = a.address.rpartition(":")
    if not host or not port.isdigit() or a.connections < 1 or a.interval <= 0:
        print("python -m bench.slowloris: --address host:port, --connections >= 1, --interval > 0", file=sys.stderr)
        return 2
    result = asyncio.run(run(host, int(port), a.connections, a.interval, a.seconds))
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
