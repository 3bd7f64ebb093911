"""Start, watch and restart one local engine process (vLLM or the simulated engine)."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import shutil
import tempfile
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from agent.config import ConfigError
from agent.engine.config import VLLM_MODULE, EngineAgentConfig, EngineSpec
from agent.engine.cpu import VLLM_CPU_ENV
from agent.engine.verdict import ProcessFacts
from agent.secret_files import read_secrets

log = logging.getLogger(__name__)

KILL_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ENGINE_DEATH_SIGNAL = signal.SIGKILL  # what the engine gets when its agent dies

# Resolved here, in the agent, so that the forked child only calls it (no dlopen between fork and exec).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


# One per engine start, in a session of its own: blocks reading a pipe only the agent writes to.
# When the agent dies, however it dies, the kernel closes its end: the read ends without a line and
# the reaper SIGKILLs the engine's process group ($1, the engine's pid: it leads its group), vLLM's
# EngineCore and workers included. Once the agent has stopped the engine itself it writes `done`
# and the reaper exits without a signal. A shell (dash, bash, ash alike; `kill --` is not
# portable): no Python start-up, ~1 MB. The guard keeps a bad argument from meaning "-1" (every
# process).
REAPER = 'read line; [ "$line" = done ] || { [ "$1" -gt 1 ] && kill -KILL "-$1"; }; exit 0'


def bind_to_agent(agent_pid: int) -> Callable[[], None]:
    """A preexec_fn: the engine dies with its agent, under systemd as under `ernie-mesh up`.

    PR_SET_PDEATHSIG: the kernel sends ENGINE_DEATH_SIGNAL to the engine when the thread that forked
    it exits (it survives execve). The agent forks on its event loop's thread, which lives as long
    as the agent (asyncio's subprocess transport runs Popen there; `ernie-mesh engine` runs the loop
    on the main thread): a SIGKILLed or crashed agent leaves no engine holding the port with nobody
    reporting its health, and its successor can bind. vLLM's EngineCore children notice that the API
    server died and exit (docs/deploy.md); the process group is signalled as before when the agent
    stops the engine itself. If the agent died between fork and prctl, the child exits at once.

    Only the engine's own process gets the signal: PDEATHSIG reaches direct children, and vLLM's
    EngineCore does not notice that its API server died (vLLM 0.32: no parent-death check in
    v1/engine/core.py; measured, it ran on 56 s later holding its memory, its worker with it).
    The reaper (REAPER) takes the rest of the engine's process group."""

    def preexec() -> None:
        if _prctl is not None and _prctl(PR_SET_PDEATHSIG, int(ENGINE_DEATH_SIGNAL), 0, 0, 0) != 0:
            os._exit(126)  # cannot bind the engine's life to ours: do not start an engine we could orphan
        if os.getppid() != agent_pid:
            os._exit(126)

    return preexec


def engine_command(spec: EngineSpec) -> list[str]:
    common = ["--host", spec.host, "--port", str(spec.port)]
    if spec.kind == "simulated":
        cmd = [
            sys.executable,
            "-m",
            "agent",
            "sim-engine",
            *common,
            "--shutdown-timeout",
            f"{spec.shutdown_timeout_s:g}",
        ]
        if spec.served_model_name:
            cmd += ["--model", spec.served_model_name]
        return cmd + list(spec.args)
    cmd = [
        sys.executable,
        "-m",
        VLLM_MODULE,
        "--model",
        spec.model,
        *common,
        "--shutdown-timeout",
        str(int(spec.shutdown_timeout_s)),
    ]
    if spec.served_model_name:
        cmd += ["--served-model-name", spec.served_model_name]
    if spec.max_model_len:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    return cmd + list(spec.args)


# The agent's own credentials, never inherited by the engine (a model's code, its plugins, a shell
# opened from it would hold them): Consul's (CONSUL_HTTP_TOKEN and its file, the basic-auth pair,
# the client TLS key) and the agent's control token. And VLLM_API_KEY: the engine's key is the one
# engine_api_key_file gives (the agent's probes must know it), or none.
AGENT_ONLY_ENV = (
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_AUTH",
    "CONSUL_CLIENT_KEY",
    "CONSUL_CLIENT_CERT",
    "ERNIE_MESH_CONTROL_TOKEN_FILE",
    "ERNIE_MESH_ENGINE_API_KEY_FILE",
    "VLLM_API_KEY",
)
KEYS_CONFIG = "api-keys.yaml"  # several keys (a rotation): vLLM's --config file, in a 0700 directory
# Flags whose value is a secret: shown as *** when the agent logs an engine's command line.
SECRET_FLAGS = ("--api-key", "--hf-token")


