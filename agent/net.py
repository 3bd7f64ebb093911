"""Can this process listen on host:port? Asked at start, so a busy port fails like bad config does
(one line, exit 2) instead of in a server thread later."""

from __future__ import annotations

import socket

UNIX_PATH_MAX = 107  # bytes in a unix socket path (sun_path, less the terminating NUL)


def bind_error(host: str, port: int) -> str | None:
    """None when a TCP server could bind host:port now (with SO_REUSEADDR, as servers bind), else
    the system's reason ("Address already in use")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def can_bind(host: str, port: int) -> bool:
    return bind_error(host, port) is None
