"""Ansible's Grafana role (deploy/ansible/roles/grafana, the `monitoring` group of site.yml).

Grafana's apt repository (apt.grafana.com) cannot be reached from CI, so the install tasks run on
real hosts only. Here: site.yml, the role included, passes `ansible-playbook --syntax-check`; the
role played for real with a local connection and `grafana_install: false` renders its provisioning
files into a scratch root, and those are what Grafana reads: a Prometheus datasource (the
configured URL, default for the dashboard's `${datasource}` variable), a file provider pointing at
the directory holding deploy/grafana/ernie-mesh.json byte for byte, and the loopback listen
address; a second run changes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

PLAY = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{python}"
    ernie_root: "{root}"
    grafana_install: false
    grafana_prometheus_url: http://prom.example:9090
    grafana_admin_password: generated-by-facts-yml
  roles:
    - grafana
"""


def play(path: Path) -> str:
    out = subprocess.run(
        [str(PLAYBOOK), "-i", "localhost,", str(path)], cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    return out.stdout


def test_site_yml_with_the_grafana_role_passes_the_syntax_check():
    out = subprocess.run(
        [str(PLAYBOOK), "--syntax-check", "-i", "inventory.example.yml", "site.yml"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    site = yaml.safe_load((ANSIBLE_DIR / "site.yml").read_text())
    assert any(p.get("hosts") == "monitoring" and p.get("roles") == ["grafana"] for p in site)


def test_the_role_renders_the_provisioning_grafana_reads(tmp_path):
    root = tmp_path / "root"
    path = tmp_path / "play.yml"
    path.write_text(PLAY.format(python=sys.executable, root=root))
    first = play(path)
    for task in ("Grafana's apt repository", "Grafana running and enabled"):  # no install, no service here
        assert re.search(re.escape(task) + r"\] \*+\nskipping: \[localhost\]", first), first[-3000:]

    (datasource,) = yaml.safe_load((root / "etc/grafana/provisioning/datasources/ernie-mesh.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prom.example:9090"
    assert datasource["isDefault"] is True and datasource["access"] == "proxy" and datasource["uid"]
    (provider,) = yaml.safe_load((root / "etc/grafana/provisioning/dashboards/ernie-mesh.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == str(
        root / "var/lib/grafana/dashboards/ernie-mesh"
    )
    shipped = (REPO / "deploy" / "grafana" / "ernie-mesh.json").read_text()
    assert (Path(provider["options"]["path"]) / "ernie-mesh.json").read_text() == shipped
    # The dashboard picks its Prometheus through its `datasource` variable: the default one is ours.
    variable = next(v for v in json.loads(shipped)["templating"]["list"] if v["name"] == "datasource")
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    dropin = (root / "etc/systemd/system/grafana-server.service.d/ernie-mesh.conf").read_text()
    assert "Environment=GF_SERVER_HTTP_ADDR=127.0.0.1" in dropin and "GF_SERVER_HTTP_PORT=3000" in dropin
    # Grafana's admin is not admin/admin: the generated password, from a private file (not the unit)
    secret = root / "etc/grafana/ernie-admin-password"
    assert secret.read_text().strip() == "generated-by-facts-yml" and secret.stat().st_mode & 0o077 == 0
    assert f"Environment=GF_SECURITY_ADMIN_PASSWORD__FILE={secret}" in dropin
    assert "generated-by-facts-yml" not in dropin

    again = play(path)
    assert re.search(r"localhost\s*:\s*ok=\d+\s+changed=0\b", again), again[-1500:]
