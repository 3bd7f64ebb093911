"""Render envoy/bootstrap.yaml (a string.Template) from the gateway config. Pure: no I/O but reading
the template text, which the caller passes in."""

from __future__ import annotations

import hashlib
import json
import re
import string
from pathlib import Path
from typing import Any

import yaml

from agent.durations import proto_duration as _duration  # Envoy reads protobuf JSON durations
from agent.gateway import edge_tls, engine_credential, keys
from agent.gateway.config import GatewayConfig
from agent.gateway.relay.affinity import AFFINITY_HEADER
from agent.gateway.snapshot import MODEL_CLUSTER_SEPARATOR


def template_values(cfg: GatewayConfig) -> dict[str, str]:
    p = cfg.policy
    listen_host, listen_port = cfg.host_port("listen")
    admin_host, admin_port = cfg.host_port("envoy_admin")
    xds_host, xds_port = cfg.host_port("xds")
    if admin_host == "localhost":
        admin_host = "127.0.0.1"
    if xds_host == "localhost":
        xds_host = "127.0.0.1"
    values = {
        "node_id": cfg.instance_id,
        "gateway_name": cfg.name,
        "cluster": cfg.cluster,
        "listen_host": listen_host,
        "listen_port": listen_port,
        "admin_host": admin_host,
        "admin_port": admin_port,
        "xds_host": xds_host,
        "xds_port": xds_port,
        "stream_idle_timeout": _duration(p.stream_idle_timeout_s),
        "num_retries": p.num_retries,
        "host_selection_retry_max_attempts": p.host_selection_retry_max_attempts,
        "retry_back_off_base": _duration(p.retry_back_off_base_s),
        "retry_back_off_max": _duration(p.retry_back_off_max_s),
        "request_buffer_limit_bytes": p.request_buffer_limit_bytes,
        "eds_initial_fetch_timeout": _duration(p.eds_initial_fetch_timeout_s),
        "connect_timeout": _duration(p.connect_timeout_s),
        "upstream_idle_timeout": _duration(p.upstream_idle_timeout_s),
        # keepalive probes start after half the budget, one a second; TCP_USER_TIMEOUT bounds the rest
        "tcp_keepalive_time_s": max(1, int(p.upstream_dead_peer_timeout_s / 2)),
        "tcp_user_timeout_ms": int(p.upstream_dead_peer_timeout_s * 1000),
        "max_connections": p.max_connections,
        "max_pending_requests": p.max_pending_requests,
        "max_requests": p.max_requests,
        "retry_budget_percent": float(p.retry_budget_percent),
        "retry_min_concurrency": p.retry_min_concurrency,
        "outlier_consecutive_local_origin_failure": p.outlier_consecutive_local_origin_failure,
        "request_headers_timeout": _duration(p.request_headers_timeout_s),
        "request_receive_timeout": _duration(p.request_receive_timeout_s),
        "outlier_interval": _duration(p.outlier_interval_s),
        "outlier_base_ejection": _duration(p.outlier_base_ejection_s),
        "outlier_max_ejection": _duration(p.outlier_max_ejection_s),
        "outlier_max_ejection_percent": p.outlier_max_ejection_percent,
        "hop_socket": cfg.hop_socket,
        "relay_retries": cfg.relay_processes + 1,
        "relay_percent": 100 if cfg.relay.enabled else 0,
        # RE2, anchored: exactly the allowed paths (a query string is not part of :path matching)
        "edge_paths_regex": "^(" + "|".join(re.escape(p) for p in cfg.edge.paths) + ")$",
        "api_keys_file": str(Path(cfg.keys_dir) / keys.ENVOY_FILE),
        "api_keys_dir": cfg.keys_dir,
        "edge_unknown_path_message": f"Unknown path. This gateway serves {', '.join(cfg.edge.paths)} (and /health).",
    }
    # Quote every value as a JSON string (valid YAML scalars; no injection through a name).
    out = {k: json.dumps(str(v)) if isinstance(v, str) else str(v) for k, v in values.items()}
    # The API key check (an ECDS filter fed from the watched key file), or nothing with api_keys off.
    out["edge_auth_filter"] = "- " + json.dumps(_auth_filter(out)) if cfg.edge.keys_required else ""
    out["health_filter_config"] = (
        json.dumps(
            {keys.FILTER_NAME: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}
        )
        if cfg.edge.keys_required
        else "{}"
    )
    # TLS for clients (a key of the edge's filter chain), or nothing.
    out["edge_transport_socket"] = (
        "transport_socket: " + json.dumps(edge_tls.transport_socket(cfg.tls_dir)) if cfg.edge.tls else ""
    )
    # The engines' own key, injected upstream (the engines cluster's filters), or nothing.
    out["engine_upstream_filters"] = (
        json.dumps(engine_credential.upstream_filters(cfg.engine_credential_dir))[1:-1]  # `http_filters: [...]`
        if cfg.engine_api_key_file
        else ""
    )
    out.update(routing_values(cfg))
    out["stats_config"] = json.dumps(stats_config(cfg))
    # JSON is YAML: the relay processes' unix sockets as a flow list of endpoints.
    out["relay_endpoints"] = json.dumps(
        [{"endpoint": {"address": {"pipe": {"path": cfg.relay_socket(i)}}}} for i in range(cfg.relay_processes)]
    )
    return out


