"""The edge's TLS certificate: the operator's PEM files ([edge] tls_cert, tls_key), rendered into
an SDS file Envoy watches (run_dir/tls/edge-cert.yaml, 0600 in a 0700 directory). The files are
looked at once a second; a renewed certificate reaches Envoy without a restart and without
cutting a connection (new handshakes use it). A pair that cannot be read, or is not PEM, is
refused at start (one line, exit 2) and, later, logged while the last good one stays in use.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.config import ConfigError
from agent.gateway.rendered import FollowedFiles

SECRET_NAME = "edge_cert"
SDS_FILE = "edge-cert.yaml"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


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


class EdgeCertificate(FollowedFiles):
    def __init__(self, cert_path: str, key_path: str, directory: str):
        super().__init__(
            "edge TLS certificate",
            "edge.tls_cert/tls_key",
            (cert_path, key_path),
            Path(directory) / SDS_FILE,
            lambda: json.dumps(sds_resource(cert_path, key_path)),
        )
