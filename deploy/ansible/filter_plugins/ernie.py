# ernie-mesh: turn the inventory's engine list into engine.toml [[engines]] tables.
"""Filters `ernie_engine_tables(engines, flavor, host_address, cpu_args)`, `ernie_unsupplied(names,
hostvars, hosts)`, `ernie_server_spec(host, hostvars)` and
`ernie_instance_ids(tables, service, node, host_address)`, `ernie_prepared_query(service, datacenter,
datacenters, nearest_n)` and, for an inventory with several Consul datacenters,
`ernie_host_datacenter(host, hostvars)`, `ernie_dc_servers(servers, hostvars, dc)`,
`ernie_datacenters(servers, hostvars)`.

An inventory engine item: {port, kind (vllm|simulated|attach), model, served_model_name,
max_model_len, host, gpus: [0, 1], args: [...], env: {...}, shutdown_timeout_s, url}.
- `gpus` becomes CUDA_VISIBLE_DEVICES (and --tensor-parallel-size N for N > 1 GPUs);
- on a CPU host (flavor cpu) a vLLM engine without `args` gets the CPU build's flags;
- supervised engines listen on the host's address by default, so gateways can reach them.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

KEYS = (
    "port",
    "kind",
    "url",
    "model",
    "served_model_name",
    "max_model_len",
    "host",
    "args",
    "env",
    "shutdown_timeout_s",
    "log_file",
)
# A copy of agent.engine.cpu.VLLM_CPU_ENV: the filter runs on the Ansible controller and imports
# nothing from the package (tests/unit/test_ansible_filters.py checks the two are equal).
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def ernie_engine_tables(engines, flavor="gpu", host_address="0.0.0.0", cpu_args=()):
    if not isinstance(engines, list) or not engines:
        raise AnsibleFilterError("ernie_engines must be a non-empty list of engines (see docs/deploy.md)")
    out = []
    for i, item in enumerate(engines):
        if not isinstance(item, dict):
            raise AnsibleFilterError(f"ernie_engines[{i}] must be a mapping, got {item!r}")
        unknown = set(item) - set(KEYS) - {"gpus"}
        if unknown:
            raise AnsibleFilterError(f"ernie_engines[{i}]: unknown key(s) {', '.join(sorted(unknown))}")
        e = {k: item[k] for k in KEYS if k in item and item[k] not in (None, "")}
        kind = e.setdefault("kind", "attach" if e.get("url") else "vllm")
        if kind != "attach":
            e.setdefault("host", host_address)
        elif "port" not in e:
            hostport = str(e.get("url", "")).split("://", 1)[-1].split("/", 1)[0]
            port = hostport.rpartition(":")[2]
            if not port.isdigit():
                raise AnsibleFilterError(f"ernie_engines[{i}]: attach url needs a port, got {e.get('url')!r}")
            e["port"] = int(port)
        env = {str(k): str(v) for k, v in (e.get("env") or {}).items()}
        args = [str(a) for a in (e.get("args") or [])]
        gpus = item.get("gpus")
        if kind == "vllm" and gpus:
            gpus = [str(g) for g in (gpus if isinstance(gpus, list) else [gpus])]
            env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(gpus))
            if len(gpus) > 1 and not any(a.startswith(("--tensor-parallel-size", "-tp")) for a in args):
                args += ["--tensor-parallel-size", str(len(gpus))]
        if kind == "vllm" and flavor == "cpu" and "args" not in item:
            args = [str(a) for a in cpu_args]
            for key, value in VLLM_CPU_ENV.items():
                env.setdefault(key, value)
        e.pop("args", None)
        e.pop("env", None)
        if args:
            e["args"] = args
        if env:
            e["env"] = env
        out.append(e)
    ports = [e.get("port") or e.get("url") for e in out]
    if len(set(map(str, ports))) != len(ports):
        raise AnsibleFilterError("ernie_engines: two engines share a port")
    return out


def _url_host(url):
    hostport = str(url).split("://", 1)[-1].split("/", 1)[0]
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    return hostport.rpartition(":")[0] if ":" in hostport else hostport


def ernie_instance_ids(tables, service, node, host_address):
    """The Consul service ID the engine agent registers for each [[engines]] table (engine.toml has
    advertise_address = host_address). A copy of agent.naming.instance_id with the registered
    address of agent.engine.config.EngineAgentConfig.engine_address: the filter imports nothing from
    the package (tests/unit/test_ansible_filters.py checks they agree)."""
    out = []
    for e in tables:
        address = _url_host(e["url"]) if e.get("kind") == "attach" else e.get("host", "127.0.0.1")
        if address in ("0.0.0.0", "::", ""):
            address = host_address
        out.append(f"{service}-{node}-{str(address).strip('[]')}-{e['port']}")
    return out


def ernie_unsupplied(names, hostvars, hosts):
    """The variables in `names` that no host in `hosts` has a non-empty value for (inventory,
    group_vars, Vault, -e): the secrets facts.yml generates. A value the inventory gives wins."""
    out = []
    for name in names:
        supplied = False
        for h in hosts:
            hv = hostvars[h]
            if name in hv and str(hv[name] or "").strip():
                supplied = True
                break
        if not supplied:
            out.append(name)
    return out


def ernie_server_spec(host, hostvars):
    """`node=address[@datacenter]` of a Consul server for files/ernie_secrets.py tls (its
    certificate's names: server.<datacenter>.<domain>, the datacenter the inventory gives it)."""
    hv = hostvars[host]
    node = hv["consul_node_name"] if "consul_node_name" in hv else host
    dc = f"@{hv['consul_datacenter']}" if "consul_datacenter" in hv else ""
    return f"{node}={hv['ernie_host_address']}{dc}"


def ernie_host_datacenter(host, hostvars, default="dc1"):
    """The Consul datacenter of `host`: its consul_datacenter (inventory, group or host vars; a
    role's default is not in hostvars, so `default` is the role's)."""
    hv = hostvars[host]
    return str(hv["consul_datacenter"]) if "consul_datacenter" in hv else default


def ernie_dc_servers(servers, hostvars, datacenter, default="dc1"):
    """The hosts of `servers` (the consul_servers group) in `datacenter`, in inventory order."""
    return [h for h in servers if ernie_host_datacenter(h, hostvars, default) == datacenter]


def ernie_datacenters(servers, hostvars, default="dc1"):
    """Every datacenter of the servers, in the order their first server appears: the first is the
    primary (ACLs are made there and replicated to the others)."""
    out = []
    for h in servers:
        dc = ernie_host_datacenter(h, hostvars, default)
        if dc not in out:
            out.append(dc)
    return out


def ernie_token_accessor(role, secret):
    """The AccessorID of the ernie-mesh ACL token of `role` with `secret`: derived, so a re-run
    finds the token it made (changed=0) and two secrets of one role (a rotation) are two tokens.
    uuid5 of a SHA-256 of the secret: the accessor (visible to acl:read) reveals nothing of it.
    The agents' ernie_consul_token_registrations{accessor} shows the same value."""
    import hashlib
    import uuid

    digest = hashlib.sha256(str(secret).encode()).hexdigest()
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"ernie-mesh:consul-token:{role}:{digest}"))


