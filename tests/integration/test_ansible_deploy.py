"""Multi-host rollout with the real Ansible playbooks on test hosts made of network namespaces.

Six hosts (consul1-3: Consul servers; engine1-2: engine agents with two SIMULATED engines each;
gateway1: gateway agent + Envoy), each a network namespace with its own address on a bridge, are
converged by `ansible-playbook site.yml` for real (connection plugin `netns`, service manager
`process` because systemd does not run here; Consul from this machine's binary; ernie-mesh from a
wheel + wheelhouse built from this checkout; gossip encryption and ACLs on, secrets generated
here and passed as vars). Then, as a user would check:

  1. a Consul cluster with an elected leader and 3 servers; 4 instances registered and passing;
     the gateway answers chat completions (official openai client);
  2. `dig @<host> -p 8600 ernie.service.consul SRV` lists exactly the passing instances;
  3. `ansible-playbook rolling-upgrade.yml` under steady load: zero failed, zero truncated;
  4. `site.yml` re-run after a code change (a new wheel for every agent), under steady load: the
     engine hosts are drained and restarted one at a time (Consul sampled throughout never shows
     every instance out at once), the gateway agent reloads in place (same pid); zero failed, zero
     truncated;
     then a second `site.yml` reports changed=0 on every host;
  5. one engine host's link cut: DNS stops listing its instances within Consul's failure
     detection, and the gateway keeps answering under steady load with zero failed requests and
     zero streams lost (those answering from the cut host are resumed by the relay).

Every namespace, the bridge and every process started inside are removed at the end, even on failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from agent.local.binaries import consul_binary
from bench.load import LoadConfig, LoadGenerator, summarize
from agent.naming import instance_id
from tests.integration.netns_support import NetnsLab, available

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
BUILD_DIR = REPO / ".cache" / "ansible-build"  # wheel + wheelhouse, kept between runs
SERVICE = "ernie"
MODEL = "sim-model"
ENGINE_PORTS = (8001, 8002)
HOSTS = ["consul1", "consul2", "consul3", "engine1", "engine2", "gateway1"]
PLAYBOOK_TIMEOUT_S = 420  # a generous bound: a quiet machine needs a fraction of it
DNS_DEADLINE_S = 45.0
LOAD_CONCURRENCY = 4
HEALTH_SAMPLE_S = 0.1
PARTITION_REQUEST_TIMEOUT_S = 15.0  # well above the gateway's dead-peer timeout (5 s)
AFTER_DETECTION_S = 5.0
RECAP_RE = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)

pytestmark = pytest.mark.timeout(900)


def base_python() -> str:
    """A Python >= 3.11 with venv for the hosts' own venvs (the interpreter behind this venv)."""
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (Path(sys.base_prefix) / "bin" / ver, Path(sys.base_prefix) / "bin" / "python3"):
        if cand.is_file():
            return str(cand)
    return shutil.which(ver) or "python3"


