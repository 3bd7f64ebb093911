#!/usr/bin/python
# ernie-mesh: idempotent Consul ACL policies and tokens through the HTTP API (Consul >= 1.5).
"""Ansible module `ernie_consul_acl`: create or update one ACL policy or token.

Only the HTTP endpoints stable across Consul 1.5 ... 1.x are used (/v1/acl/policies,
/v1/acl/policy, /v1/acl/token, /v1/acl/tokens). A token is created with the given AccessorID and
SecretID (both chosen by the caller: the secret from Vault or the generated secrets, the accessor
derived from the token's role and secret), so a re-run finds it and reports no change. Its
description starts with `[ernie-mesh:<name>]`, the mark of the role: with retire_others, every
other token carrying the same mark (the tokens a rotation replaced) is deleted.
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: ernie_consul_acl
short_description: Consul ACL policy or token, created or updated idempotently
options:
  kind: {type: str, choices: [policy, token], required: true}
  name: {type: str, required: true}
  description: {type: str, default: ''}
  rules: {type: str, default: '', description: HCL rules (policy)}
  accessor_id: {type: str, description: token AccessorID (UUID)}
  secret_id: {type: str, description: token SecretID (UUID)}
  policies: {type: list, elements: str, default: [], description: policy names (token)}
  retire_others: {type: bool, default: false, description: delete the role's other tokens (rotation)}
  legacy_accessor_id: {type: str, default: '', description: AccessorID earlier versions gave the token (replaced)}
  address: {type: str, default: 'http://127.0.0.1:8500'}
  token: {type: str, required: true, description: management token}
"""

import json
import urllib.error
import urllib.request

from ansible.module_utils.basic import AnsibleModule


class ConsulAPI:
    def __init__(self, address: str, token: str):
        self.address = address.rstrip("/")
        self.token = token
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.address + path,
            data=data,
            method=method,
            headers={"X-Consul-Token": self.token, "Content-Type": "application/json"},
        )
        try:
            with self.opener.open(req, timeout=10) as r:
                text = r.read().decode() or "null"
                return r.status, json.loads(text)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")


def ensure_policy(module: AnsibleModule, api: ConsulAPI) -> None:
    p = module.params
    status, policies = api.call("GET", "/v1/acl/policies")
    if status != 200:
        module.fail_json(msg=f"list ACL policies: HTTP {status}: {policies}")
    found = next((x for x in policies if x.get("Name") == p["name"]), None)
    want = {"Name": p["name"], "Description": p["description"], "Rules": p["rules"]}
    if found:
        status, current = api.call("GET", f"/v1/acl/policy/{found['ID']}")
        if status != 200:
            module.fail_json(msg=f"read ACL policy {p['name']}: HTTP {status}: {current}")
        if (
            current.get("Rules", "").strip() == p["rules"].strip()
            and current.get("Description", "") == p["description"]
        ):
            module.exit_json(changed=False, id=found["ID"])
        if module.check_mode:
            module.exit_json(changed=True)
        status, out = api.call("PUT", f"/v1/acl/policy/{found['ID']}", {**want, "ID": found["ID"]})
        action = "updated"
    else:
        if module.check_mode:
            module.exit_json(changed=True)
        status, out = api.call("PUT", "/v1/acl/policy", want)
        action = "created"
    if status != 200:
        module.fail_json(msg=f"{action[:-1]} ACL policy {p['name']}: HTTP {status}: {out}")
    module.exit_json(changed=True, id=out.get("ID"), action=action)


def role_mark(name: str) -> str:
    return f"[ernie-mesh:{name}]"