def routing_values(cfg: GatewayConfig) -> dict[str, str]:
    """[routing]: Maglev consistent hashing over the affinity key with a load bound, or least-request.
    Maglev, not ring hash: Envoy's ring hash rescales every host's share of its ring when the host
    count changes, so an instance that leaves moves other instances' keys too (measured: 5 of 48
    sessions besides its own, 4 -> 3 instances); Maglev moved none (tests/integration/test_routing.py)."""
    r = cfg.routing
    if not r.affinity:
        return {
            "engine_lb_policy": "LEAST_REQUEST",
            "consistent_hashing_lb_config": "",
            "hop_hash_policy": "[]",
            "edge_hash_policy": "[]",
        }
    bound = {"hash_balance_factor": r.hash_balance_factor} if r.hash_balance_factor else {}
    return {
        "engine_lb_policy": "MAGLEV",
        "consistent_hashing_lb_config": "consistent_hashing_lb_config: " + json.dumps(bound),
        "hop_hash_policy": json.dumps([{"header": {"header_name": AFFINITY_HEADER}}]),
        "edge_hash_policy": json.dumps([{"header": {"header_name": r.session_header}}]),
    }


# What reads Envoy's stats, and which: the dashboard and the alerts (deploy/grafana/dashboard.py,
# agent/local/prometheus_rules.py: requests, retries, upstream time, ejections, responses by class),
# the agent (downstream_rq_active while draining), bench/scale.py (membership), the tests
# (outlier_detection.*), the hash's load bound (upstream_rq_active: without it every host looks idle
# and the bound is one request). Per-endpoint stats (track_cluster_stats) are not subject to the matcher.
USED_STATS_RELAY_CLUSTER = "ernie_relay"


def stats_config(cfg: GatewayConfig) -> dict[str, Any]:
    """Envoy's stats_config: only the stats that are read (policy.envoy_stats = "used"), or Envoy's
    whole tree ("all"). A stat left out is never created: nothing counts it per request, flushes it
    or exports it."""
    if cfg.policy.envoy_stats == "all":
        return {}
    # the engine cluster, the models' clusters (ernie--<model>: agent/gateway/snapshot.py), the relays
    models = re.escape(cfg.cluster + MODEL_CLUSTER_SEPARATOR) + "[^.]+"
    clusters = "|".join([re.escape(cfg.cluster), models, re.escape(USED_STATS_RELAY_CLUSTER)])
    return {
        "stats_matcher": {
            "inclusion_list": {
                "patterns": [
                    {
                        "safe_regex": {
                            "regex": rf"^cluster\.({clusters})\."
                            r"(upstream_rq_(total|retry|retry_success|time|active)|outlier_detection\..+|membership_.+)$"
                        }
                    },
                    {"safe_regex": {"regex": r"^http\.openai_api\.downstream_rq_([1-5]xx|active)$"}},
                    {"prefix": "server."},
                    {"prefix": "control_plane."},
                ]
            }
        }
    }


def _auth_filter(values: dict[str, str]) -> dict[str, Any]:
    return {
        "name": keys.FILTER_NAME,
        "config_discovery": {
            "config_source": {
                "path_config_source": {
                    "path": json.loads(values["api_keys_file"]),
                    "watched_directory": {"path": json.loads(values["api_keys_dir"])},
                },
                "resource_api_version": "V3",
            },
            # until the file is read: no key is valid
            "default_config": keys.auth_config([]),
            "type_urls": [keys.API_KEY_AUTH_TYPE],
        },
    }


def render(template_text: str, cfg: GatewayConfig) -> str:
    """Substitute every ${name}; a placeholder the config does not provide is an error (KeyError)."""
    return string.Template(template_text).substitute(template_values(cfg))


def cluster_template(rendered: str, cluster: str) -> dict[str, Any]:
    """The engine cluster as the rendered bootstrap defines it: what every model's cluster is a copy of
    (agent/gateway/eds.py model_clusters), so that its policy is written once, in envoy/bootstrap.yaml."""
    doc = yaml.safe_load(rendered)
    for c in doc.get("static_resources", {}).get("clusters", []):
        if c.get("name") == cluster:
            return dict(c)
    raise ValueError(f"the bootstrap defines no cluster {cluster!r}")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