def snapshot_sources(dest: Path) -> Path:
    """The checkout as of now: the wheel built from it cannot change between two playbook runs."""
    for name in ("pyproject.toml", "README.md", "agent", "bench", "envoy"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def inventory(lab: NetnsLab, secrets: dict, src: Path) -> dict:
    def host(name: str, **extra) -> dict:
        h = lab.hosts[name]
        return {
            "ansible_connection": "netns",
            "ansible_netns_name": h.netns,
            "host_address": h.address,
            "ernie_root": str(h.root),
            **extra,
        }

    engines = [
        {"port": p, "kind": "simulated", "served_model_name": MODEL, "args": ["--token-delay-ms", "10"]}
        for p in ENGINE_PORTS
    ]
    return {
        "all": {
            "vars": {
                "ansible_python_interpreter": base_python(),  # modules need the stdlib only
                "ernie_src_dir": str(src),
                "ansible_become": False,
                "service_manager": "process",
                "consul_install_method": "binary",
                "consul_binary_src": consul_binary(),
                # The test reads the catalog from the root namespace through the bridge.
                "consul_client_addresses": "127.0.0.1 {{ ernie_host_address }}",
                "consul_encrypt_key": secrets["encrypt"],
                "consul_acl_enabled": True,
                "consul_acl_management_token": secrets["management"],
                "consul_acl_agent_token": secrets["agent"],
                "consul_acl_dns_token": secrets["dns"],
                "ernie_engine_consul_token": secrets["engine"],
                "ernie_gateway_consul_token": secrets["gateway"],
                "ernie_install_source": "wheelhouse",
                "ernie_build_dir": str(BUILD_DIR),
                "ernie_python": base_python(),
                "ernie_pip_extra_args": "--no-compile",
                "ernie_vllm_flavor": "none",
                "ernie_engines": engines,
                "ernie_engine_drain_deadline_s": 30,
                "ernie_engine_passing_timeout_s": 90,
                "ernie_gateway_settings": {"envoy_concurrency": 1},
            },
            "children": {
                "consul_servers": {"hosts": {n: host(n) for n in ("consul1", "consul2", "consul3")}},
                "engines": {"hosts": {n: host(n) for n in ("engine1", "engine2")}},
                "gateways": {"hosts": {"gateway1": host("gateway1")}},
            },
        }
    }


class Deploy:
    """ansible-playbook against the lab, logs kept in the test's directory."""

    def __init__(self, tmp: Path, inventory_path: Path):
        self.tmp = tmp
        self.inventory_path = inventory_path
        self.runs = 0

    def playbook(self, name: str, timeout_s: float = PLAYBOOK_TIMEOUT_S) -> tuple[str, float]:
        self.runs += 1
        log = self.tmp / f"ansible-{self.runs}-{name}.log"
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(self.tmp / "ansible-local"),
            "ANSIBLE_REMOTE_TEMP": str(self.tmp / "ansible-remote"),
            "ANSIBLE_CALLBACKS_ENABLED": "ernie_task_times",
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
        for key in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"):
            env.pop(key, None)
        cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory_path), name]
        t0 = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, cwd=ANSIBLE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # ansible-playbook and its forked workers
                proc.wait()
                rc = f"killed after {timeout_s}s"
        text = log.read_text(errors="replace")
        assert rc == 0, f"ansible-playbook {name} exited {rc}; log {log}:\n{text[-6000:]}"
        return text, time.monotonic() - t0


def recap(text: str) -> dict[str, dict[str, int]]:
    out = {}
    for m in RECAP_RE.finditer(text):
        out[m.group(1)] = {
            "ok": int(m.group(2)),
            "changed": int(m.group(3)),
            "unreachable": int(m.group(4)),
            "failed": int(m.group(5)),
        }
    return out


def consul_get(lab: NetnsLab, host: str, path: str, token: str = "") -> object:
    headers = {"X-Consul-Token": token} if token else {}
    r = httpx.get(f"http://{lab.hosts[host].address}:8500{path}", headers=headers, timeout=5)
    r.raise_for_status()
    return r.json()


def engine_id(lab: NetnsLab, host: str, port: int) -> str:
    """The ID the engine agent of `host` registers for its engine on `port` (on the host's address)."""
    return instance_id(SERVICE, host, lab.hosts[host].address, port)


def passing_instances(lab: NetnsLab, via: str = "consul1") -> set[tuple[str, int]]:
    """(host, port) of every passing instance, from the catalog."""
    entries = consul_get(lab, via, f"/v1/health/service/{SERVICE}?passing=1")
    return {(e["Node"]["Node"], e["Service"]["Port"]) for e in entries}


def _srv_target_host(lab: NetnsLab, target: str) -> str:
    """An SRV target -> the lab host: `<node>.node.<dc>.consul.` or `<hex IPv4>.addr.<dc>.consul.`."""
    label, kind = target.split(".")[:2]
    if kind == "addr" and len(label) == 8:
        address = ".".join(str(int(label[i : i + 2], 16)) for i in range(0, 8, 2))
        return next((n for n, h in lab.hosts.items() if h.address == address), address)
    return label


