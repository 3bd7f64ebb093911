"""The catalog's health reads are `stale` (any server answers from its own state): while the
Consul leader is lost or cut off, a follower keeps answering the gateway's watch, and a blocking
query is not parked behind a forward to a leader that no longer answers (the consul-leader-cut
drill: the gateway saw no change for about 20 s after the cut before this)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from agent.catalog.consul import ConsulCatalog


@pytest.fixture
def fake_consul():
    seen: list[dict[str, list[str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            token = [self.headers.get("X-Consul-Token", "")]
            seen.append({"path": [url.path], "token": token, **parse_qs(url.query, keep_blank_values=True)})
            body = json.dumps([]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Consul-Index", "7")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()


def test_health_reads_and_blocking_queries_are_stale(fake_consul):
    address, seen = fake_consul
    catalog = ConsulCatalog(address, token="t0k")
    assert catalog.instances("ernie") == (7, [])
    assert catalog.instances("ernie", index=3, wait_s=1.0) == (7, [])
    assert [q["path"] for q in seen] == [["/v1/health/service/ernie"]] * 2
    assert all("stale" in q for q in seen), seen
    assert all(q["token"] == ["t0k"] for q in seen), seen
    assert seen[1]["index"] == ["3"] and seen[1]["wait"] == ["1s"], seen[1]
    assert "index" not in seen[0] and "wait" not in seen[0], seen[0]


def test_a_whole_service_read_that_times_out_is_retried_with_more_time(monkeypatch):
    """Consul's answer grows with the fleet: a read that timed out gets twice the time next."""
    import time as _time

    import agent.catalog.consul as consul_mod
    from agent.catalog.base import CatalogUnavailable

    delay_s = [0.5]

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            _time.sleep(delay_s[0])
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Consul-Index", "9")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(consul_mod, "HTTP_TIMEOUT_S", 0.2)
        catalog = ConsulCatalog(f"127.0.0.1:{server.server_address[1]}")
        outcomes = []
        for _ in range(4):
            try:
                outcomes.append(catalog.instances("ernie"))
            except CatalogUnavailable:
                outcomes.append("timeout")
        assert outcomes[:2] == ["timeout", "timeout"], outcomes  # 0.2 s, then 0.4 s: too short
        assert outcomes[2] == (9, []), outcomes  # 0.8 s: enough
        # the time follows what reads take (twice the last one, at least HTTP_TIMEOUT_S): once Consul
        # answers fast again, a Consul that hangs later is noticed after HTTP_TIMEOUT_S, not after the
        # longest time a slow spell ever needed
        delay_s[0] = 0.0
        assert catalog.instances("ernie") == (9, [])
        assert catalog._read_timeout.get("ernie", consul_mod.HTTP_TIMEOUT_S) == consul_mod.HTTP_TIMEOUT_S
    finally:
        server.shutdown()
