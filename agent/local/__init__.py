"""Running the parts on this machine: processes, ports, a Consul dev agent (used by `up` and tests)."""
