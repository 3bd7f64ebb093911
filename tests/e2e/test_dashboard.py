"""The live dashboard of `ernie-mesh up` (agent/dashboard) in headless Chromium, on the session's
shared SIMULATED mesh (Prometheus scraping every 5 s): the page renders both instances passing with
their figures, the uPlot charts hold data points, and an engine killed (SIGKILL) turns its row red
within seconds, then green again once its agent restarted it. Screenshots are kept as artefacts
(ERNIE_MESH_TEST_ARTIFACTS, default .run/test-artifacts/)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from agent.local.plan import REPO_DIR
from tests.e2e.conftest_up import sim_mesh  # noqa: F401  (shared session fixture)
from tests.e2e.ui_support import CHROMIUM_FLAGS, POLL_S, find_browser

pytestmark = pytest.mark.timeout(300)
RED_WITHIN_S = 10.0  # Consul has the verdict within a probe; the page reads it every second
RED, GREEN = "rgb(185, 28, 28)", "rgb(21, 128, 61)"  # dashboard.css --bad, --ok
CHARTS_WITHIN_S = 60.0  # a scrape (5 s), a chart refresh (5 s), and the first rates need two samples


def artifacts_dir() -> Path:
    d = Path(os.environ.get("ERNIE_MESH_TEST_ARTIFACTS") or REPO_DIR / ".run" / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


class DashboardPage:
    def __init__(self, url: str):
        import tempfile

        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        found = find_browser()
        assert found, "chromium and chromedriver not found: apt-get install chromium chromium-driver"
        options = webdriver.ChromeOptions()
        options.binary_location = found[0]
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        self.profile = tempfile.mkdtemp(prefix="ernie-dashboard-chromium-")
        options.add_argument(f"--user-data-dir={self.profile}")
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
        self.driver.set_window_size(1400, 1500)
        self.driver.get(url)

    def js(self, script: str):
        return self.driver.execute_script(script)

    def rows(self) -> dict[str, str]:
        """instance id -> the verdict its row shows."""
        return self.js(
            "return Object.fromEntries([...document.querySelectorAll('#instances tr[data-instance]')]"
            ".map(r => [r.dataset.instance, r.dataset.verdict]))"
        )

    def row_text(self, iid: str) -> str:
        return self.js(f"const r = document.querySelector('tr[data-instance=\"{iid}\"]'); return r ? r.innerText : ''")

    def alarms(self) -> dict[str, str]:
        """instance id -> "critical" while its row is red (critical now, or a critical verdict seen lately)."""
        return self.js(
            "return Object.fromEntries([...document.querySelectorAll('#instances tr[data-instance]')]"
            ".map(r => [r.dataset.instance, r.dataset.alarm]))"
        )

    def stripe(self, iid: str) -> str:
        """The colour of the row's left edge (green passing, red critical, amber starting)."""
        return self.js(f"return getComputedStyle(document.querySelector('tr[data-instance=\"{iid}\"] td')).boxShadow")

    def charts(self) -> dict[str, dict]:
        """chart id -> {points, series, canvas: uPlot drew a canvas}."""
        return self.js(
            "return Object.fromEntries([...document.querySelectorAll('.chart')].map(c => [c.dataset.chart, "
            "{points: +(c.dataset.points || 0), series: +(c.dataset.series || 0), "
            "canvas: !!c.querySelector('.uplot canvas')}]))"
        )

    def until(self, predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(POLL_S)
        text = self.js("return document.body.innerText")[:3000]
        raise AssertionError(f"dashboard: {what} not seen within {timeout_s:.0f}s; page:\n{text}")

    def screenshot(self, name: str) -> Path:
        path = artifacts_dir() / name
        self.driver.save_screenshot(str(path))
        return path

    def close(self) -> None:
        import shutil

        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(sim_mesh):
    p = DashboardPage(sim_mesh.plan.dashboard_url)
    try:
        yield p
    finally:
        p.close()


def traffic(run, n: int = 12) -> None:
    """A few streamed chat completions through the gateway: requests, tokens, TTFT and ITL to chart."""
    headers = {"Authorization": f"Bearer {run.plan.api_key()}"}
    for i in range(n):
        body = {"model": "simulated", "messages": [{"role": "user", "content": f"count {i}"}], "max_tokens": 16}
        with httpx.stream(
            "POST", f"{run.plan.api_url}/chat/completions", json={**body, "stream": True}, headers=headers, timeout=30
        ) as r:
            assert r.status_code == 200
            r.read()


def test_the_dashboard_shows_every_instance_and_its_charts_hold_data(sim_mesh, page):
    instances = sim_mesh.healthy["instances"]
    traffic(sim_mesh)
    page.until(lambda: page.rows() == dict.fromkeys(instances, "passing"), 30, "both instances passing")
    for iid in instances:
        text = page.row_text(iid)
        assert "canary generation ok" in text and "MiB" in text, text  # the reason; the engine's memory
    assert "ernie-mesh" in page.js("return document.title")
    wanted = ("passing", "requests", "tokens", "ttft", "itl", "cpu", "memory")
    charts = page.until(
        lambda: (lambda c: c if all(c.get(k, {}).get("points", 0) > 0 for k in wanted) else None)(page.charts()),
        CHARTS_WITHIN_S,
        f"data points in the charts {wanted}",
    )
    assert all(charts[k]["canvas"] for k in wanted), charts  # drawn by uPlot, not left empty
    assert charts["cpu"]["series"] == charts["memory"]["series"] == len(instances), charts
    assert "gpu" in charts and charts["gpu"]["points"] == 0  # no GPU here: absent, hidden, no error
    gateway = page.js("return document.querySelector('#gateways tr[data-gateway]').innerText")
    assert "passing" in gateway and "up" in gateway, gateway
    print(f"\n[dashboard] screenshot {page.screenshot('dashboard.png')}")


def test_a_killed_engine_turns_red_within_seconds(sim_mesh, page):
    """Its agent restarts a killed engine about a second later: the row stays red (critical, then
    'critical N s ago: engine process exited ...' while it starts again, for 2 minutes)."""
    instances = sim_mesh.healthy["instances"]
    page.until(lambda: page.rows() == dict.fromkeys(instances, "passing"), 30, "both instances passing")
    victim = instances[0]
    assert GREEN in page.stripe(victim) and page.alarms()[victim] == ""
    os.kill(sim_mesh.agent_instances()[victim]["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    page.until(lambda: page.alarms().get(victim) == "critical", RED_WITHIN_S, f"{victim} red")
    red_after_s = time.monotonic() - killed_at
    assert RED in page.stripe(victim), page.stripe(victim)
    assert "exited" in page.row_text(victim), page.row_text(victim)  # the reason says what happened
    assert page.alarms().get(instances[1]) == "" and GREEN in page.stripe(instances[1])
    print(f"\n[dashboard] {victim} red {red_after_s:.1f}s after SIGKILL; screenshot {page.screenshot('killed.png')}")
    # Its agent restarts it: passing again (the shared mesh stays whole for the tests after this one).
    page.until(lambda: page.rows().get(victim) == "passing", 60, f"{victim} passing again")
