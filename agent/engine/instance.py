"""One engine instance under the agent: facts -> verdict -> Consul, a canary loop, and drain.

reconcile_once() reads the facts once, decides (verdict.decide is pure), acts on the catalog and
returns a one-line summary; run() wraps it in a loop that survives every error and wakes early on
change or shutdown (docs/architecture.md §7.4)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any

import httpx

from agent.catalog.base import (
    Catalog,
    Registration,
    Verdict,
    VerdictCause,
    VerdictState,
)
from agent.catalog.keeper import OWNER_META
from agent.config import ConfigError
from agent.engine.config import EngineAgentConfig, EngineSpec
from agent.engine.drain import DrainWatch
from agent.engine.metrics import EngineAgentMetrics, cause_label
from agent.engine.probe import EngineLoad, EngineProbe, Identity, ProbeResult
from agent.engine.procfs import TreeSample, read_tree
from agent.engine.progress import WorkerWatch, observe
from agent.engine.publisher import Publisher
from agent.engine.supervisor import EngineProcess
from agent.engine.verdict import CanaryFacts, Facts, Policy, decide
from agent.secret_files import read_secret

log = logging.getLogger(__name__)


class KeyFile:
    """The first key of engine_api_key_file, re-read when the file changes ("" without a file, or
    while it cannot be read: said once in the log)."""

    def __init__(self, path: str):
        self.path = path
        self._stamp: float | None = None
        self._key = ""
        self._error = ""

    def first(self) -> str:
        if not self.path:
            return ""
        try:
            stamp = os.stat(self.path).st_mtime
            if stamp != self._stamp:
                self._key, self._stamp, self._error = read_secret(self.path, "engine_api_key_file"), stamp, ""
        except (OSError, ConfigError) as e:
            if str(e) != self._error:
                log.error("%s; the probes keep the last key read", e)
            self._error = str(e)
        return self._key


DRAIN_POLL_S = 0.2
DRAIN_REPORT_S = 30.0  # while requests still arrive during a drain, say so this often


@dataclasses.dataclass
class CanaryState:
    ever_succeeded: bool = False
    last_ok: bool | None = None
    last_error: str = ""
    last_latency_s: float | None = None
    progress_during_failure: bool = False
    others_in_flight: int = 0
    timed_out: bool = False
    metrics_read: bool = True
    consecutive_failures: int = 0
    generation: int = 0  # the engine start this state belongs to

    def facts(self) -> CanaryFacts:
        return CanaryFacts(
            self.ever_succeeded,
            self.last_ok,
            self.last_error,
            self.last_latency_s,
            self.progress_during_failure,
            self.others_in_flight,
            self.timed_out,
            self.metrics_read,
            self.consecutive_failures,
        )


class InstanceController:
    def __init__(
        self,
        cfg: EngineAgentConfig,
        spec: EngineSpec,
        catalog: Catalog,
        client: httpx.AsyncClient,
        metrics: EngineAgentMetrics,
    ):
        self.cfg = cfg
        self.spec = spec
        self.catalog = catalog
        self.metrics = metrics
        self.id = cfg.instance_id(spec)
        self.process = (
            EngineProcess(spec, cfg, self.id, on_restart=lambda: self.metrics.restarts.labels(self.id).inc())
            if spec.supervised
            else None
        )
        # The engine's API key: the one a supervised engine was started with; an attached engine's is
        # the file's first key (its operator gave the engine the same file).
        self._key_file = KeyFile(cfg.engine_api_key_file)
        self.probe = EngineProbe(spec.base_url, client, api_key=self._api_key)
        self.policy = Policy(
            cfg.stall_after_s, cfg.startup_timeout_s, cfg.canary_timeout_s, hang_after_s=cfg.hang_after_s
        )
        self.attached_at_s = time.monotonic()
        self.canary = CanaryState()
        self.identity: Identity | None = None
        self.load: EngineLoad | None = None
        self.health_ok: bool | None = None
        self.health_error = ""
        self._last_tokens: float | None = None
        self._last_progress_s = time.monotonic()
        self._health_failures = 0
        # Since when the engine owes us a canary token: the first of a run of canaries that got no answer
        # (in flight, or timed out and retried at once), cleared by any answer.
        self._canary_owed_since_s: float | None = None
        self._requests_seen_since_s: float | None = None  # vLLM has counted requests in flight since then
        self._worker: WorkerWatch | None = None
        self.process_sample: TreeSample | None = None  # the last /proc sample (resources.py exports it)
        self.verdict = Verdict(VerdictState.STARTING, "agent starting", VerdictCause.SPAWNING)
        # The one writer of this instance's Consul state (run loop, canary via the run loop, drain).
        self.publisher = Publisher(
            catalog,
            self.id,
            cfg.ttl_s,
            on_error=lambda: self.metrics.consul_errors.labels(self.id).inc(),
            refresh_s=cfg.ttl_refresh_s,
        )
        self.draining = False
        self.drained = False
        self._drain_task: asyncio.Task[str] | None = None
        self._served_generation: int | None = None  # the engine start that last had a passing verdict
        self._abandoned_canaries = 0
        self.wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def _api_key(self) -> str:
        return self.process.api_key if self.process else self._key_file.first()

    # --- facts ------------------------------------------------------------------------------------

    def _engine_generation(self) -> int:
        return self.process.generation if self.process else 0

    def _started_at(self) -> float:
        return self.process.started_at_s if self.process else self.attached_at_s

    def served_model_name(self) -> str:
        if self.spec.served_model_name:
            return self.spec.served_model_name
        if self.identity and self.identity.served_model_name:
            return self.identity.served_model_name
        return self.spec.model

    def _track_progress(self, load: EngineLoad | None, now: float) -> float:
        """Seconds that requests have been running without a single new token (0 when idle/progressing)."""
        if load is None:
            return 0.0
        progressed = self._last_tokens is None or load.tokens_processed > self._last_tokens
        self._last_tokens = load.tokens_processed
        if load.running + load.waiting == 0:
            self._abandoned_canaries = 0
        if progressed or load.running + load.waiting == 0:
            self._last_progress_s = now
            return 0.0
        return now - self._last_progress_s

    def _work_since(self, load: EngineLoad | None, now: float) -> float | None:
        """Since when something is in flight on the engine: requests vLLM counts, or our own canary."""
        if load is None:
            pass  # /metrics unreadable: keep what we knew
        elif load.running + load.waiting > 0:
            if self._requests_seen_since_s is None:
                self._requests_seen_since_s = now
        else:
            self._requests_seen_since_s = None
        starts = [t for t in (self._requests_seen_since_s, self._canary_owed_since_s) if t is not None]
        return min(starts) if starts else None

    async def _sample_processes(self) -> tuple[TreeSample | None, float]:
        """The supervised engine's process tree from /proc (None: attached, or not running)."""
        pid = self.process.pid if self.process else None
        sample = None if pid is None else await asyncio.to_thread(read_tree, pid)
        self.process_sample = sample
        return sample, time.monotonic()

    async def collect(self) -> Facts:
        if self.canary.generation != self._engine_generation():
            self.canary = CanaryState(generation=self._engine_generation())
            self.identity = None
            self._last_tokens = None
            self._worker = None
            self._health_failures = 0
        running_proc = self.process is None or self.process.running
        sample, sampled_at = await self._sample_processes()
        health = load = None
        if sample is not None and sample.root is not None and sample.root.stopped:
            pass  # a stopped API server cannot answer: no HTTP probe, its last answers stand (not new failures)
        elif running_proc:
            health, load = await asyncio.gather(
                self.probe.health(self.cfg.health_timeout_s),
                self.probe.load(self.cfg.health_timeout_s),
            )
            self.metrics.probe_duration.labels(self.id, "health").observe(health.latency_s)
            self.health_ok, self.health_error = health.ok, health.error
            self._health_failures = 0 if health.ok else self._health_failures + 1
        if not running_proc:
            self.health_ok, self.health_error, self._health_failures = None, "", 0
        now = time.monotonic()
        self._worker = (
            None if sample is None else observe(self._worker, sample, sampled_at, self._work_since(load, now))
        )
        self.load = load
        stalled = self._track_progress(load, now)
        if load is not None:
            self.metrics.requests_running.labels(self.id).set(load.running)
            self.metrics.requests_waiting.labels(self.id).set(load.waiting)
        if self.health_ok and self.identity is None:
            self.identity = await self.probe.identity(self.cfg.health_timeout_s)
        return Facts(
            now_s=now,
            started_at_s=self._started_at(),
            process=self.process.facts(now) if self.process else None,
            health_ok=self.health_ok,
            health_error=self.health_error,
            running=None if load is None else load.running,
            waiting=None if load is None else load.waiting,
            stalled_for_s=stalled,
            canary=self.canary.facts(),
            draining=self.draining,
            health_failures=self._health_failures,
            worker=self._worker.facts() if self._worker else None,
        )

    # --- catalog ----------------------------------------------------------------------------------

    def registration(self) -> Registration:
        ident = self.identity or Identity()
        model = self.spec.model or ident.model or self.served_model_name()
        served = self.served_model_name() or model
        meta = {
            "model": model[-512:],
            "served_model_name": served,
            "max_model_len": str(self.spec.max_model_len or ident.max_model_len or ""),
            "engine": "simulated" if self.spec.kind == "simulated" else "vllm",
            "engine_version": ident.engine_version,
            "engine_url": self.spec.base_url,
            "zone": self.cfg.zone,
            "node": self.cfg.node,
            "agent_url": self.cfg.agent_url,
            OWNER_META: self.cfg.agent_id,
        }
        tags = (f"model={served}", f"zone={self.cfg.zone}", *self.cfg.tags)
        return Registration(
            service=self.cfg.consul.service,
            instance_id=self.id,
            address=self.cfg.engine_address(self.spec),
            port=self.spec.port,
            meta={k: v for k, v in meta.items() if v != ""},
            tags=tuple(dict.fromkeys(tags)),
            ttl_s=self.cfg.ttl_s,
            deregister_critical_after_s=self.cfg.deregister_critical_after_s,
        )

    @property
    def consul_ok(self) -> bool | None:
        return self.publisher.ok

    async def publish(self, verdict: Verdict, now: float) -> str:
        """Make Consul hold our registration and verdict, through the instance's one writer."""
        return await self.publisher.publish(self.registration(), verdict, now)

    # --- loop -------------------------------------------------------------------------------------

    def _set_verdict(self, verdict: Verdict) -> None:
        old = self.verdict
        self.verdict = verdict
        if verdict.state is VerdictState.PASSING:
            self._served_generation = self._engine_generation()
        if verdict.state != old.state or (verdict.state is VerdictState.CRITICAL and verdict != old):
            log.log(
                logging.WARNING if verdict.state is VerdictState.CRITICAL else logging.INFO,
                "%s: %s -> %s",
                self.id,
                old.note,
                verdict.note,
            )
            if verdict.state is VerdictState.CRITICAL and old.state is not VerdictState.CRITICAL:
                self.metrics.critical.labels(self.id, cause_label(verdict)).inc()
        self.metrics.set_verdict(self.id, verdict.state)

    async def reconcile_once(self) -> str:
        facts = await self.collect()
        self._set_verdict(decide(facts, self.policy))
        action = await self.publish(self.verdict, time.monotonic())
        return f"{self.id}: {self.verdict.note} [{action}]"

    async def _ttl_loop(self) -> None:
        """Keep the TTL check fresh from its own task: a slow probe cycle (probe timeouts of seconds,
        a Consul write timing out) must not let a healthy instance's check expire. A refresh every
        ttl_refresh_s after the last write (one that took long is followed by the next at once);
        after a failed write, or before the run loop registered, again in ttl_refresh_s."""
        while not self._stopping.is_set() and not self.drained:
            try:
                await self.publisher.refresh(time.monotonic())
            except Exception:  # the loop must survive anything
                log.exception("%s: TTL refresh failed", self.id)
            if self.publisher.ok is False or not self.publisher.registered:
                pause = self.cfg.ttl_refresh_s  # retry soon, not in a busy loop
            else:
                pause = self.publisher.refresh_due_in(time.monotonic())
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=pause)
            except TimeoutError:
                pass

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._canary_loop(), name=f"canary {self.id}"),
            asyncio.create_task(self._ttl_loop(), name=f"ttl {self.id}"),
        ]
        if self.process:
            tasks.append(asyncio.create_task(self.process.run(), name=f"process {self.id}"))
        last = ""
        try:
            while not self._stopping.is_set() and not self.drained:
                cycle_started = time.monotonic()
                try:
                    summary = await self.reconcile_once()
                except Exception:  # the loop must survive anything; the next cycle re-reads the facts
                    log.exception("%s: reconcile failed", self.id)
                    summary = ""
                if summary and summary != last and not summary.endswith("[unchanged]"):
                    log.debug("%s", summary)
                    last = summary
                self.wake.clear()
                # A fixed period (not a pause after each cycle): slow probes under load must not stretch
                # the sampling that the hang verdict's timing rests on (Policy.hang_after_s).
                pause = self.cfg.probe_interval_s - (time.monotonic() - cycle_started)
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=max(pause, 0.0))
                except TimeoutError:
                    pass
        finally:
            self._stopping.set()
            for t in tasks:
                if t.get_name().startswith(("canary", "ttl")):
                    t.cancel()
            if self.process and not self.drained:
                await self.process.stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _canary_loop(self) -> None:
        while not self._stopping.is_set():
            if not self.draining and self.health_ok and (self.process is None or self.process.running):
                generation = self._engine_generation()
                res = None
                try:
                    res = await self._canary_once()
                except Exception as e:  # the loop must survive anything; a frozen last result would lie
                    log.exception("%s: canary failed unexpectedly", self.id)
                    self._canary_owed_since_s = None
                    self._record_canary(
                        ProbeResult(False, 0.0, f"canary probe failed: {type(e).__name__}: {e}"), generation
                    )
                if res is not None and res.timed_out and res.latency_s >= self.cfg.canary_interval_s:
                    continue  # it waited longer than an interval already: ask again at once, still owed
            else:
                self._canary_owed_since_s = None
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.cfg.canary_interval_s)
            except TimeoutError:
                pass

    async def _canary_once(self) -> ProbeResult:
        generation = self._engine_generation()
        before = await self.probe.load(self.cfg.health_timeout_s)
        if self._canary_owed_since_s is None:
            self._canary_owed_since_s = time.monotonic()
        res = await self.probe.canary(self.served_model_name(), self.cfg.canary_prompt, self.cfg.canary_timeout_s)
        if not res.timed_out or generation != self._engine_generation():
            self._canary_owed_since_s = None
        self.metrics.probe_duration.labels(self.id, "canary").observe(res.latency_s)
        progress, others, metrics_read = False, 0, True
        if not res.ok:
            after = await self.probe.load(self.cfg.health_timeout_s)
            metrics_read = before is not None and after is not None
            progress = bool(before and after and after.tokens_processed > before.tokens_processed)
            # Canaries we gave up on may still be counted by the engine until it gets to abort them.
            others = max(int(before.running + before.waiting) - self._abandoned_canaries, 0) if before else 0
            self._abandoned_canaries += 1
        else:
            self._abandoned_canaries = 0
        self._record_canary(res, generation, progress, others, metrics_read)
        return res

    def _record_canary(
        self, res: ProbeResult, generation: int, progress: bool = False, others: int = 0, metrics_read: bool = False
    ) -> None:
        if generation != self._engine_generation():
            return  # the engine restarted meanwhile: this result is about a process that is gone
        if not res.ok:
            self.metrics.canary_failures.labels(self.id).inc()
        changed = self.canary.last_ok != res.ok
        self.canary = dataclasses.replace(
            self.canary,
            ever_succeeded=self.canary.ever_succeeded or res.ok,
            last_ok=res.ok,
            last_error=res.error,
            last_latency_s=res.latency_s,
            progress_during_failure=progress,
            others_in_flight=others,
            timed_out=res.timed_out,
            metrics_read=metrics_read,
            consecutive_failures=0 if res.ok else self.canary.consecutive_failures + 1,
            generation=generation,
        )
        if changed or not res.ok:
            self.wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self.wake.set()

    # --- drain ------------------------------------------------------------------------------------

    def start_drain(self) -> asyncio.Task[str]:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name=f"drain {self.id}")
        return self._drain_task

    async def _drain(self) -> str:
        t0 = time.monotonic()
        self.draining = True
        self.metrics.draining.labels(self.id).set(1)
        log.info(
            "%s: draining (stops once nothing is in flight and no request arrived for %gs; deadline %.0fs)",
            self.id,
            self.cfg.drain_quiet_s,
            self.cfg.drain_deadline_s,
        )
        # An engine (start) that never had a passing verdict was never routed to: nothing to wait for
        # (while it loads, /metrics does not even answer, and the wait below would last the deadline).
        served = self._served_generation is not None and self._served_generation == self._engine_generation()
        watch = DrainWatch(self.cfg.drain_quiet_s, t0)
        if served:  # the count of requests so far, before the gateways take the instance out of rotation
            watch.observe(await self.probe.load(self.cfg.health_timeout_s), time.monotonic())
        await self.reconcile_once()  # draining visible in Consul before anything else happens
        deadline = t0 + self.cfg.drain_deadline_s
        outcome = "quiet" if served else "never served"
        next_report = t0 + DRAIN_REPORT_S
        while served:
            now = time.monotonic()
            if watch.drained(now):
                break
            if self.process and not self.process.running:
                outcome = "engine exited"
                break
            if now > deadline:
                outcome = self._deadline_passed(watch, now - t0)
                break
            if watch.arrived and now >= next_report:  # gateways still route here (Consul without a leader?)
                log.warning(
                    "%s: draining for %.0fs and requests still arrive (%d since the drain began, %g in flight): "
                    "the gateways have not seen the draining state (Consul without a leader?); waiting for "
                    "%gs without a new request, at most until the deadline",
                    self.id,
                    now - t0,
                    watch.arrived,
                    watch.in_flight,
                    self.cfg.drain_quiet_s,
                )
                next_report = now + DRAIN_REPORT_S
            load = await self.probe.load(self.cfg.health_timeout_s)
            if load is not None:
                self.metrics.requests_running.labels(self.id).set(load.running)
                self.metrics.requests_waiting.labels(self.id).set(load.waiting)
            watch.observe(load, time.monotonic())
            await asyncio.sleep(DRAIN_POLL_S)
        if self.process:
            await self.process.stop()
        # After every write queued before it; nothing is published afterwards (no ghost re-registration).
        await self.publisher.deregister()
        self.drained = True
        self.stop()
        elapsed = time.monotonic() - t0
        self.metrics.drain_duration.labels(self.id).observe(elapsed)
        self.metrics.draining.labels(self.id).set(0)
        log.info(
            "%s: drained in %.1fs (%s; %d request(s) arrived during the drain), stopped and deregistered",
            self.id,
            elapsed,
            outcome,
            watch.arrived,
        )
        return outcome

    def _deadline_passed(self, watch: DrainWatch, elapsed_s: float) -> str:
        """The deadline bounds the drain: say clearly what stopping now cuts."""
        if watch.in_flight > 0:
            log.error(
                "%s: drain deadline (%.0fs) passed with %g request(s) in flight: stopping the engine cuts them "
                "(%d arrived during the drain, the last %.1fs ago: the gateways kept routing here)",
                self.id,
                elapsed_s,
                watch.in_flight,
                watch.arrived,
                watch.quiet_for(time.monotonic()),
            )
            return "deadline passed, work cut"
        log.warning(
            "%s: drain deadline (%.0fs) passed with nothing in flight but requests still arriving (%d during "
            "the drain, the last %.1fs ago; %s): stopping the engine; the next ones find it gone",
            self.id,
            elapsed_s,
            watch.arrived,
            watch.quiet_for(time.monotonic()),
            "/metrics unreadable" if watch.seen is None else "the gateways kept routing here",
        )
        return "deadline passed"

    def describe(self) -> dict[str, Any]:
        """What the agent API and `ernie-mesh status` show for this instance."""
        load = self.load
        proc_facts = self.process.facts(time.monotonic()) if self.process else None
        return {
            "id": self.id,
            "node": self.cfg.node,
            "url": self.spec.base_url,
            "kind": self.spec.kind,
            "model": self.served_model_name(),
            "state": "drained" if self.drained else self.verdict.state.value,
            "cause": self.verdict.cause.value if self.verdict.cause else None,
            "reason": self.verdict.reason,
            "running": None if load is None else load.running,
            "waiting": None if load is None else load.waiting,
            "canary_latency_ms": None
            if self.canary.last_latency_s is None
            else round(self.canary.last_latency_s * 1000, 1),
            "restarts": self.process.restarts if self.process else 0,
            # live figures the (stable) reason leaves out
            "up_for_s": round(time.monotonic() - self._started_at(), 1),
            "next_restart_in_s": None
            if proc_facts is None or proc_facts.next_restart_in_s is None
            else round(proc_facts.next_restart_in_s, 1),
            "pid": self.process.pid if self.process else None,
            "consul_ok": self.consul_ok,
        }
