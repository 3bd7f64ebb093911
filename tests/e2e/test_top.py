"""`ernie-mesh top` against the session's shared SIMULATED mesh: the live table drawn in a pty (as a
person on SSH sees it: both instances, their verdicts in colour, the gateway), Ctrl-C leaves it
cleanly (exit 0, cursor shown again); `--once` and `--json` for scripts; a Prometheus that does not
answer is said in one line, not a traceback."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

from agent.local.ports import free_port
from tests.e2e.conftest_up import sim_mesh  # noqa: F401  (shared session fixture)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def top_args(run, *more: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agent",
        "top",
        "--prometheus",
        run.plan.prometheus_url,
        "--consul",
        run.plan.consul_address,
        *more,
    ]


def controlling_terminal() -> None:
    """In the child: a session of its own with the pty (its stdin) as controlling terminal, so that
    Ctrl-C typed into the pty reaches it as SIGINT, as in a terminal."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_top_draws_a_live_table_in_a_terminal_and_ctrl_c_leaves(sim_mesh):
    instances = sim_mesh.healthy["instances"]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # a 200-column terminal
    proc = subprocess.Popen(
        top_args(sim_mesh, "--interval", "1"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=controlling_terminal,
        env={**os.environ, "TERM": "xterm", "NO_COLOR": ""},
    )
    os.close(slave)
    screen = b""

    def shows_every_instance_with_its_figures(frame: str) -> bool:
        """A whole frame in which every instance is passing with running/waiting and memory read from
        Prometheus (on a mesh just started its first scrape may still be coming: `-` until then)."""
        if "Ctrl-C" not in frame:
            return False  # still arriving
        for iid in instances:
            line = next((ln for ln in frame.splitlines() if ln.startswith(iid)), "")
            cells = line.split()
            if not ("passing" in line and len(cells) > 2 and re.fullmatch(r"\d+/\d+", cells[2]) and "MiB" in line):
                return False
        return True

    try:
        deadline = time.monotonic() + 60
        frames, text = 0, ""
        while time.monotonic() < deadline:
            ready, _w, _x = select.select([master], [], [], 0.5)
            if ready:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
            frames = screen.count(b"\x1b[H\x1b[2J")
            text = ANSI.sub("", screen.rsplit(b"\x1b[H\x1b[2J", 1)[-1].decode(errors="replace"))
            if frames >= 2 and shows_every_instance_with_its_figures(text):
                break
        assert frames >= 2, f"top redrew {frames} time(s) in 60 s:\n{screen.decode(errors='replace')[-3000:]}"
        assert shows_every_instance_with_its_figures(text), f"after {frames} frames:\n{text}"
        assert "INSTANCE" in text and "TTFT p50" in text and "Prometheus ok" in text and "Consul leader" in text
        assert re.search(r"gateway \S+: passing\s+envoy up", text), text
        assert b"\x1b[32mpassing" in screen  # green, on a terminal
        os.write(master, b"\x03")  # Ctrl-C, as typed: the pty sends SIGINT to top
        assert proc.wait(timeout=15) == 0
        tail = b""
        while select.select([master], [], [], 0.2)[0]:
            try:
                tail += os.read(master, 65536)
            except OSError:
                break
        assert b"\x1b[?25h" in screen + tail  # the cursor is shown again
        assert b"Traceback" not in screen + tail
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_top_once_and_json_for_scripts(sim_mesh):
    deadline = time.monotonic() + 60
    while True:  # on a mesh just started, Prometheus' first scrape may still be coming
        out = subprocess.run(top_args(sim_mesh, "--json"), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
        if all(r["memory_bytes"] for r in snap["instances"]) or time.monotonic() > deadline:
            break
        time.sleep(1)  # a polling interval, not a synchronisation: the condition is checked above
    assert {r["id"] for r in snap["instances"]} == set(sim_mesh.healthy["instances"])
    assert all(r["memory_bytes"] and r["memory_bytes"] > 1e6 for r in snap["instances"]), snap["instances"]
    assert snap["prometheus"]["up"] and snap["consul"]["leader"]
    once = subprocess.run(top_args(sim_mesh, "--once"), capture_output=True, text=True, timeout=60)
    assert once.returncode == 0 and "\x1b[" not in once.stdout  # no colour into a pipe
    assert all(iid in once.stdout for iid in sim_mesh.healthy["instances"]), once.stdout


def test_top_says_so_when_nothing_answers():
    closed = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "agent", "top", "--once", "--prometheus", f"http://127.0.0.1:{closed}", "--no-consul"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out
    assert f"Prometheus ERROR (Prometheus at http://127.0.0.1:{closed} unreachable" in out.stdout, out.stdout
    assert "Traceback" not in out.stdout + out.stderr
