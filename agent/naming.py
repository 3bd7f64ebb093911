"""Names in Consul that several parts must agree on (one home for each formula).

- An engine instance is `<service>-<node>-<address>-<port>`: the engine agent registers it under that
  ID, the local mesh plan, the benchmarks and the tests find it by it, and Envoy's endpoints carry it.
- Gateways register as service `ernie-gateway`, each as `ernie-gateway-<name>`; `status` and
  Prometheus find them there.

The Ansible roles write the same formulas in YAML (deploy/ansible/roles/ernie_engine/tasks/main.yml,
roles/consul/defaults/main.yml): they run on the controller and import nothing from here.
"""

from __future__ import annotations

GATEWAY_SERVICE = "ernie-gateway"


def instance_id(service: str, node: str, address: str, port: int) -> str:
    """The Consul service ID of the engine that gateways dial on `address`:`port` (the address
    registered for it), in `service`, whose engine agent runs on `node`.

    Unique by construction: one address:port is one engine mesh-wide (a loopback address only in a
    mesh on one host, where the ports differ: agent/engine/config.py check_no_loopback). The node
    keeps the ID readable; alone with the port it collided (two attached engines on two hosts with
    one port, two hosts with one short name)."""
    return f"{service}-{node}-{address.strip('[]')}-{port}"


def gateway_instance_id(name: str) -> str:
    """The Consul service ID of the gateway called `name`."""
    return f"{GATEWAY_SERVICE}-{name}"
