#!/usr/bin/env python3
"""Measure a real vLLM (CPU build) server the way the engine agent runs it; prints JSON facts.

    python scripts/vllm_probe.py startup|load|stop|term [--model DIR] [--port 8101]

Each experiment starts its own engine and stops it (whole process tree) before returning.
Loopback only; request loops are bounded. Results feed docs/vllm-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.engine.cpu import VLLM_CPU_ENV  # noqa: E402
from agent.model import SERVED_MODEL_NAME, default_model_dir  # noqa: E402

BASE_ARGS = [
    "--served-model-name",
    SERVED_MODEL_NAME,
    "--host",
    "127.0.0.1",
    "--enforce-eager",
    "--gpu-memory-utilization",
    "0.3",
    "--max-model-len",
    "2048",
]
START_DEADLINE_S = 300


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fact(name: str, value) -> None:
    print(json.dumps({name: value}), flush=True)


class Engine:
    def __init__(self, model: Path, port: int, extra: list[str], logfile: Path, env_extra: dict | None = None):
        env_extra = env_extra or {}
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        env = {**os.environ, **VLLM_CPU_ENV, **env_extra}
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--port",
            str(port),
            *BASE_ARGS,
            *extra,
        ]
        self.t0 = time.monotonic()
        self.logf = open(logfile, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def wait_ready(self) -> dict:
        t_health = None
        while time.monotonic() - self.t0 < START_DEADLINE_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}")
            try:
                if t_health is None and self.client.get("/health", timeout=2).status_code == 200:
                    t_health = time.monotonic() - self.t0
                if t_health is not None:
                    r = complete(self, "Hello", 1)
                    if r.status_code == 200:
                        return {
                            "health_200_s": round(t_health, 1),
                            "first_completion_s": round(time.monotonic() - self.t0, 1),
                        }
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError("engine not ready in time")

    def tree(self) -> list[dict]:
        root = psutil.Process(self.proc.pid)
        out = []
        for p in [root, *root.children(recursive=True)]:
            try:
                out.append(
                    {
                        "pid": p.pid,
                        "ppid": p.ppid(),
                        "name": p.name(),
                        "cmdline": " ".join(p.cmdline())[:120],
                        "rss_mb": round(p.memory_info().rss / 2**20),
                    }
                )
            except psutil.NoSuchProcess:
                pass
        return out

    def find(self, title: str) -> psutil.Process:
        """A child by process title, e.g. VLLM::EngineCore (psutil name() is the title, cmdline too)."""
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            if title in p.name() or title in " ".join(p.cmdline()):
                return p
        raise LookupError(title)

    def stop(self) -> None:
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            p.kill()
        self.logf.close()


def complete(eng: Engine, prompt: str, max_tokens: int, timeout: float = 30, **extra) -> httpx.Response:
    body = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return eng.client.post("/v1/completions", json=body, timeout=timeout)


def canary_s(eng: Engine, deadline_s: float = 30) -> float | None:
    t = time.monotonic()
    try:
        r = complete(eng, "Hi", 1, timeout=deadline_s)
    except httpx.TimeoutException:
        return None
    return round(time.monotonic() - t, 3) if r.status_code == 200 else None


def metrics(eng: Engine, timeout: float = 5) -> dict[str, float]:
    text = eng.client.get("/metrics", timeout=timeout).text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(vllm:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric(ms: dict[str, float], name: str) -> float:
    return sum(v for k, v in ms.items() if k == name or k.startswith(name + "{"))


class Stream(threading.Thread):
    """One streaming /v1/completions request; records chunks, finish_reason, errors."""

    def __init__(self, eng: Engine, max_tokens: int, prompt: str = "Once upon a time"):
        super().__init__(daemon=True)
        self.eng, self.max_tokens, self.prompt = eng, max_tokens, prompt
        self.tokens, self.finish, self.error, self.status, self.done_at = 0, None, None, None, None
        self.text, self.error_event, self.done_marker = "", None, False

    def run(self) -> None:
        body = {
            "model": SERVED_MODEL_NAME,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        try:
            with httpx.stream("POST", self.eng.url + "/v1/completions", json=body, timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done_marker = True
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error_event = json.dumps(chunk["error"])[:200]
                    for c in chunk.get("choices", []):
                        if c.get("text"):
                            self.tokens += 1
                            self.text += c["text"]
                        if c.get("finish_reason"):
                            self.finish = c["finish_reason"]
        except Exception as e:  # the point is to record what a client sees
            self.error = f"{type(e).__name__}: {e}"
        self.done_at = time.monotonic()

    def summary(self) -> dict:
        return {
            "status": self.status,
            "chunks_with_text": self.tokens,
            "finish_reason": self.finish,
            "error": self.error,
            "error_event": self.error_event,
            "done_marker": self.done_marker,
        }


# -- experiments ----------------------------------------------------------------------------------


def exp_startup(eng: Engine) -> None:
    fact("startup", eng.wait_ready())
    time.sleep(1)
    fact("process_tree", eng.tree())
    from openai import OpenAI

    client = OpenAI(base_url=eng.url + "/v1", api_key="none")
    t = time.monotonic()
    r = client.chat.completions.create(
        model=SERVED_MODEL_NAME,
        max_tokens=60,
        temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    fact(
        "chat",
        {
            "answer": r.choices[0].message.content,
            "finish_reason": r.choices[0].finish_reason,
            "usage": r.usage.model_dump(),
            "seconds": round(time.monotonic() - t, 2),
        },
    )
    r = complete(eng, "The capital of France is", 20, ignore_eos=True)
    j = r.json()
    fact(
        "ignore_eos_completions",
        {
            "status": r.status_code,
            "completion_tokens": j["usage"]["completion_tokens"],
            "finish_reason": j["choices"][0]["finish_reason"],
        },
    )
    r = complete(eng, "Count: 1, 2, 3,", 64, ignore_eos=True, stop=None)
    fact("ignore_eos_64", {"completion_tokens": r.json()["usage"]["completion_tokens"]})
    s = Stream(eng, 50)
    s.run()
    fact("ignore_eos_stream_50", s.summary())
    r = eng.client.post("/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 1})
    fact("unknown_model", {"status": r.status_code, "body": r.text[:200]})
    r = eng.client.post("/v1/completions", json={"model": SERVED_MODEL_NAME, "prompt": "x", "max_tokens": 5000})
    fact("too_long", {"status": r.status_code, "body": r.text[:200]})


def exp_load(eng: Engine) -> None:
    eng.wait_ready()
    idle = [canary_s(eng) for _ in range(7)]
    fact("canary_idle_s", {"samples": idle, "median": statistics.median(x for x in idle if x)})
    single = Stream(eng, 100)
    t = time.monotonic()
    single.run()
    fact("single_stream_100_tokens", {"seconds": round(time.monotonic() - t, 2), **single.summary()})
    m0 = metrics(eng)
    streams = [Stream(eng, 200, prompt=f"Story number {i}:") for i in range(8)]
    t = time.monotonic()
    for s in streams:
        s.start()
    time.sleep(3)
    busy, samples = [], []
    for _ in range(5):
        busy.append(canary_s(eng))
        ms = metrics(eng)
        samples.append(
            {
                "running": metric(ms, "vllm:num_requests_running"),
                "waiting": metric(ms, "vllm:num_requests_waiting"),
                "kv_cache_usage_perc": metric(ms, "vllm:kv_cache_usage_perc"),
            }
        )
    for s in streams:
        s.join(300)
    dt = time.monotonic() - t
    m1 = metrics(eng)
    gen = metric(m1, "vllm:generation_tokens_total") - metric(m0, "vllm:generation_tokens_total")
    fact("canary_with_8_streams_s", {"samples": busy, "median": statistics.median(x for x in busy if x)})
    fact("metrics_under_8_streams", samples)
    fact(
        "eight_streams_200_tokens",
        {
            "seconds": round(dt, 1),
            "generated": gen,
            "aggregate_tok_s": round(gen / dt, 1),
            "results": [s.summary() for s in streams],
        },
    )
    ttft = metric(m1, "vllm:time_to_first_token_seconds_sum") / max(
        1, metric(m1, "vllm:time_to_first_token_seconds_count")
    )
    itl = metric(m1, "vllm:inter_token_latency_seconds_sum") / max(
        1, metric(m1, "vllm:inter_token_latency_seconds_count")
    )
    fact("histogram_means", {"ttft_s": round(ttft, 3), "itl_s": round(itl, 4)})


def _hang(eng: Engine, title: str) -> None:
    target = eng.find(title)
    streams = [Stream(eng, 200, prompt=f"Tale {i}:") for i in range(2)]
    for s in streams:
        s.start()
    time.sleep(3)
    before = metrics(eng)
    target.send_signal(signal.SIGSTOP)
    log(f"SIGSTOP {title} pid {target.pid}")
    time.sleep(2)
    m1 = metrics(eng)
    time.sleep(5)
    t = time.monotonic()
    h = eng.client.get("/health", timeout=10)
    health = {"status": h.status_code, "seconds": round(time.monotonic() - t, 3)}
    t = time.monotonic()
    m2 = metrics(eng)
    metrics_s = round(time.monotonic() - t, 3)
    can = canary_s(eng, deadline_s=5)
    tokens_during = [s.tokens for s in streams]
    time.sleep(3)
    tokens_after = [s.tokens for s in streams]
    fact(
        f"sigstop_{title}",
        {
            "pid": target.pid,
            "health": health,
            "metrics_answer_s": metrics_s,
            "running_before": metric(before, "vllm:num_requests_running"),
            "running_stopped": metric(m2, "vllm:num_requests_running"),
            "gen_tokens_2s_after_stop": metric(m1, "vllm:generation_tokens_total"),
            "gen_tokens_7s_after_stop": metric(m2, "vllm:generation_tokens_total"),
            "canary_5s_deadline": can,
            "client_chunks_then_3s_later": [tokens_during, tokens_after],
        },
    )
    target.send_signal(signal.SIGCONT)
    t = time.monotonic()
    can = None
    while can is None and time.monotonic() - t < 60:
        can = canary_s(eng, deadline_s=10)
    rec = round(time.monotonic() - t, 2)
    for s in streams:
        s.join(120)
    fact(f"sigcont_{title}", {"canary_ok_after_s": rec, "canary_s": can, "streams": [s.summary() for s in streams]})


def exp_stop(eng: Engine) -> None:
    eng.wait_ready()
    _hang(eng, "VLLM::EngineCore")
    _hang(eng, "VLLM::Worker")


def exp_term(eng: Engine, label: str, stream: bool = True, probe: bool = True, wait_s: float = 90) -> None:
    eng.wait_ready()
    pids = [p["pid"] for p in eng.tree()]
    s = Stream(eng, 200)
    if stream:
        s.start()
        time.sleep(3)
    t_term = time.monotonic()
    eng.proc.send_signal(signal.SIGTERM)
    log(f"SIGTERM api server ({label})")
    probes = []
    while eng.proc.poll() is None and time.monotonic() - t_term < wait_s:
        if not probe:
            time.sleep(0.1)
            continue
        t = round(time.monotonic() - t_term, 1)
        row = {"t": t}
        try:
            row["completion"] = complete(eng, "Hi", 1, timeout=5).status_code
        except httpx.HTTPError as e:
            row["completion"] = type(e).__name__
        try:
            row["health"] = eng.client.get("/health", timeout=2).status_code
        except httpx.HTTPError as e:
            row["health"] = type(e).__name__
        probes.append(row)
        time.sleep(0.5)
    exit_s = round(time.monotonic() - t_term, 1)
    if stream:
        s.join(30)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    stream_done = round(s.done_at - t_term, 1) if s.done_at else None
    fact(
        f"sigterm_{label}",
        {
            "stream": s.summary() if stream else None,
            "stream_ended_after_term_s": stream_done,
            "stream_text_tail": s.text[-60:],
            "api_exit_after_term_s": exit_s,
            "returncode": eng.proc.returncode,
            "children_alive": alive,
            "probes_during_shutdown": _compress(probes),
        },
    )


def _compress(rows: list[dict]) -> list[dict]:
    """Consecutive identical probe outcomes as one row with the first and last time."""
    out: list[dict] = []
    for r in rows:
        key = {k: v for k, v in r.items() if k != "t"}
        if out and {k: v for k, v in out[-1].items() if k not in ("t", "until")} == key:
            out[-1]["until"] = r["t"]
        else:
            out.append(dict(r))
    return out


def exp_misc(eng: Engine) -> None:
    eng.wait_ready()
    fact(
        "memory_mb",
        [
            {
                "name": p.name(),
                "rss": round(p.memory_info().rss / 2**20),
                "pss": round(p.memory_full_info().pss / 2**20),
                "uss": round(p.memory_full_info().uss / 2**20),
            }
            for p in [psutil.Process(eng.proc.pid), *psutil.Process(eng.proc.pid).children(recursive=True)]
        ],
    )
    fact(
        "cpu_affinity",
        {
            p.name(): p.cpu_affinity()
            for p in [psutil.Process(eng.proc.pid), *psutil.Process(eng.proc.pid).children(recursive=True)]
        },
    )
    body = {
        "model": SERVED_MODEL_NAME,
        "prompt": "Once",
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    usage, chunks, empty = None, 0, 0
    with httpx.stream("POST", eng.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])
                if c.get("usage"):
                    usage = c["usage"]
                for ch in c.get("choices", []):
                    chunks += 1
                    empty += not ch.get("text")
    fact("stream_200_include_usage", {"usage": usage, "chunks": chunks, "chunks_with_empty_text": empty})
    r = eng.client.post(
        "/v1/chat/completions",
        json={
            "model": SERVED_MODEL_NAME,
            "max_tokens": 30,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Say hi"}],
        },
        timeout=60,
    )
    fact("chat_ignore_eos_30", {"status": r.status_code, "usage": r.json().get("usage")})


def exp_dead(eng: Engine, label: str) -> None:
    """What /health and the process do when the engine core dies, or a worker hangs past its timeout."""
    eng.wait_ready()
    s = Stream(eng, 200)
    s.start()
    time.sleep(3)
    target = eng.find("VLLM::EngineCore" if label == "kill_enginecore" else "VLLM::Worker")
    target.send_signal(signal.SIGKILL if label == "kill_enginecore" else signal.SIGSTOP)
    t0 = time.monotonic()
    log(f"{label}: signalled pid {target.pid}")
    rows = []
    while time.monotonic() - t0 < 60 and eng.proc.poll() is None:
        row = {"t": round(time.monotonic() - t0, 1)}
        for path in ("/health", "/metrics"):
            try:
                row[path] = eng.client.get(path, timeout=3).status_code
            except httpx.HTTPError as e:
                row[path] = type(e).__name__
        try:
            row["completion"] = complete(eng, "Hi", 1, timeout=3).status_code
        except httpx.HTTPError as e:
            row["completion"] = type(e).__name__
        rows.append(row)
        time.sleep(1)
    s.join(10)
    fact(
        f"dead_{label}",
        {
            "api_exited_after_s": round(time.monotonic() - t0, 1) if eng.proc.poll() is not None else None,
            "returncode": eng.proc.returncode,
            "stream": s.summary(),
            "probes": _compress(rows),
        },
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=["startup", "load", "stop", "term", "misc", "dead"])
    ap.add_argument("--model", type=Path, default=default_model_dir())
    ap.add_argument("--port", type=int, default=8101)
    ap.add_argument("--logdir", type=Path, default=Path("/tmp"))
    ap.add_argument("--only", default=None, help="term/dead: run only this variant")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the engine's environment")
    a = ap.parse_args()
    t30 = ["--shutdown-timeout", "30"]
    term_runs = {  # label: (extra args, kwargs)
        "default": ([], {}),
        "default_no_probes": ([], {"probe": False, "wait_s": 40}),
        "shutdown_timeout_30": (t30, {}),
        "idle_default": ([], {"stream": False}),
        "idle_shutdown_timeout_30": (t30, {"stream": False}),
    }
    dead_runs = {"kill_enginecore": ([], {}), "stop_worker_execute_timeout_10": ([], {})}
    if a.experiment in ("term", "dead"):
        runs = [(k, *v) for k, v in (term_runs if a.experiment == "term" else dead_runs).items() if a.only in (None, k)]
    else:
        runs = [(a.experiment, [], {})]
    for label, extra, kwargs in runs:
        env_extra = dict(e.split("=", 1) for e in a.env)
        if label == "stop_worker_execute_timeout_10":
            env_extra["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] = "10"
        eng = Engine(a.model, a.port, extra, a.logdir / f"vllm-probe-{a.experiment}-{label}.log", env_extra)
        try:
            if a.experiment == "term":
                exp_term(eng, label, **kwargs)
            elif a.experiment == "dead":
                exp_dead(eng, label)
            else:
                {"startup": exp_startup, "load": exp_load, "stop": exp_stop, "misc": exp_misc}[a.experiment](eng)
        finally:
            eng.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