def dig_srv(lab: NetnsLab, via: str) -> set[tuple[str, int]]:
    """(host, port) of every SRV record for ernie.service.consul, asked of `via`'s Consul DNS."""
    r = subprocess.run(
        [
            "dig",
            f"@{lab.hosts[via].address}",
            "-p",
            "8600",
            f"{SERVICE}.service.consul",
            "SRV",
            "+short",
            "+time=2",
            "+tries=1",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode == 0, f"dig failed: {r.stdout}{r.stderr}"
    out = set()
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2].isdigit():
            out.add((_srv_target_host(lab, parts[3]), int(parts[2])))
    return out


def wait_for(cond, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except (httpx.HTTPError, OSError, subprocess.SubprocessError, AssertionError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


def agent_pid(lab: NetnsLab, host: str, service: str) -> int | None:
    try:
        return json.loads((lab.hosts[host].root / "run" / "ernie-mesh" / f"{service}.pid").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def host_logs(lab: NetnsLab) -> str:
    parts = []
    for name, h in lab.hosts.items():
        for log in sorted((h.root / "var" / "log" / "ernie-mesh").glob("*.log")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            parts.append(f"--- {name}: {log.name} ---\n{tail}")
    return "\n".join(parts)


class SteadyLoad:
    def __init__(self, base_url: str, request_timeout_s: float = 60.0):
        self.gen = LoadGenerator(
            LoadConfig(
                base_url=base_url,
                model=MODEL,
                concurrency=LOAD_CONCURRENCY,
                stream_ratio=0.5,
                max_tokens=16,
                request_timeout_s=request_timeout_s,
            )
        )
        self.t0 = 0.0

    def __enter__(self) -> SteadyLoad:
        self.t0 = time.monotonic()
        self.gen.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gen.stop()

    def summary(self):
        self.gen.stop()
        return summarize(self.gen.snapshot(), time.monotonic() - self.t0)


class HealthSampler:
    """Samples every instance's check status from Consul, in a thread, until stopped."""

    def __init__(self, lab: NetnsLab, via: str = "consul1"):
        self.url = f"http://{lab.hosts[via].address}:8500/v1/health/service/{SERVICE}"
        self.samples: list[tuple[float, dict[str, str]]] = []  # (time, {instance id: status})
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-sampler", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    entries = client.get(self.url).raise_for_status().json()
                except httpx.HTTPError:
                    self.errors += 1
                else:
                    status = {}
                    for e in entries:
                        checks = [c["Status"] for c in e["Checks"] if c.get("ServiceID") == e["Service"]["ID"]]
                        status[e["Service"]["ID"]] = (
                            "passing" if checks and set(checks) == {"passing"} else "/".join(checks)
                        )
                    self.samples.append((t, status))
                self._stop.wait(HEALTH_SAMPLE_S)

    def __enter__(self) -> HealthSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def none_passing(self) -> list[tuple[float, dict[str, str]]]:
        """Samples in which no instance at all was passing."""
        return [(t, st) for t, st in self.samples if "passing" not in st.values()]

    def hosts_out(self, hosts: tuple[str, ...]) -> dict[str, int]:
        """How many samples saw each host with no passing instance (it was drained or restarting)."""
        out = {h: 0 for h in hosts}
        for _t, st in self.samples:
            for h in hosts:
                if not any(iid.startswith(f"{SERVICE}-{h}-") and v == "passing" for iid, v in st.items()):
                    out[h] += 1
        return out


@pytest.fixture
def lab(tmp_path):
    why = available()
    if why:
        pytest.fail(f"network namespaces unavailable (the test needs root and iproute2): {why}")
    with NetnsLab(tmp_path, HOSTS) as lab:
        yield lab


def test_ansible_site_rolling_upgrade_and_partition(lab: NetnsLab, tmp_path: Path):
    assert shutil.which("dig"), "dig (Debian dnsutils) is needed: scripts/install.sh system"
    assert (Path(sys.executable).parent / "ansible-playbook").exists(), (
        "ansible-core is needed: pip install -e '.[test]'"
    )
    t_start = time.monotonic()
    keygen = subprocess.run([consul_binary(), "keygen"], capture_output=True, text=True, check=True).stdout.strip()
    secrets = {"encrypt": keygen, **{k: str(uuid.uuid4()) for k in ("management", "agent", "dns", "engine", "gateway")}}
    inv_path = tmp_path / "inventory.yml"
    src = snapshot_sources(tmp_path / "src")
    inv_path.write_text(json.dumps(inventory(lab, secrets, src), indent=2))
    deploy = Deploy(tmp_path, inv_path)
    timings: dict[str, float] = {}
    try:
        # --- 1. converge ---------------------------------------------------------------------
        out, timings["site.yml (first)"] = deploy.playbook("site.yml")
        rc = recap(out)
        assert set(rc) == set(HOSTS) and all(v["failed"] == 0 and v["unreachable"] == 0 for v in rc.values()), rc

        leader = consul_get(lab, "consul2", "/v1/status/leader")
        peers = consul_get(lab, "consul3", "/v1/status/peers")
        server_addrs = {f"{lab.hosts[n].address}:8300" for n in ("consul1", "consul2", "consul3")}
        assert leader in server_addrs and set(peers) == server_addrs, (leader, peers)
        members = {
            m["Name"]: m["Status"] for m in consul_get(lab, "consul1", "/v1/agent/members", secrets["management"])
        }
        assert members == {n: 1 for n in HOSTS}, members  # 1 = alive: every host's agent joined

        expected = {(e, p) for e in ("engine1", "engine2") for p in ENGINE_PORTS}
        assert passing_instances(lab) == expected
        # ACLs are on: without a token nobody may register in the service.
        r = httpx.put(
            f"http://{lab.hosts['consul1'].address}:8500/v1/agent/service/register",
            json={"Name": SERVICE, "ID": "intruder", "Port": 1},
            timeout=5,
        )
        assert r.status_code == 403, r.text

        gw = f"http://{lab.hosts['gateway1'].address}:8080"
        client = openai.OpenAI(base_url=f"{gw}/v1", api_key="none", max_retries=0, timeout=30)
        served = set()
        for _ in range(8):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
            )
            assert raw.parse().choices[0].message.content
            served.add(raw.headers.get("x-ernie-instance", ""))
        assert served <= {engine_id(lab, n, p) for n, p in expected}, served

        # --- 2. Consul DNS: exactly the passing instances --------------------------------------
        for via in ("engine1", "consul2", "gateway1"):
            assert dig_srv(lab, via) == passing_instances(lab), via

        # --- 3. rolling upgrade under steady load -----------------------------------------------
        pids_before = {n: agent_pid(lab, n, "ernie-engine") for n in ("engine1", "engine2")}
        with SteadyLoad(gw) as load:
            time.sleep(2)
            out, timings["rolling-upgrade.yml"] = deploy.playbook("rolling-upgrade.yml")
            time.sleep(2)
            s = load.summary()
        pids_after = {n: agent_pid(lab, n, "ernie-engine") for n in ("engine1", "engine2")}
        assert all(pids_before[n] != pids_after[n] for n in pids_before), (pids_before, pids_after)
        for n, p in expected:
            assert f"item={engine_id(lab, n, p)})" in out, f"{engine_id(lab, n, p)} was not drained"
        assert s.requests >= 50 and s.failed == 0 and s.truncated == 0, s
        timings["rolling-upgrade load"] = s.requests
        assert passing_instances(lab) == expected

        # --- 4. site.yml after a code change, under steady load -----------------------------------
        # A new checkout: a new wheel, so every engine and gateway agent must take it. The engine
        # hosts go one at a time, drained first, each back to passing before the next; the gateway
        # reloads in place (same pid, Envoy adopted): nothing is cut.
        with (src / "agent" / "__init__.py").open("a") as f:
            f.write("# a new checkout (test_ansible_deploy step 4)\n")
        gw_log = lab.hosts["gateway1"].root / "var" / "log" / "ernie-mesh" / "ernie-gateway.log"
        reexecs_before = gw_log.read_text(errors="replace").count("re-executing")
        pids_before = {n: agent_pid(lab, n, "ernie-engine") for n in ("engine1", "engine2")}
        pids_before["gateway1"] = agent_pid(lab, "gateway1", "ernie-gateway")
        with HealthSampler(lab) as health, SteadyLoad(gw) as load:
            time.sleep(2)
            out, timings["site.yml (code changed)"] = deploy.playbook("site.yml")
            time.sleep(2)
            s = load.summary()
        pids_after = {n: agent_pid(lab, n, "ernie-engine") for n in ("engine1", "engine2")}
        pids_after["gateway1"] = agent_pid(lab, "gateway1", "ernie-gateway")
        timings["site.yml (code changed) load"] = s.requests
        rc = recap(out)
        assert set(rc) == set(HOSTS) and all(v["failed"] == 0 for v in rc.values()), rc
        out_counts = health.hosts_out(("engine1", "engine2"))
        all_out = health.none_passing()
        print(f"site.yml under load: {s}; samples {len(health.samples)}, per host out {out_counts}")
        assert len(health.samples) >= 50 and health.errors == 0, (len(health.samples), health.errors)
        assert not all_out, (
            f"{len(all_out)} of {len(health.samples)} Consul samples had no passing instance at all "
            f"(every engine out at once), from {all_out[0][1]}; load {s}"
        )
        assert all(out_counts.values()), f"the sampler never saw a host restart: {out_counts}"
        assert all(pids_before[n] != pids_after[n] for n in ("engine1", "engine2")), (pids_before, pids_after)
        gw_text = gw_log.read_text(errors="replace")
        assert pids_before["gateway1"] == pids_after["gateway1"], "the gateway agent was restarted, not reloaded"
        assert gw_text.count("re-executing") == reexecs_before + 1, gw_text[-3000:]
        for n, p in expected:
            assert f"item={engine_id(lab, n, p)})" in out, f"{engine_id(lab, n, p)} was not drained before its restart"
        assert s.requests >= 50 and s.failed == 0 and s.truncated == 0, s
        assert passing_instances(lab) == expected

        # --- 5. idempotent: a second site.yml changes nothing ------------------------------------
        out, timings["site.yml (second)"] = deploy.playbook("site.yml")
        rc = recap(out)
        changed = [line for line in out.splitlines() if line.startswith("changed:")]
        assert set(rc) == set(HOSTS) and all(v["changed"] == 0 for v in rc.values()), (rc, changed)

        # --- 6. cut one engine host's link under steady load --------------------------------------
        with SteadyLoad(gw, request_timeout_s=PARTITION_REQUEST_TIMEOUT_S) as load:
            time.sleep(2)
            t_cut = time.time()
            lab.cut("engine2")
            wait_for(
                lambda: dig_srv(lab, "consul1") == {(n, p) for n, p in expected if n == "engine1"},
                DNS_DEADLINE_S,
                "Consul DNS to drop engine2's instances",
            )
            t_detect = time.time()
            timings["partition -> DNS drops engine2 (s)"] = t_detect - t_cut
            assert dig_srv(lab, "engine1") == {("engine1", p) for p in ENGINE_PORTS}
            assert passing_instances(lab, via="consul2") == {("engine1", p) for p in ENGINE_PORTS}
            time.sleep(AFTER_DETECTION_S)
            load.gen.stop(wait_s=PARTITION_REQUEST_TIMEOUT_S + 5)
            results = load.gen.snapshot()
        # Envoy's dead-peer timeout resets the connections to the vanished host; requests on them
        # that had no response yet are retried on engine1 by Envoy, and streams already answering
        # from engine2 are continued on engine1 by the gateway's relay: nothing is lost.
        s_all = summarize(results, t_detect - t_cut + AFTER_DETECTION_S)
        after = [r for r in results if r.started >= t_detect]
        s_after = summarize(after, AFTER_DETECTION_S)
        timings["partition: requests"] = s_all.requests
        timings["partition: requests after detection"] = s_after.requests
        timings["partition: streams cut"] = s_all.truncated + s_all.failed
        print(f"partition: all {s_all}\npartition: after detection {s_after}")
        not_ok = [r for r in results if r.outcome != "ok"]
        assert not not_ok, not_ok
        assert s_all.failed == 0 and s_all.truncated == 0, s_all
        assert s_after.requests >= 10 and s_after.failed == 0 and s_after.truncated == 0, s_after
    except BaseException:
        print(host_logs(lab))
        raise
    finally:
        timings["total (s)"] = round(time.monotonic() - t_start, 1)
        print("timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
        print(f"ansible logs in {tmp_path}")
