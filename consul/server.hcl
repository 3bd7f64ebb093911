# Consul SERVER agent for an ernie-mesh cluster (one of 3 or 5). Reference config: the Ansible role
# deploy/ansible/roles/consul renders the same settings as /etc/consul.d/consul.json from inventory
# vars; use this file when you install by hand. Replace every <...>. Secrets come from your secret
# store (Vault, ansible-vault), never from a file in git.

datacenter = "dc1"
node_name  = "<consul1>"
data_dir   = "/opt/consul"
log_level  = "INFO"

server           = true
bootstrap_expect = 3          # the number of servers; a leader is elected once all have joined

bind_addr      = "<10.0.0.11>"                 # this host's address on the cluster network
advertise_addr = "<10.0.0.11>"
retry_join     = ["<10.0.0.11>", "<10.0.0.12>", "<10.0.0.13>"]
retry_interval = "5s"

# HTTP API on loopback (local agents, `ernie-mesh drain`, the gateway talk to their own agent);
# DNS also on the host address so other machines can ask it.
client_addr = "127.0.0.1"
addresses {
  dns = "127.0.0.1 <10.0.0.11>"
}
ports {
  dns   = 8600
  http  = 8500
  https = 8501                # HTTPS for operators and Prometheus on other hosts (the CA below)
}

# Gossip encryption: `consul keygen`, the same key on every agent.
encrypt = "<gossip key>"

# ernie.service.consul answers healthy instances only (a draining or critical one is never named).
dns_config {
  only_passing    = true
  enable_truncate = true
}
# Every TTL note (the engine agent's verdict reason) is written through at once.
check_update_interval = "0s"

ui_config {                   # Consul < 1.9: ui = true
  enabled = true
}

acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = false
  tokens {
    initial_management = "<management token>"   # Consul < 1.11: master = "..."
    agent              = "<agent token>"        # policy: node_prefix "" write, service_prefix "" read
    default            = "<dns token>"          # anonymous reads (DNS): node/service/query read
  }
}

# TLS for RPC between agents (Consul >= 1.12 spelling; before: top-level ca_file, cert_file,
# key_file, verify_incoming_rpc = true, verify_outgoing = true, verify_server_hostname = true).
# The certificate names server.<dc>.consul (`consul tls cert create -server -dc dc1`, or the
# Ansible role's CA: deploy/ansible/files/ernie_secrets.py). A client without one is refused.
tls {
  defaults {
    ca_file         = "/etc/consul.d/tls/ca.pem"
    cert_file       = "/etc/consul.d/tls/server.pem"
    key_file        = "/etc/consul.d/tls/server-key.pem"   # 0600
    verify_outgoing = true
  }
  internal_rpc {
    verify_incoming        = true
    verify_server_hostname = true
  }
  https {
    verify_incoming = false   # HTTPS clients authenticate with ACL tokens
  }
}
auto_encrypt {
  allow_tls = true            # clients get their certificates from the servers
}
addresses {
  https = "127.0.0.1 <10.0.0.11>"
}

disable_update_check = true
leave_on_terminate   = false