def retire_others(module: AnsibleModule, api: ConsulAPI, keep: str) -> list[str]:
    """Delete the tokens of this role other than `keep`; their AccessorIDs."""
    p = module.params
    status, tokens = api.call("GET", "/v1/acl/tokens")
    if status != 200:
        module.fail_json(msg=f"list ACL tokens: HTTP {status}: {tokens}")
    mark = role_mark(p["name"])
    old = [
        t["AccessorID"]
        for t in tokens or []
        if (t.get("Description") or "").startswith(mark + " ") and t.get("AccessorID") != keep
    ]
    if module.check_mode:
        return old
    for accessor in old:
        status, out = api.call("DELETE", f"/v1/acl/token/{accessor}")
        if status != 200:
            module.fail_json(msg=f"delete ACL token {accessor} ({p['name']}): HTTP {status}: {out}")
    return old


def ensure_token(module: AnsibleModule, api: ConsulAPI) -> None:
    p = module.params
    if not p["accessor_id"] or not p["secret_id"]:
        module.fail_json(msg=f"token {p['name']}: accessor_id and secret_id are required")
    description = f"{role_mark(p['name'])} {p['description']}"
    want = {
        "AccessorID": p["accessor_id"],
        "SecretID": p["secret_id"],
        "Description": description,
        "Policies": [{"Name": n} for n in p["policies"]],
        "Local": False,
    }
    status, current = api.call("GET", f"/v1/acl/token/{p['accessor_id']}")
    if status == 200:
        have_policies = sorted(x.get("Name", "") for x in current.get("Policies") or [])
        same = (
            current.get("SecretID") == p["secret_id"]
            and current.get("Description", "") == description
            and have_policies == sorted(p["policies"])
        )
        if same:
            retired = retire_others(module, api, p["accessor_id"]) if p["retire_others"] else []
            module.exit_json(changed=bool(retired), accessor_id=p["accessor_id"], retired=retired)
        if module.check_mode:
            module.exit_json(changed=True)
        if current.get("SecretID") != p["secret_id"]:
            # A SecretID cannot be changed in place: replace the token.
            api.call("DELETE", f"/v1/acl/token/{p['accessor_id']}")
            status, out = api.call("PUT", "/v1/acl/token", want)
        else:
            status, out = api.call("PUT", f"/v1/acl/token/{p['accessor_id']}", want)
        action = "updated"
    elif status in (403, 404) and "not found" in str(current).lower():
        if module.check_mode:
            module.exit_json(changed=True)
        legacy = p["legacy_accessor_id"]
        if legacy and legacy != p["accessor_id"] and api.call("GET", f"/v1/acl/token/{legacy}")[0] == 200:
            # made before accessors were derived from the secret (same role, maybe the same
            # secret, which Consul would refuse to give a second token): replaced
            api.call("DELETE", f"/v1/acl/token/{legacy}")
        status, out = api.call("PUT", "/v1/acl/token", want)
        action = "created"
    else:
        module.fail_json(msg=f"read ACL token {p['name']}: HTTP {status}: {current}")
    if status != 200:
        module.fail_json(msg=f"{action[:-1]} ACL token {p['name']}: HTTP {status}: {out}")
    retired = retire_others(module, api, p["accessor_id"]) if p["retire_others"] else []
    module.exit_json(changed=True, accessor_id=p["accessor_id"], action=action, retired=retired)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            kind=dict(type="str", choices=["policy", "token"], required=True),
            name=dict(type="str", required=True),
            description=dict(type="str", default=""),
            rules=dict(type="str", default=""),
            accessor_id=dict(type="str"),
            secret_id=dict(type="str", no_log=True),
            policies=dict(type="list", elements="str", default=[]),
            retire_others=dict(type="bool", default=False),
            legacy_accessor_id=dict(type="str", default=""),
            address=dict(type="str", default="http://127.0.0.1:8500"),
            token=dict(type="str", required=True, no_log=True),
        ),
        supports_check_mode=True,
    )
    api = ConsulAPI(module.params["address"], module.params["token"])
    if module.params["kind"] == "policy":
        ensure_policy(module, api)
    else:
        ensure_token(module, api)


if __name__ == "__main__":
    main()
