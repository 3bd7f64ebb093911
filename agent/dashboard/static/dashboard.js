// ernie-mesh dashboard: reads /api/snapshot (the tables) every refresh and /api/charts (uPlot charts)
// every few refreshes. No framework; uPlot is vendored from the npm registry by scripts/install.sh.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
                "#65a30d", "#ea580c", "#0d9488", "#9333ea"];
const plots = {};  // chart id -> {plot, labels, el}
let cfg = {refresh_s: 1, minutes: 15};
let ticks = 0;

function num(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && a < 0.01) return v.toPrecision(1);
  return v.toFixed(a >= 100 ? 0 : digits);
}
function secs(v) {
  if (v === null || v === undefined) return "–";
  return v < 1 ? `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms` : `${v.toFixed(2)} s`;
}
function bytes(v) {
  if (v === null || v === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}
function pct(v) { return v === null || v === undefined ? "–" : `${(v * 100).toFixed(0)}%`; }
const UNIT = {
  reqps: (v) => `${num(v, 2)}/s`, tokps: (v) => `${num(v)}/s`, s: secs, ratio: pct,
  cores: (v) => num(v, 2), bytes: bytes, count: (v) => num(v, Number.isInteger(v) ? 0 : 1),
};
function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

function chip(text, state, title = "") {
  return `<span class="chip ${state}" title="${esc(title)}">${esc(text)}</span>`;
}

function renderChips(s) {
  const out = [];
  const p = s.prometheus;
  out.push(chip(p.up ? "Prometheus ok" : "Prometheus error", p.up ? "ok" : "bad", p.error || p.url));
  if (s.consul) {
    const c = s.consul;
    out.push(chip(c.up && !c.error ? `Consul leader ${c.leader}` : "Consul unreachable", c.up && !c.error ? "ok" : "bad", c.error || c.address));
  } else {
    out.push(chip("Consul not asked: verdicts from Prometheus", ""));
  }
  for (const [job, t] of Object.entries(s.targets)) {
    out.push(chip(`${job} ${t.up}/${t.found} up`, t.up >= t.found ? "ok" : "bad", "scrape targets found through Consul"));
  }
  document.getElementById("chips").innerHTML = out.join("");
}

function renderInstances(s) {
  const anyGpu = s.instances.some((r) => r.gpu_utilization !== null || r.gpu_memory_bytes !== null);
  document.getElementById("instances").classList.toggle("hide-gpu", !anyGpu);
  document.getElementById("passing").textContent = `${s.passing} of ${s.instances.length} passing`;
  const ago = (c) => (c.ago_s < 90 ? `${Math.round(c.ago_s)} s` : `${Math.round(c.ago_s / 60)} min`);
  const body = s.instances.map((r) => {
    const crit = r.verdict !== "critical" && r.last_critical ? r.last_critical : null;
    const alarm = r.verdict === "critical" || crit ? "critical" : "";
    return `
    <tr class="v-${esc(r.verdict)}${alarm ? " alarm" : ""}" data-instance="${esc(r.id)}" data-verdict="${esc(r.verdict)}" data-alarm="${alarm}">
      <td><div class="iid">${esc(r.id)}</div><div class="sub">${esc(r.node)}${r.model ? " · " + esc(r.model) : ""}</div></td>
      <td><span class="pill">${esc(r.verdict)}</span>${r.cause ? ` <span class="sub">${esc(r.cause)}</span>` : ""}
          <div class="reason">${esc(r.reason)}</div>
          ${crit ? `<div class="incident">critical ${ago(crit)} ago: ${esc(crit.reason)}</div>` : ""}</td>
      <td class="n">${num(r.running, 0)} / ${num(r.waiting, 0)}</td>
      <td class="n">${num(r.requests_s, 2)}</td>
      <td class="n">${num(r.tokens_s)}</td>
      <td class="n">${secs(r.ttft_p50_s)} / ${secs(r.ttft_p99_s)}</td>
      <td class="n">${secs(r.itl_p50_s)} / ${secs(r.itl_p99_s)}</td>
      <td class="n">${num(r.errors_5m, 0)}</td>
      <td class="n">${pct(r.cache_hit_rate)}</td>
      <td class="n">${r.cpu_cores === null ? "–" : num(r.cpu_cores, 2) + " cores"}</td>
      <td class="n">${bytes(r.memory_bytes)}</td>
      <td class="n gpu">${pct(r.gpu_utilization)} · ${bytes(r.gpu_memory_bytes)}</td>
      <td class="n">${num(r.restarts_1h, 0)}</td>
    </tr>`;
  }).join("");
  document.querySelector("#instances tbody").innerHTML =
    body || `<tr><td colspan="13" class="empty">no instance registered</td></tr>`;
}

function upDown(v, yes = "up", no = "down") {
  if (v === null || v === undefined) return `<span class="sub">–</span>`;
  return v >= 1 ? `<span class="pill ok">${yes}</span>` : `<span class="pill bad">${no}</span>`;
}

function renderGateways(s) {
  const body = s.gateways.map((g) => `
    <tr data-gateway="${esc(g.id)}">
      <td class="iid">${esc(g.id)}</td>
      <td>${g.status ? `<span class="pill ${g.status === "passing" ? "ok" : "bad"}">${esc(g.status)}</span>` : "–"}
          <div class="reason">${esc(g.note)}</div></td>
      <td>${upDown(g.envoy_up)}</td>
      <td>${upDown(g.consul_up, "reading", "failing")}</td>
      <td class="n">${num(g.endpoints_healthy, 0)}</td>
      <td class="n">${num(g.requests_s, 2)}</td>
      <td class="n">${num(g.errors_s, 2)}</td>
      <td class="n">${num(g.in_flight, 0)}</td>
      <td class="n">${num(g.ejected_now, 0)}</td>
      <td class="n">${num(g.ejections_5m, 0)}</td>
      <td class="n">${num(g.resumes_5m, 0)}</td>
      <td class="n">${num(g.retries_5m, 0)}</td>
    </tr>`).join("");
  document.querySelector("#gateways tbody").innerHTML =
    body || `<tr><td colspan="12" class="empty">no gateway seen</td></tr>`;
}

function chartBox(c) {
  let box = document.getElementById(`chart-${c.id}`);
  if (!box) {
    box = document.createElement("div");
    box.id = `chart-${c.id}`;
    box.className = "chart";
    box.dataset.chart = c.id;
    box.innerHTML = `<h3>${esc(c.title)}</h3><div class="plot"></div>`;
    document.getElementById("charts").appendChild(box);
  }
  return box;
}

function drawChart(c, xs) {
  const box = chartBox(c);
  const points = c.series.reduce((n, s) => n + s.values.filter((v) => v !== null).length, 0);
  box.dataset.points = String(points);
  box.dataset.series = String(c.series.length);
  box.classList.toggle("hidden", c.optional && points === 0);
  const target = box.querySelector(".plot");
  const labels = c.series.map((s) => s.label).join("\n");
  const data = [xs, ...c.series.map((s) => s.values)];
  const known = plots[c.id];
  if (known && known.labels === labels) { known.plot.setData(data); return; }
  if (known) { known.plot.destroy(); delete plots[c.id]; }
  target.innerHTML = "";
  if (c.series.length === 0) { target.innerHTML = `<div class="nodata">no data yet</div>`; return; }
  const fmt = UNIT[c.unit] || ((v) => num(v));
  const width = Math.max(300, box.clientWidth - 16);
  const opts = {
    width, height: 170,
    scales: {x: {time: true}, y: {range: (u, lo, hi) => [Math.min(0, lo ?? 0), hi > 0 ? hi * 1.1 : 1]}},
    axes: [{stroke: "#6b7280", grid: {stroke: "#eef0f3"}},
           {stroke: "#6b7280", grid: {stroke: "#eef0f3"}, size: 76, values: (u, vals) => vals.map(fmt)}],
    series: [{}, ...c.series.map((s, i) => ({
      label: s.label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
      points: {show: false}, value: (u, v) => fmt(v),
    }))],
    legend: {live: true},
    cursor: {drag: {x: false, y: false}},
  };
  plots[c.id] = {plot: new uPlot(opts, data, target), labels};
}

async function refreshSnapshot() {
  try {
    const s = await getJSON("/api/snapshot");
    renderChips(s);
    renderInstances(s);
    renderGateways(s);
    document.body.dataset.snapshot = String(s.time);
    document.getElementById("updated").textContent = `updated ${new Date(s.time * 1000).toLocaleTimeString()}`;
  } catch (e) {
    document.getElementById("updated").textContent = `dashboard server unreachable: ${e.message}`;
  }
}

async function refreshCharts() {
  try {
    const c = await getJSON("/api/charts");
    for (const chart of c.charts) drawChart(chart, c.x);
    document.body.dataset.charts = String(Date.now());
  } catch (e) {
    console.warn("charts:", e);
  }
}

async function loop() {
  await refreshSnapshot();
  if (ticks % Math.max(1, Math.round(5 / cfg.refresh_s)) === 0) await refreshCharts();
  ticks++;
  setTimeout(loop, cfg.refresh_s * 1000);
}

window.addEventListener("resize", () => {
  for (const [id, p] of Object.entries(plots)) {
    const box = document.getElementById(`chart-${id}`);
    p.plot.setSize({width: Math.max(300, box.clientWidth - 16), height: 170});
  }
});

(async () => {
  try { cfg = await getJSON("/api/config"); } catch (e) { /* defaults */ }
  document.getElementById("minutes").textContent = String(cfg.minutes);
  loop();
})();