def redacted(cmd: list[str]) -> str:
    """The command line as the log shows it: values of SECRET_FLAGS replaced by ***."""
    out: list[str] = []
    hide = False
    for arg in cmd:
        flag, eq, _value = arg.partition("=")
        if hide:
            out.append("***")
        elif eq and flag in SECRET_FLAGS:
            out.append(f"{flag}=***")
        else:
            out.append(arg)
        hide = not hide and arg in SECRET_FLAGS
    return " ".join(out)


def engine_env(spec: EngineSpec, api_keys: tuple[str, ...] = ()) -> dict[str, str]:
    """The engine's environment: the agent's, without the agent's credentials (AGENT_ONLY_ENV), with
    vLLM's CPU settings; the [[engines]] env table wins over both. One API key goes in VLLM_API_KEY
    (vLLM and the simulated engine read it; never argv, which every user of the host can read)."""
    env = {k: v for k, v in os.environ.items() if k not in AGENT_ONLY_ENV}
    if spec.kind == "vllm":  # CPU builds need it (docs/architecture.md §5.4); a user's env in the config wins
        env.update(VLLM_CPU_ENV)
    env.update(spec.env)
    if len(api_keys) == 1:
        env["VLLM_API_KEY"] = api_keys[0]
    return env


def write_keys_config(directory: Path, api_keys: tuple[str, ...]) -> Path:
    """Several keys (a rotation: vLLM's VLLM_API_KEY takes one): vLLM's --config file holding them
    (`api-key: [...]`, JSON being YAML), 0600 in a 0700 directory. The simulated engine reads it too."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / KEYS_CONFIG
    tmp = directory / f".{KEYS_CONFIG}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api-key": list(api_keys)}, f)
    os.replace(tmp, path)
    return path


class EngineProcess:
    """One supervised process. Restarts with capped exponential backoff; a crash loop (too many exits
    in a window) is reported, not hidden, and retried at the capped backoff for as long as it lasts
    (the agent stays up; a fixed engine, disk or GPU recovers without anyone restarting the agent).
    A process that stays up `restart_backoff_max_s * 2` ends the crash loop."""

    def __init__(
        self, spec: EngineSpec, cfg: EngineAgentConfig, name: str, on_restart: Callable[[], None] | None = None
    ):
        self.spec = spec
        self.cfg = cfg
        self.name = name
        self.on_restart = on_restart
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at_s = time.monotonic()
        self.generation = 0
        self.restarts = 0
        self.exit_code: int | None = None
        self.next_restart_at_s: float | None = None
        self.crash_loop = False
        self.stopped_on_purpose = False
        self._exits: deque[float] = deque()
        self._stop = asyncio.Event()
        self._resume = asyncio.Event()
        self._not_spawning = asyncio.Event()  # cleared while a spawn is under way
        self._not_spawning.set()
        self.spawn_thread: threading.Thread | None = None
        self.reaper: asyncio.subprocess.Process | None = None
        self.api_key = ""  # the key the running engine was started with (the probes send it), "" for none
        self._keys_dir: Path | None = None  # 0700, for a --config with several keys

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def facts(self, now_s: float) -> ProcessFacts:
        nxt = None if self.next_restart_at_s is None else max(self.next_restart_at_s - now_s, 0.0)
        return ProcessFacts(
            running=self.running,
            exit_code=self.exit_code,
            ever_started=self.proc is not None or self.exit_code is not None,
            restarts=self.restarts,
            crash_loop=self.crash_loop,
            next_restart_in_s=nxt,
            stopped_on_purpose=self.stopped_on_purpose,
        )

    def _log_target(self) -> BinaryIO | None:
        if not self.cfg.log_dir and not self.spec.log_file:
            return None
        path = Path(self.spec.log_file or Path(self.cfg.log_dir) / f"{self.name}.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")

    def _api_keys(self) -> tuple[str, ...]:
        """The keys the engine must accept, read now (a rotation takes effect at the next start)."""
        if not self.cfg.engine_api_key_file:
            return ()
        try:
            return tuple(read_secrets(self.cfg.engine_api_key_file, "engine_api_key_file"))
        except ConfigError as e:  # never start an engine without the key it should require
            raise OSError(str(e)) from None

    async def _spawn(self) -> None:
        keys = self._api_keys()
        cmd = engine_command(self.spec)
        if len(keys) > 1:
            if self._keys_dir is None:
                self._keys_dir = Path(tempfile.mkdtemp(prefix="ernie-engine-keys-"))
            cmd += ["--config", str(write_keys_config(self._keys_dir, keys))]
        out = self._log_target()
        self._not_spawning.clear()
        self.spawn_thread = threading.current_thread()  # PR_SET_PDEATHSIG follows this thread (bind_to_agent)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                env=engine_env(self.spec, keys),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT if out else None,
                start_new_session=True,  # own process group: Ctrl-C reaches the agent, which drains first
                preexec_fn=bind_to_agent(os.getpid()),  # and it dies with the agent, however the agent ends
            )
        finally:
            self._not_spawning.set()
            if out:
                out.close()
        await self._start_reaper(self.proc.pid)
        self.api_key = keys[0] if keys else ""
        self.generation += 1
        self.started_at_s = time.monotonic()
        self.exit_code = None
        self.next_restart_at_s = None
        log.info("%s: started pid %d: %s", self.name, self.proc.pid, redacted(cmd))

    async def _start_reaper(self, pgid: int) -> None:
        if pgid <= 1:
            return
        try:
            self.reaper = await asyncio.create_subprocess_exec(
                shutil.which("sh") or "/bin/sh",
                "-c",
                REAPER,
                "ernie-engine-reaper",
                str(pgid),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a kill of the agent's process group must not take it along
            )
        except OSError as e:  # the engine runs on; its API server still dies with us (PDEATHSIG)
            log.warning("%s: no reaper for the engine's process group (%s)", self.name, e)
            self.reaper = None

    async def _retire_reaper(self) -> None:
        """The engine's group is gone: let its reaper go (it finds nothing left to kill)."""
        reaper, self.reaper = self.reaper, None
        if reaper is None:
            return
        if reaper.stdin is not None:
            reaper.stdin.write(b"done\n")
            reaper.stdin.close()
        try:
            await asyncio.wait_for(reaper.wait(), timeout=5.0)
        except TimeoutError:
            reaper.kill()
            await reaper.wait()

    async def run(self) -> None:
        """Keep the engine running until stop() is called."""
        backoff = self.cfg.restart_backoff_initial_s
        while not self._stop.is_set():
            try:
                await self._spawn()
            except OSError as e:
                self.exit_code = 127
                log.error("%s: cannot start engine: %s", self.name, e)
            else:
                proc = self.proc
                assert proc is not None  # set by _spawn
                up_since = time.monotonic()
                self.exit_code = await self._wait_exit(proc)
                _signal_group(proc.pid, signal.SIGKILL)  # no orphaned engine-core left holding the port
                await self._retire_reaper()
                if self._stop.is_set() or self.stopped_on_purpose:
                    break
                log.warning("%s: engine exited with code %s", self.name, self.exit_code)
                if time.monotonic() - up_since > self.cfg.restart_backoff_max_s * 2:
                    backoff = self.cfg.restart_backoff_initial_s  # it had been healthy for a while
            now = time.monotonic()
            self._exits.append(now)
            while self._exits and now - self._exits[0] > self.cfg.crash_loop_window_s:
                self._exits.popleft()
            if len(self._exits) >= self.cfg.crash_loop_restarts:
                if not self.crash_loop:
                    log.error(
                        "%s: crash loop (%d exits in %.0fs): retrying every %.0fs until it stays up; "
                        "see the engine log",
                        self.name,
                        len(self._exits),
                        self.cfg.crash_loop_window_s,
                        self.cfg.restart_backoff_max_s,
                    )
                self.crash_loop = True
                backoff = self.cfg.restart_backoff_max_s
            self.next_restart_at_s = now + backoff
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=backoff)
                break
            except TimeoutError:
                pass
            backoff = min(backoff * 2, self.cfg.restart_backoff_max_s)
            self.restarts += 1
            if self.on_restart:
                self.on_restart()

    async def _wait_exit(self, proc: asyncio.subprocess.Process) -> int:
        """Wait for the process to exit; once it has stayed up a while, a crash loop is over."""
        try:
            return await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=self.cfg.restart_backoff_max_s * 2)
        except TimeoutError:
            if self.crash_loop:
                log.info("%s: engine stayed up; crash loop over", self.name)
            self.crash_loop = False
            self._exits.clear()
            return await proc.wait()

    async def stop(self) -> int | None:
        """SIGTERM the engine's process group (vLLM drains up to its --shutdown-timeout), then SIGKILL."""
        self.stopped_on_purpose = True
        self._stop.set()
        # A spawn under way finishes first: the process it starts a moment later must not escape the stop
        # (run() would wait on it forever).
        await self._not_spawning.wait()
        if self._keys_dir is not None:  # read by the engine when it started; nothing starts any more
            shutil.rmtree(self._keys_dir, ignore_errors=True)
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=self.spec.shutdown_timeout_s + KILL_GRACE_S)
        except TimeoutError:
            log.warning("%s: engine did not exit after SIGTERM; killing it", self.name)
            _signal_group(proc.pid, signal.SIGKILL)
            code = await proc.wait()
        _signal_group(proc.pid, signal.SIGKILL)
        return code


def _signal_group(pgid: int, sig: int) -> None:
    """Signal the engine's whole process group (the engine was started as a session leader, so its
    pgid is its pid): vLLM's engine-core children go with it, even after the leader exited."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
