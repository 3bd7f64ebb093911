"""The edge's TLS certificate: the operator's PEM files ([edge] tls_cert, tls_key), rendered into
an SDS file Envoy watches (run_dir/tls/edge-cert.yaml, 0600 in a 0700 directory). The files are
looked at once a second; a renewed certificate reaches Envoy without a restart and without
cutting a connection (new handshakes use it). A pair that cannot be read, or is not PEM, is
refused at start (one line, exit 2) and, later, logged while the last good one stays in use.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from agent.config import ConfigError
from agent.gateway.keys import write_private

log = logging.getLogger(__name__)

SECRET_NAME = "edge_cert"
SDS_FILE = "edge-cert.yaml"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
POLL_S = 1.0


def _pem(path: str, what: str) -> str:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"edge.{what} {path}: cannot read it ({e})") from None
    if "-----BEGIN " not in text:
        raise ConfigError(f"edge.{what} {path}: not a PEM file")
    return text


def sds_resource(cert_path: str, key_path: str) -> dict[str, object]:
    return {
        "resources": [
            {
                "@type": SECRET_TYPE,
                "name": SECRET_NAME,
                "tls_certificate": {
                    "certificate_chain": {"inline_string": _pem(cert_path, "tls_cert")},
                    "private_key": {"inline_string": _pem(key_path, "tls_key")},
                },
            }
        ]
    }


def transport_socket(directory: str) -> dict[str, object]:
    """The edge listener's TLS: the certificate from the watched SDS file; HTTP/2 or 1.1 by ALPN."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [
                    {
                        "name": SECRET_NAME,
                        "sds_config": {
                            "path_config_source": {
                                "path": str(Path(directory) / SDS_FILE),
                                "watched_directory": {"path": directory},
                            },
                            "resource_api_version": "V3",
                        },
                    }
                ],
            },
        },
    }


class EdgeCertificate:
    def __init__(self, cert_path: str, key_path: str, directory: str):
        self.cert_path, self.key_path, self.directory = cert_path, key_path, Path(directory)
        self._stamp: tuple[float, ...] | None = None
        self.stop_event = threading.Event()
        self.last_error = ""

    def sync(self) -> bool:
        """Render the pair if it changed; True if it did. Raises ConfigError if it is unusable."""
        stamp = tuple(os.stat(p).st_mtime for p in (self.cert_path, self.key_path))
        if stamp == self._stamp:
            return False
        text = json.dumps(sds_resource(self.cert_path, self.key_path))
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        changed = write_private(self.directory / SDS_FILE, text)
        self._stamp = stamp
        if changed:
            log.info("edge TLS certificate %s loaded", self.cert_path)
        return changed

    def prepare(self) -> None:
        """Before Envoy starts (a bad pair: ConfigError, the agent exits 2)."""
        try:
            self.sync()
        except OSError as e:
            raise ConfigError(f"edge.tls_cert/tls_key: {e}") from None

    def start(self) -> EdgeCertificate:
        threading.Thread(target=self._run, name="edge-tls", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def _run(self) -> None:
        while not self.stop_event.wait(POLL_S):
            try:
                self.sync()
                self.last_error = ""
            except (OSError, ConfigError) as e:
                if str(e) != self.last_error:
                    log.error("edge TLS: %s; keeping the certificate in use", e)
                self.last_error = str(e)
