# ernie-mesh: render Ansible values as TOML for engine.toml / gateway.toml templates.
"""Filter `to_toml`: a scalar, list or flat dict -> a TOML value (JSON strings are TOML basic strings)."""

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
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(to_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {to_toml(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise AnsibleFilterError("to_toml: TOML has no null; leave the key out instead")
    return json.dumps(str(value))


class FilterModule:
    def filters(self):
        return {"to_toml": to_toml}
