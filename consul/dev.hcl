# Consul dev agent settings used by `ernie-mesh up` (one machine, everything on loopback).
# Ports are passed on the command line (they move with `up --port-offset`); this file holds the rest.

# -dev serves the UI at http://127.0.0.1:8500/ui: every instance with its verdict as the check note.

# DNS: `dig @127.0.0.1 -p 8600 ernie.service.consul` answers with passing instances only,
# and nothing is cached, so a failing instance leaves DNS at once.
dns_config {
  only_passing = true
  node_ttl     = "0s"
  service_ttl {
    "*" = "0s"
  }
}

# Every TTL update is written through at once (Consul otherwise coalesces unchanged check
# outputs for up to 5 minutes, which would hide a verdict's new reason).
check_update_interval = "0s"

# Keep the dev log readable.
log_level = "INFO"
