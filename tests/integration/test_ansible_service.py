"""The roles' service task file (deploy/ansible/roles/ernie_common/tasks/service.yml), played for real.

site.yml relies on it to tell a service that is not running (start it now: a first install is not
serialised) from a running one whose fingerprint changed (leave it alone, mark it, and let a later
serial play drain and restart it, or reload it in place), and to change nothing when nothing
changed. The netns deploy test covers the process manager end to end; here both managers go
through every case, systemd against a fake `systemctl` (no systemd runs in the test machine) that
records what it was asked to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

FAKE_SYSTEMCTL = """#!/bin/sh
# state of each unit in $FAKE_SD/<unit>.state (active | inactive); every action appended to $FAKE_SD/log
unit=""; cmd=""
for a in "$@"; do
  case "$a" in -*) ;; *) if [ -z "$cmd" ]; then cmd="$a"; elif [ -z "$unit" ]; then unit="${a%.service}"; fi ;; esac
done
state=$(cat "$FAKE_SD/$unit.state" 2>/dev/null || echo inactive)
case "$cmd" in
  is-active) echo "$state"; [ "$state" = active ]; exit ;;
  show) printf 'Id=%s.service\\nNames=%s.service\\nLoadState=loaded\\nActiveState=%s\\nSubState=running\\n' \\
          "$unit" "$unit" "$state"
        echo UnitFileState=enabled; exit 0 ;;
  is-enabled) echo enabled; exit 0 ;;
  start|restart|reload) echo active > "$FAKE_SD/$unit.state" ;;
  stop) echo inactive > "$FAKE_SD/$unit.state" ;;
esac
case "$cmd" in start|restart|reload|stop|daemon-reload) echo "$cmd${unit:+ $unit}" >> "$FAKE_SD/log" ;; esac
exit 0
"""

# A process that reloads in place on SIGHUP, as the gateway agent does (re-executes itself).
RELOADER = """import os, signal, sys, time
print("start", os.getpid(), flush=True)
signal.signal(signal.SIGHUP, lambda *_: os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]]))
while True:
    time.sleep(1)
"""

PLAY = """- hosts: localhost
  gather_facts: false
  tasks:
%(tasks)s"""
TASKS = """    - ansible.builtin.include_role: {name: ernie_common, tasks_from: service.yml}
      vars:
        service_manager: %(manager)s
        svc_name: ernie-svc-test
        svc_command: ["%(python)s", "%(reloader)s"]
        svc_unit: "[Service]\\nExecStart=/bin/true {{ unit_rev }}\\n"
        svc_fingerprint: "{{ fp }}"
        svc_reload_fingerprint: "{{ rfp }}"
        svc_restart: "{{ force | bool }}"
        svc_defer_restart: "{{ defer | bool }}"
    - ansible.builtin.debug:
        msg: >-
          RESULT %(manager)s {{ {'pending': svc_restart_pending, 'pending_action': svc_pending_action,
                                 'action': svc_action} | to_json }}
