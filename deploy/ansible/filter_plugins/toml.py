# ernie-mesh: render Ansible values as TOML for engine.toml / gateway.toml templates.
"""Filter `to_toml`: a scalar, list or dict -> a TOML value (JSON strings are TOML basic strings).

The project's own TOML files are written with tomli-w; this filter stays a dependency-free copy
because it runs on the Ansible controller, whose Python has only Ansible. tomli-w has no public
API for one inline value anyway. tests/unit/test_ansible_filters.py checks that what it writes
parses back (tomllib) to what it was given.
"""

from __future__ import annotations

import json
import math

from ansible.errors import AnsibleFilterError


def to_toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise AnsibleFilterError(f"to_toml: {value} has no TOML form here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML forbids a raw DEL
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(to_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{to_toml(str(k))} = {to_toml(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise AnsibleFilterError("to_toml: TOML has no null; leave the key out instead")
    return json.dumps(str(value))


class FilterModule:
    def filters(self):
        return {"to_toml": to_toml}
