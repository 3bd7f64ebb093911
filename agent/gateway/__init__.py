"""Gateway role: Consul catalog -> immutable snapshot -> xDS (ADS) -> a supervised Envoy."""
