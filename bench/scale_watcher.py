"""One watcher exactly as a gateway watches (CatalogWatch over ConsulCatalog, the gateway's watch
settings), run by bench/scale.py's fan-out part as its own process with PYTHONPATH at one
implementation's tree:

    PYTHONPATH=<tree> python bench/scale_watcher.py --consul ADDR --service S

Prints one JSON line per delivered change: {"t": monotonic seconds, "routable": passing+warning}."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--consul", required=True)
    p.add_argument("--service", required=True)
    args = p.parse_args()
    from agent.catalog.base import CheckStatus
    from agent.catalog.consul import ConsulCatalog
    from agent.gateway.watch import CatalogWatch, WatchSettings

    def on_update(u: Any) -> None:
        if u.changed:
            n = sum(1 for e in u.entries if e.status is not CheckStatus.CRITICAL)
            print(json.dumps({"t": time.monotonic(), "routable": n}), flush=True)

    watch = CatalogWatch(ConsulCatalog(args.consul), args.service, on_update, WatchSettings()).start()

    def stop(*_: object) -> None:
        watch.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
