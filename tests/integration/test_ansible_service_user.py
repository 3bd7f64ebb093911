"""The agents' service user (deploy/ansible/roles/ernie_common/tasks/user.yml), created for real.

The role creates a system user for the agents (systemd `User=`), in the groups GPU access needs
(video, render: those that exist on the host), and gives it the directories the agents write.
Played with a local connection inside a private mount namespace whose /etc is a copy of this
machine's (bind-mounted over it), so `useradd` changes the copy only: the machine's users stay
as they were. A second run changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

PLAY = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{python}"
    service_manager: systemd
    ernie_root: "{root}"
  tasks:
    - name: The service user and its directories
      ansible.builtin.include_role:
        name: ernie_common
        tasks_from: user.yml
"""

# Inside the namespace: /etc is the copy; a `render` group exists (the copy's own), then the play
# runs twice and the user, its groups and the directories' owner are reported as JSON.
SCRIPT = """
set -e
mount --bind "$T/etc" /etc
getent group render >/dev/null || groupadd --system render
cd "$ANSIBLE_DIR"
"$PLAYBOOK" -i localhost, "$T/play.yml" > "$T/run1.log" 2>&1 || {{ cat "$T/run1.log"; exit 1; }}
"$PLAYBOOK" -i localhost, "$T/play.yml" > "$T/run2.log" 2>&1 || {{ cat "$T/run2.log"; exit 1; }}
python3 - <<'PY'
import grp, json, os, pwd
u = pwd.getpwnam("ernie")
root = os.environ["T"] + "/root"
print(json.dumps({{
    "uid": u.pw_uid, "shell": u.pw_shell, "home": u.pw_dir,
    "groups": sorted(g.gr_name for g in grp.getgrall() if "ernie" in g.gr_mem),
    "owners": {{d: pwd.getpwuid(os.stat(root + d).st_uid).pw_name
               for d in ("/var/lib/ernie-mesh", "/var/log/ernie-mesh")}},
}}))
PY
"""


def test_the_service_user_is_created_in_the_gpu_groups_and_owns_what_the_agents_write(tmp_path: Path):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare (util-linux) for a private mount namespace")
    assert PLAYBOOK.exists(), "ansible-core is needed: pip install -e '.[test]'"
    subprocess.run(["cp", "-a", "/etc", str(tmp_path / "etc")], check=True)
    (tmp_path / "play.yml").write_text(PLAY.format(root=tmp_path / "root", python=sys.executable))
    env = {
        **os.environ,
        "T": str(tmp_path),
        "ANSIBLE_DIR": str(ANSIBLE_DIR),
        "PLAYBOOK": str(PLAYBOOK),
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
        "ANSIBLE_NOCOLOR": "1",
    }
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRIPT.format()],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert subprocess.run(["getent", "passwd", "ernie"], capture_output=True).returncode != 0, (
        "the machine's own /etc got the user: the test must only touch its copy"
    )
    assert info["uid"] < 1000 and info["shell"].endswith("nologin"), info  # a system user, no login
    assert {"render", "video"} <= set(info["groups"]), info  # GPU device access
    assert info["owners"] == {"/var/lib/ernie-mesh": "ernie", "/var/log/ernie-mesh": "ernie"}, info
    run2 = (tmp_path / "run2.log").read_text()
    assert "changed=0" in run2 and "failed=0" in run2, run2[-2000:]
