"""The engines' own API key on the gateway side (issue 11, item 2): engines run with vLLM's
--api-key, and Envoy adds `Authorization: Bearer <key>` to every request it sends them.

The key comes from `engine_api_key_file` (gateway.toml; the file the engine agents read, its
first line), rendered into an SDS file Envoy watches (run_dir/engine-credential/, 0600 in 0700)
and looked at once a second: a new key reaches Envoy without a restart. Envoy injects it with
`envoy.filters.http.credential_injector` as an upstream filter of the engines cluster, so it
reaches the engines only (not the relay, not a client), overwriting any Authorization header a
request still carries (with api_keys = "off" a client's own passes the edge): a client can neither
see the key nor choose what the engines get. A file that cannot be read, or every user can read,
stops the agent at start (one line, exit 2); later, it is logged and the last key stays in use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.gateway.rendered import FollowedFiles
from agent.secret_files import read_secret

SECRET_NAME = "engine_credential"
SDS_FILE = "engine-credential.yaml"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_EXT = "type.googleapis.com/envoy.extensions"
INJECTOR_TYPE = f"{_EXT}.filters.http.credential_injector.v3.CredentialInjector"
GENERIC_TYPE = f"{_EXT}.http.injected_credentials.generic.v3.Generic"
CODEC_TYPE = f"{_EXT}.filters.http.upstream_codec.v3.UpstreamCodec"


def sds_resource(key: str) -> dict[str, Any]:
    """The SDS file: one generic secret, the whole header value (the injector adds it as it is)."""
    return {
        "resources": [
            {
                "@type": SECRET_TYPE,
                "name": SECRET_NAME,
                "generic_secret": {"secret": {"inline_string": f"Bearer {key}"}},
            }
        ]
    }


def upstream_filters(directory: str) -> dict[str, Any]:
    """The engines cluster's upstream HTTP filters: the credential injector, then the codec (last)."""
    return {
        "http_filters": [
            {
                "name": "envoy.filters.http.credential_injector",
                "typed_config": {
                    "@type": INJECTOR_TYPE,
                    "overwrite": True,  # whatever Authorization a request carries, the engines get the key
                    "allow_request_without_credential": False,  # no key loaded: nothing goes to the engines
                    "credential": {
                        "name": "envoy.http.injected_credentials.generic",
                        "typed_config": {
                            "@type": GENERIC_TYPE,
                            "credential": {
                                "name": SECRET_NAME,
                                "sds_config": {
                                    "path_config_source": {
                                        "path": str(Path(directory) / SDS_FILE),
                                        "watched_directory": {"path": directory},
                                    },
                                    "resource_api_version": "V3",
                                },
                            },
                        },
                    },
                },
            },
            {
                "name": "envoy.filters.http.upstream_codec",
                "typed_config": {"@type": CODEC_TYPE},
            },
        ]
    }


class EngineCredential(FollowedFiles):
    def __init__(self, key_file: str, directory: str):
        super().__init__(
            "engines' API key",
            f"engine_api_key_file {key_file}",
            (key_file,),
            Path(directory) / SDS_FILE,
            lambda: json.dumps(sds_resource(read_secret(key_file, "engine_api_key_file"))),
        )