def ernie_prepared_query(service, datacenter, datacenters, nearest_n=2):
    """The Consul prepared query `<service>` of `datacenter` (DNS: <service>.query.consul): the
    service's passing instances there, else those of the nearest datacenter that has some - the
    `nearest_n` nearest by Consul's WAN round-trip estimates, then the others in the order listed.
    A PUT/POST body for /v1/query (the ID is Consul's). The netns two-datacenter test creates the
    same one (tests/integration/test_multidc_netns.py)."""
    others = [dc for dc in datacenters if dc != datacenter]
    return {
        "Name": service,
        "Service": {
            "Service": service,
            "OnlyPassing": True,  # a draining instance (warning) takes no new work
            "Failover": {"NearestN": int(nearest_n) if others else 0, "Datacenters": others},
        },
        "DNS": {"TTL": "0s"},  # as the service lookup: a failover is seen at once
    }


def ernie_prepared_query_differs(existing, wanted):
    """Whether the prepared query Consul has (`existing`, a /v1/query item) differs from `wanted`
    in what ernie_prepared_query sets (Consul answers an empty list as null)."""

    def key(q):
        svc = q.get("Service") or {}
        failover = svc.get("Failover") or {}
        return (
            svc.get("Service"),
            bool(svc.get("OnlyPassing")),
            int(failover.get("NearestN") or 0),
            list(failover.get("Datacenters") or []),
            (q.get("DNS") or {}).get("TTL") or "",
        )

    return key(existing) != key(wanted)


class FilterModule:
    def filters(self):
        return {
            "ernie_prepared_query": ernie_prepared_query,
            "ernie_prepared_query_differs": ernie_prepared_query_differs,
            "ernie_host_datacenter": ernie_host_datacenter,
            "ernie_dc_servers": ernie_dc_servers,
            "ernie_datacenters": ernie_datacenters,
            "ernie_engine_tables": ernie_engine_tables,
            "ernie_instance_ids": ernie_instance_ids,
            "ernie_unsupplied": ernie_unsupplied,
            "ernie_server_spec": ernie_server_spec,
            "ernie_token_accessor": ernie_token_accessor,
        }