"""
MANAGERS = ("systemd", "process")


class Runner:
    """Plays service.yml for one service under each manager (own roots), in one ansible-playbook run."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.sd = tmp / "sd"
        self.sd.mkdir()
        (tmp / "units").mkdir()
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
        (bin_dir / "systemctl").chmod(0o755)
        (tmp / "reloader.py").write_text(RELOADER)
        tasks = "".join(
            TASKS % {"manager": m, "python": sys.executable, "reloader": tmp / "reloader.py"} for m in MANAGERS
        )
        self.playbook = tmp / "play.yml"
        self.playbook.write_text(PLAY % {"tasks": tasks})
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "FAKE_SD": str(self.sd),
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
            "ANSIBLE_LIBRARY": str(ANSIBLE_DIR / "library"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
        }

    def run(self, fp="a", rfp="1", defer=True, force=False, unit_rev="1") -> dict[str, dict]:
        """Play service.yml; per manager its result facts; under "systemctl" the actions asked of
        systemctl; under "changed" the recap's changed= count."""
        (self.sd / "log").write_text("")
        extra = {
            "ernie_root": str(self.tmp / "root"),
            "ernie_systemd_unit_dir": str(self.tmp / "units"),
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "fp": fp,
            "rfp": rfp,
            "defer": defer,
            "force": force,
            "unit_rev": unit_rev,
        }
        r = subprocess.run(
            [str(PLAYBOOK), "-i", "localhost,", str(self.playbook), "-e", json.dumps(extra)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.tmp,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        out: dict = {}
        for line in r.stdout.splitlines():
            if '"msg": "RESULT ' in line:
                manager, result = json.loads(line.split('"msg": ', 1)[1])[len("RESULT ") :].split(" ", 1)
                out[manager] = json.loads(result)
        assert set(out) == set(MANAGERS), r.stdout[-4000:]
        out["systemctl"] = (self.sd / "log").read_text().split("\n")[:-1]
        out["changed"] = int(r.stdout.rsplit("changed=", 1)[1].split()[0])
        return out

    def pid(self) -> int | None:
        try:
            return json.loads((self.tmp / "root" / "run" / "ernie-mesh" / "ernie-svc-test.pid").read_text())["pid"]
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """The process dies; systemd's unit goes inactive."""
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        (self.sd / "ernie-svc-test.state").write_text("inactive\n")


@pytest.fixture
def runner(tmp_path):
    assert PLAYBOOK.exists(), "ansible-core is needed: pip install -e '.[test]'"
    r = Runner(tmp_path)
    yield r
    r.stop()


def both(out: dict, **expected) -> bool:
    return all(out[m] == {**out[m], **expected} for m in MANAGERS)


def test_service_starts_defers_reloads_and_restarts(runner: Runner):
    # nothing runs: started at once even though restarts are deferred (a first install)
    out = runner.run()
    assert both(out, pending=False, pending_action="none", action="start"), out
    assert out["systemctl"] == ["daemon-reload", "start ernie-svc-test"] and out["changed"] > 0, out
    first = runner.pid()
    # nothing changed: nothing done
    out = runner.run()
    assert both(out, pending=False, action="none") and out["systemctl"] == [] and out["changed"] == 0, out

    # only what a reload picks up changed: deferred (a reload), nothing touched ...
    out = runner.run(rfp="2")
    assert both(out, pending=True, pending_action="reload", action="deferred"), out
    assert out["systemctl"] == [] and out["changed"] == 0, out
    # ... until the play that may: a reload, the same process
    out = runner.run(rfp="2", defer=False)
    assert both(out, action="reload") and out["systemctl"] == ["reload ernie-svc-test"], out
    assert runner.pid() == first
    out = runner.run(rfp="2")
    assert both(out, action="none") and out["changed"] == 0, out

    # the restart fingerprint, or a forced restart (both managers), or the unit (systemd): deferred ...
    for change in ({"fp": "b"}, {"force": True}):
        out = runner.run(rfp="2", **change)
        assert both(out, pending=True, pending_action="restart", action="deferred"), (change, out)
        assert out["systemctl"] == [] and out["changed"] == 0, (change, out)
    out = runner.run(rfp="2", unit_rev="2")
    assert out["systemd"]["pending_action"] == "restart" and out["process"]["action"] == "none", out
    assert out["systemctl"] == [] and out["changed"] == 0, out
    # ... then a restart, a new process
    out = runner.run(fp="b", rfp="2", unit_rev="2", force=True, defer=False)
    assert both(out, action="restart"), out
    assert out["systemctl"] == ["daemon-reload", "restart ernie-svc-test"], out
    assert runner.pid() not in (None, first)
    out = runner.run(fp="b", rfp="2", unit_rev="2")
    assert both(out, action="none") and out["changed"] == 0, out

    # not running any more, and changed: started at once (nothing to drain)
    runner.stop()
    out = runner.run(fp="c", rfp="3", unit_rev="2")
    assert both(out, pending=False, pending_action="none", action="start"), out
    assert out["systemctl"] == ["start ernie-svc-test"], out
