"""Envoy keeps only the stats something reads (policy.envoy_stats = "used"): every Envoy series the
dashboard and the alerts use must survive the stats matcher, and a running Envoy must have them."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from agent.binaries import MissingBinary, envoy_binary
from agent.config import ConfigError
from agent.gateway import bootstrap
from agent.gateway.config import DEFAULT_BOOTSTRAP_TEMPLATE, EdgeSettings, GatewayConfig, PolicyConfig, finish
from agent.local.ports import free_ports
from agent.local.prometheus_rules import ALERTS, RECORDS

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "ernie-mesh.json"

# Prometheus name (Envoy's /stats/prometheus) -> the Envoy stats behind it, for the engine cluster
# `ernie` and the API listener `openai_api`. A series the dashboard or the rules start to use must
# be added here (and to the matcher in agent/gateway/bootstrap.py if it is not kept).
ENVOY_STATS = {
    "envoy_cluster_upstream_rq_total": ["cluster.ernie.upstream_rq_total"],
    "envoy_cluster_upstream_rq_retry": ["cluster.ernie.upstream_rq_retry"],
    "envoy_cluster_upstream_rq_retry_success": ["cluster.ernie.upstream_rq_retry_success"],
    "envoy_cluster_upstream_rq_time": ["cluster.ernie.upstream_rq_time"],
    "envoy_cluster_outlier_detection_ejections_active": ["cluster.ernie.outlier_detection.ejections_active"],
    "envoy_cluster_outlier_detection_ejections_enforced_total": [
        "cluster.ernie.outlier_detection.ejections_enforced_total"
    ],
    "envoy_http_downstream_rq_xx": [f"http.openai_api.downstream_rq_{c}xx" for c in range(1, 6)],
}
# Per-endpoint stats come from the hosts (track_cluster_stats), not from the stats store: the
# matcher does not apply to them (checked against a running Envoy below).
PER_ENDPOINT = "envoy_cluster_endpoint_"
# Read by the agent (drain) and the tests, not by the dashboard.
OTHER_READERS = [
    "http.openai_api.downstream_rq_active",
    "cluster.ernie.outlier_detection.ejections_detected_consecutive_5xx",
    "cluster.ernie.membership_total",
    "cluster.ernie_relay.upstream_rq_total",
    "cluster.ernie.upstream_rq_active",  # consistent hashing's load bound (hash_balance_factor) divides by it
]


def cfg(tmp_path: Path, **policy: object) -> GatewayConfig:
    listen, admin, xds, metrics = free_ports(4)
    return finish(
        GatewayConfig(
            name="gw-stats",
            listen=f"127.0.0.1:{listen}",
            envoy_admin=f"127.0.0.1:{admin}",
            xds=f"127.0.0.1:{xds}",
            metrics=f"127.0.0.1:{metrics}",
            run_dir=str(tmp_path / "run"),
            edge=EdgeSettings(api_keys="off"),
            policy=PolicyConfig(**policy),  # type: ignore[arg-type]
        )
    )


def kept(c: GatewayConfig, stat: str) -> bool:
    """What Envoy's inclusion_list does with one stat name (RE2 and Python agree on these regexes)."""
    matcher = bootstrap.stats_config(c).get("stats_matcher")
    if matcher is None:
        return True
    for p in matcher["inclusion_list"]["patterns"]:
        if "prefix" in p and stat.startswith(p["prefix"]):
            return True
        if "safe_regex" in p and re.search(p["safe_regex"]["regex"], stat):
            return True
    return False


def used_envoy_series() -> set[str]:
    exprs = [r.expr for r in RECORDS] + [a.expr for a in ALERTS]

    def walk(panels: list[dict]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    names = set()
    for e in exprs:
        e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
        e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
        found = re.findall(r"(?<![\w:])envoy_[A-Za-z0-9_]*", e)  # not the rules' own ernie:envoy_* series
        names |= {re.sub(r"_(bucket|count|sum)$", "", n) for n in found}
    return names


def test_every_envoy_series_the_dashboard_and_the_rules_read_is_kept(tmp_path: Path):
    used = used_envoy_series()
    assert "envoy_cluster_upstream_rq_retry" in used  # the parse found the dashboard's queries
    unmapped = sorted(n for n in used if not n.startswith(PER_ENDPOINT) and n not in ENVOY_STATS)
    assert unmapped == [], f"map these to Envoy stat names in ENVOY_STATS: {unmapped}"
    c = cfg(tmp_path)
    stats = [s for n in used if n in ENVOY_STATS for s in ENVOY_STATS[n]] + OTHER_READERS
    dropped = [s for s in stats if not kept(c, s)]
    assert dropped == [], f"read by the dashboard, the rules, the agent or the tests but dropped: {dropped}"
    # and the matcher does drop what nothing reads
    for unread in ("cluster.ernie.upstream_cx_total", "cluster.ernie.upstream_rq_2xx", "listener_manager.total"):
        assert not kept(c, unread), unread
    assert bootstrap.stats_config(cfg(tmp_path, envoy_stats="all")) == {}


def test_envoy_stats_setting_is_checked():
    with pytest.raises(ConfigError, match="envoy_stats"):
        PolicyConfig(envoy_stats="some")


def _admin_stats(admin: str) -> dict[str, str]:
    text = httpx.get(f"http://{admin}/stats", timeout=2).text
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def _prometheus_names(admin: str) -> set[str]:
    text = httpx.get(f"http://{admin}/stats/prometheus", timeout=2).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.mark.parametrize("envoy_stats", ["used", "all"])
def test_a_running_envoy_has_the_used_stats_and_only_them(tmp_path: Path, envoy_stats: str):
    try:
        binary = envoy_binary()
    except MissingBinary as e:
        pytest.fail(str(e))
    c = cfg(tmp_path, envoy_stats=envoy_stats)
    Path(c.run_dir).mkdir(parents=True)
    path = tmp_path / "bootstrap.yaml"
    path.write_text(bootstrap.render(DEFAULT_BOOTSTRAP_TEMPLATE.read_text(), c))
    proc = subprocess.Popen(
        [binary, "-c", str(path), "-l", "error", "--disable-hot-restart"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        stats: dict[str, str] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, "Envoy exited"
            try:
                stats = _admin_stats(c.envoy_admin)
                if "http.openai_api.downstream_rq_active" in stats:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        # (a histogram appears with its first value: upstream_rq_time is checked by the matcher test)
        wanted = [s for group in ENVOY_STATS.values() for s in group if not s.endswith("_time")] + OTHER_READERS
        missing = [s for s in wanted if s not in stats]
        assert missing == [], missing
        if envoy_stats == "used":
            assert "cluster.ernie.upstream_cx_total" not in stats
            assert len(stats) < 200, f"{len(stats)} stats: the matcher let most of the tree through"
        else:
            assert "cluster.ernie.upstream_cx_total" in stats
            assert len(stats) > 500
    finally:
        proc.terminate()
        proc.wait(10)
