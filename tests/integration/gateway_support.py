"""Helpers for the gateway integration tests: a gateway agent subprocess, a steady OpenAI-client
load, polling with deadlines. Real Consul, real Envoy, SIMULATED engines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from agent.catalog.base import NotRegistered, Registration, Verdict, VerdictState
from agent.catalog.consul import ConsulCatalog
from agent.gateway.envoy import EnvoyAdmin
from agent.local.consul_dev import ConsulDev
from agent.local.ports import free_ports
from agent.sim.process import SimEngineProcess

REPO = Path(__file__).resolve().parents[2]
GATEWAY_START_TIMEOUT_S = 60.0  # a Python start on a loaded 2-core machine (imports alone took 12 s at load 50)
PASSING = Verdict(VerdictState.PASSING)


def wait_until(cond: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.02):
    """Poll `cond` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the condition may fail until the thing is up
            last_error = e
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout_s:g}s waiting for {what}"
                + (f" (last error: {last_error!r})" if last_error else "")
            )
        time.sleep(interval_s)


# --- engines ----------------------------------------------------------------------------------


class Engine:
    """A SIMULATED engine registered in Consul the way the engine agent would do it."""

    def __init__(
        self,
        catalog: ConsulCatalog,
        service: str,
        port: int,
        log_dir: Path,
        token_delay_ms: float,
        extra_args: tuple[str, ...] = (),
        model: str = "sim-model",
        max_model_len: int = 0,
    ):
        self.extra_args = extra_args
        self.model = model  # its served model name
        self.max_model_len = max_model_len  # registered (and served) when set
        self.catalog = catalog
        self.service = service
        self.port = port
        self.id = f"{service}-sim-{port}"
        self.log_dir = log_dir
        self.token_delay_ms = token_delay_ms
        self.proc: SimEngineProcess | None = None

    def start(self) -> Engine:
        self.proc = SimEngineProcess(
            self.port,
            name=self.id,
            model=self.model,
            token_delay_ms=self.token_delay_ms,
            log_path=str(self.log_dir / f"{self.id}.log"),
            extra_args=self.extra_args + (("--max-model-len", str(self.max_model_len)) if self.max_model_len else ()),
            allow_faults=True,  # the tests switch faults; the edge must keep /sim/fault out of reach
        ).start()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.is_running()

    def register(self, verdict: Verdict = PASSING) -> None:
        self.catalog.register(
            Registration(
                self.service,
                self.id,
                "127.0.0.1",
                self.port,
                meta={
                    "model": self.model,
                    "engine": "simulated",
                    **({"max_model_len": str(self.max_model_len)} if self.max_model_len else {}),
                },
                ttl_s=3600,
                deregister_critical_after_s=3600,
            ),
            verdict,
        )

    def set(self, state: VerdictState, reason: str = "test") -> None:
        self.catalog.set_verdict(self.id, Verdict(state, reason))

    def stats(self) -> dict:
        return self.proc.stats()

    def ensure_healthy(self) -> None:
        """Back to a running, passing, fault-free engine (the tests leave engines in any state)."""
        if not self.running:
            self.proc = None
            self.start()
        else:
            self.proc.set_fault("none")
        self.register(PASSING)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


# --- the gateway agent ---------------------------------------------------------------------------


# The key every test gateway accepts (a keys file, [edge] api_keys = <file>), and its header.
TEST_API_KEY = "sk-ernie-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
TEST_KEYS_FILE_TEXT = f'[keys.test]\nkey = "{TEST_API_KEY}"\n'  # an [edge] api_keys file accepting it


