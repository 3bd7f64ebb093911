# Consul CLIENT agent for every ernie-mesh host that is not a server (engine hosts, gateways, the
# UI, monitoring, and any host whose services discover ernie.service.consul). Reference config: the
# Ansible role deploy/ansible/roles/consul renders the same settings from inventory vars.
# Replace every <...>; secrets come from your secret store.

datacenter = "dc1"
node_name  = "<gpu1>"          # engine agents use the same name in instance IDs: ernie-<node>-<port>
data_dir   = "/opt/consul"
log_level  = "INFO"

server = false

bind_addr      = "<10.0.1.21>"
advertise_addr = "<10.0.1.21>"
retry_join     = ["<10.0.0.11>", "<10.0.0.12>", "<10.0.0.13>"]
retry_interval = "5s"

client_addr = "127.0.0.1"
addresses {
  dns = "127.0.0.1 <10.0.1.21>"
}
ports {
  dns  = 8600
  http = 8500
}

encrypt = "<gossip key>"

dns_config {
  only_passing    = true
  enable_truncate = true
}
check_update_interval = "0s"

acl {
  enabled        = true
  default_policy = "deny"
  down_policy    = "extend-cache"
  tokens {
    agent   = "<agent token>"
    default = "<dns token>"
  }
}

# TLS for RPC (Consul >= 1.12 spelling; before: top-level ca_file, verify_outgoing = true,
# verify_server_hostname = true): the servers' CA; the client's certificate comes from them.
tls {
  defaults {
    ca_file         = "/etc/consul.d/tls/ca.pem"
    verify_outgoing = true
  }
  internal_rpc {
    verify_server_hostname = true
  }
}
auto_encrypt {
  tls     = true
  ip_san  = ["<10.0.0.21>", "127.0.0.1"]
  dns_san = ["localhost"]
}

disable_update_check = true
leave_on_terminate   = true
