#!/usr/bin/python
# ernie-mesh: a tiny process supervisor for hosts without systemd (service_manager: process).
"""Ansible module `ernie_process`: keep one long-running process started, with a pid file.

The roles use systemd on real hosts (the default). Where systemd does not run (the integration
test's network-namespace hosts, containers), `service_manager: process` uses this module instead:
it starts the command detached (own session, stdin from /dev/null, output to a log file), records
pid + process start time + a fingerprint of the configuration in a JSON pid file, and is
idempotent: `started` changes nothing while the recorded process is alive and its fingerprint is
unchanged; a different fingerprint (new config, new version) restarts it. A process that can reload
in place (the gateway agent re-executes itself on SIGHUP, keeping its pid) gets a second
fingerprint, `reload_fingerprint`: when only that one changed, `started` sends it SIGHUP instead of
restarting it. In check mode it reports what it would do: `action` none, start, restart, reload or
stop. Stopping sends SIGTERM
(the ernie-mesh agents drain on SIGTERM), waits up to `stop_timeout`, then SIGKILLs the process
group. There is no automatic restart on crash: that is systemd's job on real hosts.
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: ernie_process
short_description: Keep a detached process running with a pid file (no systemd)
options:
  name: {description: Service name (for messages)., type: str, required: true}
  command: {description: Program and arguments., type: list, elements: str}
  state: {description: Desired state., type: str, choices: [started, stopped, restarted], default: started}
  pid_file: {description: JSON pid file., type: path, required: true}
  log_file: {description: stdout+stderr of the process (appended)., type: path}
  env: {description: Environment variables (on top of a minimal PATH/LANG)., type: dict, default: {}}
  env_file: {description: KEY=VALUE file read at start (like systemd EnvironmentFile)., type: path}
  cwd: {description: Working directory., type: path, default: /}
  fingerprint: {description: Changes when the process must be restarted (config/version hash)., type: str, default: ''}
  reload_fingerprint: {description: Changes when a reload (reload_signal) is enough; '' = the process cannot reload.,
                       type: str, default: ''}
  reload_signal: {description: The signal that reloads the process in place (it keeps its pid).,
                  type: str, default: SIGHUP}
  stop_timeout: {description: Seconds between SIGTERM and SIGKILL., type: float, default: 90}
  start_grace: {description: Seconds the process must stay alive after start to count as started.,
                type: float, default: 1}
"""

import json
import os
import signal
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule

BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _start_time(pid: int):
    """Process start time (clock ticks since boot) or None when no live (non-zombie) process has this pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _read_pid_file(path: str):
    try:
        with open(path) as f:
            data = json.load(f)
        pid = int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    started = _start_time(pid)
    if started is None or started != data.get("start_time"):
        return None
    return data


def _read_env_file(path: str) -> dict:
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            env[key.strip()] = value
    return env


def _log_tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _stop(data: dict, timeout_s: float) -> bool:
    """SIGTERM, wait, then SIGKILL the process group. True if it had to be killed."""
    pid = int(data["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _start_time(pid) != data.get("start_time"):
            break
        time.sleep(0.1)
    killed = _start_time(pid) == data.get("start_time")
    try:
        os.killpg(pid, signal.SIGKILL)  # the process and whatever it left in its group
    except (ProcessLookupError, PermissionError):
        pass
    return killed


def _start(module: AnsibleModule) -> dict:
    p = module.params
    env = dict(BASE_ENV)
    if p["env_file"]:
        env.update(_read_env_file(p["env_file"]))
    env.update({str(k): str(v) for k, v in (p["env"] or {}).items()})
    log_path = p["log_file"] or os.devnull
    if p["log_file"]:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
    os.makedirs(os.path.dirname(p["pid_file"]), exist_ok=True)
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(
            p["command"],
            stdin=devnull,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=p["cwd"],
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + p["start_grace"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            module.fail_json(
                msg=f"{p['name']}: exited with code {proc.returncode} right after start",
                log_tail=_log_tail(log_path),
                command=p["command"],
            )
        time.sleep(0.05)
    data = {
        "pid": proc.pid,
        "start_time": _start_time(proc.pid),
        "fingerprint": p["fingerprint"],
        "reload_fingerprint": p["reload_fingerprint"],
        "command": p["command"],
        "started_at": time.time(),
    }
    _write_pid_file(p["pid_file"], data)
    return data


def _write_pid_file(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _reload(module: AnsibleModule, running: dict) -> None:
    """Signal the process to reload in place; it must still be the same process after start_grace."""
    p = module.params
    pid = int(running["pid"])
    try:
        sig = signal.Signals[p["reload_signal"]]
    except KeyError:
        module.fail_json(msg=f"{p['name']}: unknown reload_signal {p['reload_signal']!r}")
    os.kill(pid, sig)
    deadline = time.monotonic() + p["start_grace"]
    while time.monotonic() < deadline:
        if _start_time(pid) != running.get("start_time"):
            module.fail_json(
                msg=f"{p['name']}: exited on {sig.name} (reload)", log_tail=_log_tail(p["log_file"] or os.devnull)
            )
        time.sleep(0.05)
    _write_pid_file(
        p["pid_file"], {**running, "reload_fingerprint": p["reload_fingerprint"], "reloaded_at": time.time()}
    )


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            command=dict(type="list", elements="str"),
            state=dict(type="str", choices=["started", "stopped", "restarted"], default="started"),
            pid_file=dict(type="path", required=True),
            log_file=dict(type="path"),
            env=dict(type="dict", default={}),
            env_file=dict(type="path"),
            cwd=dict(type="path", default="/"),
            fingerprint=dict(type="str", default="", no_log=False),
            reload_fingerprint=dict(type="str", default="", no_log=False),
            reload_signal=dict(type="str", default="SIGHUP"),
            stop_timeout=dict(type="float", default=90.0),
            start_grace=dict(type="float", default=1.0),
        ),
        required_if=[("state", "started", ["command"]), ("state", "restarted", ["command"])],
        supports_check_mode=True,
    )
    p = module.params
    running = _read_pid_file(p["pid_file"])
    state = p["state"]
    if state == "started" and running and running.get("fingerprint") == p["fingerprint"]:
        if running.get("reload_fingerprint", "") == p["reload_fingerprint"]:
            module.exit_json(changed=False, pid=running["pid"], state="running", action="none")
        if module.check_mode:
            module.exit_json(changed=True, action="reload")
        _reload(module, running)
        module.exit_json(changed=True, pid=running["pid"], state="running", action="reload")
    if state == "stopped" and not running:
        module.exit_json(changed=False, state="stopped", action="none")
    if module.check_mode:
        # `action`: "start" (nothing runs: nothing to drain), "restart" (a live process would be
        # stopped first) or "stop", for roles/ernie_common/tasks/service.yml's probe.
        module.exit_json(changed=True, action="stop" if state == "stopped" else "restart" if running else "start")
    killed = False
    if running:
        killed = _stop(running, p["stop_timeout"])
    if state == "stopped":
        try:
            os.unlink(p["pid_file"])
        except FileNotFoundError:
            pass
        module.exit_json(changed=True, state="stopped", killed=killed)
    data = _start(module)
    module.exit_json(
        changed=True, pid=data["pid"], state="running", action="restart" if running else "start", killed=killed
    )


if __name__ == "__main__":
    main()
