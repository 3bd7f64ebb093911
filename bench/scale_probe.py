"""One implementation's in-process costs at scale, run by bench/scale.py as its own process with
PYTHONPATH at that implementation's tree (the current one, or the baseline's `git archive`):

    PYTHONPATH=<tree> python bench/scale_probe.py --consul ADDR --service S --flip URL_JSON --repeats R

Uses only what both trees have (ConsulCatalog.instances, build_snapshot, eds.cluster_load_assignment)
plus, where the tree has them, the caches the current one keeps between changes (EndpointCache,
EdsEncoder). Each repeat flips one instance in Consul (the bench's catalog write), then times what
the gateway does for that change: the read of the whole service (Consul's answer + decoding),
the snapshot build and the EDS encoding. Prints one JSON object of medians."""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from typing import Any


def put(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--consul", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--flips", required=True, help="JSON list of catalog/register bodies, critical then passing")
    p.add_argument("--cluster", default="ernie")
    args = p.parse_args()
    from agent.catalog.consul import ConsulCatalog
    from agent.gateway import eds, snapshot

    flips: list[dict[str, Any]] = json.loads(args.flips)
    catalog = ConsulCatalog(args.consul)
    cache = snapshot.EndpointCache() if hasattr(snapshot, "EndpointCache") else None
    encoder = eds.EdsEncoder() if hasattr(eds, "EdsEncoder") else None

    def build(entries: list[Any]) -> Any:
        if cache is not None:
            return snapshot.build_snapshot(entries, args.cluster, cache=cache).snapshot
        return snapshot.build_snapshot(entries, args.cluster).snapshot

    def encode(snap: Any) -> bytes:
        if encoder is not None:
            return encoder.encode(snap)
        return bytes(eds.cluster_load_assignment(snap).SerializeToString())

    from agent.catalog.base import CatalogError

    def read() -> list[Any]:
        """The whole service, retried as the gateway's watch retries a failed read (5 times)."""
        for attempt in range(5):
            try:
                return list(catalog.instances(args.service)[1])
            except CatalogError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    entries = read()
    encode(build(entries))  # the state before the first change (what the caches hold)
    reads, builds, encodes, size = [], [], [], 0
    for body in flips:
        put(f"http://{args.consul}/v1/catalog/register", body)
        t = time.perf_counter()
        entries = read()
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        snap = build(entries)
        builds.append(time.perf_counter() - t)
        t = time.perf_counter()
        size = len(encode(snap))
        encodes.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "read_ms": statistics.median(reads) * 1000,
                "build_ms": statistics.median(builds) * 1000,
                "encode_ms": statistics.median(encodes) * 1000,
                "eds_bytes": size,
            }
        )
    )


if __name__ == "__main__":
    main()