class Gateway:
    """`ernie-mesh gateway` as a subprocess with its own ports and run dir. It accepts
    TEST_API_KEY (named "test") unless extra_args choose other API keys."""

    def __init__(
        self, consul_address: str, service: str, run_dir: Path, name: str = "gw-test", extra_args: tuple[str, ...] = ()
    ):
        self.listen_port, self.admin_port, self.xds_port, self.metrics_port = free_ports(4)
        self.consul_address = consul_address
        self.service = service
        self.run_dir = run_dir
        self.name = name
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.log_path = run_dir / "agent.log"
        self.keys_file = run_dir.parent / f"{name}-api-keys.toml"
        self.admin = EnvoyAdmin(f"http://127.0.0.1:{self.admin_port}", timeout_s=2.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "agent",
            "gateway",
            "--name",
            self.name,
            "--consul",
            self.consul_address,
            "--service",
            self.service,
            "--listen",
            f"127.0.0.1:{self.listen_port}",
            "--envoy-admin",
            f"127.0.0.1:{self.admin_port}",
            "--xds",
            f"127.0.0.1:{self.xds_port}",
            "--metrics",
            f"127.0.0.1:{self.metrics_port}",
            "--run-dir",
            str(self.run_dir),
            "--envoy-concurrency",
            "1",
            *(() if "--api-keys" in self.extra_args else ("--api-keys", str(self.keys_file))),
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> Gateway:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.keys_file.exists():
            self.keys_file.write_text(TEST_KEYS_FILE_TEXT)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.pop("CONSUL_HTTP_ADDR", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if wait:
            self.wait_ready()
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = GATEWAY_START_TIMEOUT_S) -> None:
        def ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            # Envoy ready with endpoints, and both relays (the default) accepting
            return (
                self.admin.ready()
                and self.metric("ernie_gateway_xds_streams") >= 1
                and self.metric("ernie_gateway_relays_up") >= 2
            )

        wait_until(ready, timeout_s, f"gateway {self.name} ready")

    def envoy_pid(self) -> int | None:
        try:
            return json.loads((self.run_dir / "envoy.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None

    def metrics_text(self) -> str:
        return httpx.get(self.metrics_url, timeout=2.0).text

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample (`name{labels}`), 0 if absent."""
        key = f"{name}{{{labels}}}" if labels else name
        for line in self.metrics_text().splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == key:
                return float(value)
        return 0.0

    def endpoints(self, cluster: str = "ernie") -> dict[str, str]:
        """Envoy's view: instance ID -> health flags ('healthy', '/eds_status_draining', ...)."""
        return {k: v.get("health_flags", "") for k, v in self.admin.hosts(cluster).items()}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def cleanup(self) -> None:
        """Stop the agent and any Envoy it left behind (after a SIGKILL of the agent)."""
        self.terminate()
        pid = self.envoy_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone: the agent stopped it
        self.admin.close()


# --- a whole mesh of simulated engines ----------------------------------------------------------


class Mesh:
    """A real Consul dev agent, SIMULATED engines registered as passing, one gateway (+ Envoy, relays)."""

    def __init__(self, consul: ConsulDev, catalog: ConsulCatalog, engines: list[Engine], gateway: Gateway):
        self.consul, self.catalog, self.engines, self.gateway = consul, catalog, engines, gateway

    def healthy_in_envoy(self) -> bool:
        eps = self.gateway.endpoints()
        return sorted(eps) == sorted(e.id for e in self.engines) and all(v == "healthy" for v in eps.values())

    def reset(self) -> None:
        """Every engine running, passing, fault-free, healthy in Envoy. An engine that was killed is
        first removed (as its engine agent would) so that Envoy forgets its ejection."""
        for e in self.engines:
            if not e.running:
                try:
                    e.set(VerdictState.CRITICAL, "process exited")
                except NotRegistered:
                    pass  # deregistered by the test (drain): already out of envoy
                wait_until(lambda e=e: e.id not in self.gateway.endpoints(), 5, f"{e.id} removed from envoy")
            e.ensure_healthy()
        wait_until(self.healthy_in_envoy, 10, f"{len(self.engines)} healthy endpoints in envoy")

    def busiest(self) -> Engine:
        """The engine with the most requests in flight now (where a kill hurts most)."""
        return max((e for e in self.engines if e.running), key=lambda e: e.stats()["in_flight"])


@contextlib.contextmanager
def sim_mesh(
    root: Path, node: str, service: str, token_delay_ms: float, engines: int = 3, engine_args: tuple[str, ...] = ()
) -> Iterator[Mesh]:
    """A Mesh for a test module, stopped (gateway, engines, Consul) whatever happens."""
    (root / "consul").mkdir()
    consul = ConsulDev(node=node, data_dir=str(root / "consul")).start()
    catalog = ConsulCatalog(consul.address)
    started: list[Engine] = []
    gateway = None
    try:
        for port in free_ports(engines):
            started.append(Engine(catalog, service, port, root, token_delay_ms, extra_args=engine_args).start())
            started[-1].register()
        gateway = Gateway(consul.address, service, root / "gw").start()
        m = Mesh(consul, catalog, started, gateway)
        wait_until(m.healthy_in_envoy, 10, f"{engines} healthy endpoints in envoy")
        yield m
    finally:
        if gateway is not None:
            gateway.cleanup()
        for e in started:
            e.stop()
        consul.stop()


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Result:
    started: float
    ended: float
    ok: bool
    status: int = 200
    instance: str = ""
    error: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    usage_tokens: int | None = None


@dataclass
class Load:
    """`clients` threads, each with its own official OpenAI client, sending requests back to back."""

    base_url: str
    clients: int = 10
    stream: bool = False
    max_tokens: int = 10
    timeout_s: float = 30.0
    model: str = "sim-model"
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Result]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        return self.results

    def _run(self) -> None:
        client = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=self.timeout_s
        )
        try:
            n = 0
            while not self._stop.is_set():
                n += 1
                r = self.one(client, session=f"{threading.current_thread().name}-{n}")
                with self._lock:
                    self.results.append(r)
        finally:
            client.close()

    def one(self, client: openai.OpenAI, session: str = "") -> Result:
        """One request; each its own conversation (x-session-id), as many users' requests are: the
        gateway's affinity routing spreads them over the instances."""
        started = time.monotonic()
        kwargs = dict(
            model=self.model,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=self.max_tokens,
            extra_body={"ignore_eos": True},
            extra_headers={"x-session-id": session} if session else None,
        )
        try:
            if self.stream:
                raw = client.chat.completions.with_raw_response.create(
                    stream=True, stream_options={"include_usage": True}, **kwargs
                )
                instance = raw.headers.get("x-ernie-instance", "")
                tokens, finish, usage = 0, None, None
                for chunk in raw.parse():
                    for choice in chunk.choices:
                        if choice.delta.content:
                            tokens += 1
                        if choice.finish_reason:
                            finish = choice.finish_reason
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                ok = finish == "length" and tokens == self.max_tokens and usage == self.max_tokens
                return Result(
                    started, time.monotonic(), ok, 200, instance, "" if ok else "truncated", tokens, finish, usage
                )
            raw = client.chat.completions.with_raw_response.create(**kwargs)
            resp = raw.parse()
            finish = resp.choices[0].finish_reason
            usage = resp.usage.completion_tokens if resp.usage else None
            ok = finish == "length" and usage == self.max_tokens
            return Result(
                started,
                time.monotonic(),
                ok,
                raw.status_code,
                raw.headers.get("x-ernie-instance", ""),
                "" if ok else "incomplete",
                usage or 0,
                finish,
                usage,
            )
        except openai.APIStatusError as e:
            return Result(
                started,
                time.monotonic(),
                False,
                e.status_code,
                e.response.headers.get("x-ernie-instance", ""),
                f"{e.status_code}: {e.message}",
            )
        except openai.APIError as e:  # connection errors, timeouts, broken streams
            return Result(started, time.monotonic(), False, 0, "", f"{type(e).__name__}: {e}")

    # --- views on the results -------------------------------------------------------------------

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for_more(self, n: int, timeout_s: float = 30.0) -> None:
        """Let at least n more requests complete (steady load observed, no fixed sleep)."""
        target = self.count() + n
        wait_until(lambda: self.count() >= target, timeout_s, f"{n} more completed requests")


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if not r.ok]


def describe(results: list[Result], limit: int = 5) -> str:
    bad = failures(results)
    return f"{len(bad)} of {len(results)} failed; first: " + "; ".join(r.error for r in bad[:limit])
