"""Test hosts as network namespaces: the lab lives in bench/netns.py (the netns drills use it too)."""

from bench.netns import PREFIX, Host, NetnsLab, available, ip, ns_pids, remove_stale_labs

__all__ = ["PREFIX", "Host", "NetnsLab", "available", "ip", "ns_pids", "remove_stale_labs"]
