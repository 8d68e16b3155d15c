// edgefleet dashboard: plain JS, no build step. Data from the controller's REST API, live updates over SSE.
// The table renders one page of the sorted, filtered rows, so 10,000 devices cost one page of DOM, not 10,000 rows.
// Reads need no token from the controller's own host (fleet serve --read-auth local, the default); elsewhere, or
// with --read-auth token, the page asks for a read token once and keeps it in this tab only (sessionStorage), sent
// as an Authorization header — never in a URL or a cookie. The live stream is read with fetch() for that reason
// (EventSource cannot send headers).
"use strict";

const PAGE = 100;
const state = {
  devices: new Map(),   // device id -> row from /api/devices
  sortKey: "device", asc: true, filter: "", page: 0,
  selected: null, chart: null, chartData: null,
  flash: new Set(), renderQueued: false, lastRefresh: 0,
  total: null,          // while only the first page is loaded: how many devices there are in all
};
const $ = (sel) => document.querySelector(sel);

function fmt(v, digits = 2) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
function ago(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 60 ? `${s.toFixed(0)}s` : s < 3600 ? `${(s / 60).toFixed(0)}m` : `${(s / 3600).toFixed(1)}h`;
}
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); }

// One flat view of a device row, for sorting, filtering and display. An offline device (its Last Will, a shutdown
// status, or silent past the controller's --offline-after) keeps its identity and what it last served, but its last
// latency and throughput are not live: they are not shown, sorted on or counted in the fleet's live figures.
// ORT provider ids spelled as the vendors do (the same table as sdk/providers.py: TensorRT, not Tensorrt).
const PROVIDER_LABELS = {
  TensorrtExecutionProvider: "TensorRT", NvTensorRTRTXExecutionProvider: "TensorRT RTX", DmlExecutionProvider: "DirectML",
  ROCMExecutionProvider: "ROCm", XnnpackExecutionProvider: "XNNPACK", WebGpuExecutionProvider: "WebGPU",
};
const providerLabel = (p) => PROVIDER_LABELS[p] || p.replace("ExecutionProvider", "");

function view(d) {
  const m = (d.models && d.models[0]) || {};
  const on = d.state === "online";
  return {
    device: d.device, online: on ? 1 : 0, state: on ? "online" : d.state === "unknown" ? "unknown" : "offline",
    profile: d.profile || "",
    serving: (m.providers || []).map(providerLabel).join(","),
    bundle: m.name ? `${m.name} ${m.version}${m.variant ? ` [${m.variant}]` : ""}` : "", p50: on ? m.p50 ?? null : null, p95: on ? m.p95 ?? null : null,
    p99: on ? m.p99 ?? null : null, throughput: on ? m.throughput ?? null : null, errors: on ? m.errors ?? null : null,
    last_seen: d.last_seen || 0, more: d.models && d.models.length > 1 ? d.models.length - 1 : 0,
  };
}

// Live figures over online devices only: requests per second summed, and the median of their p95s.
function liveAggregate() {
  let rps = 0, n = 0;
  const p95s = [];
  for (const d of state.devices.values()) {
    if (d.state !== "online") continue;
    for (const m of d.models || []) {
      if (m.throughput != null) { rps += m.throughput; n += 1; }
      if (m.p95 != null) p95s.push(m.p95);
    }
  }
  p95s.sort((a, b) => a - b);
  const med = p95s.length ? p95s[Math.floor(p95s.length / 2)] : null;
  return { rps, n, med };
}

function rows() {
  const f = state.filter.toLowerCase();
  let out = [];
  for (const d of state.devices.values()) {
    let v;
    try { v = view(d); } catch (err) { v = { device: String(d && d.device), online: 0, state: "unknown", profile: "", serving: "",
      bundle: "", p50: null, p95: null, p99: null, throughput: null, errors: null, last_seen: 0, more: 0 }; }
    if (f) {
      const hay = `${v.device} ${v.profile} ${v.serving} ${v.bundle} ${v.state}`.toLowerCase();
      if (!f.split(/\s+/).every((w) => hay.includes(w))) continue;
    }
    out.push(v);
  }
  const k = state.sortKey, dir = state.asc ? 1 : -1;
  out.sort((a, b) => {
    const x = a[k], y = b[k];
    if (x === y) return a.device < b.device ? -1 : 1;
    if (x === null) return 1;
    if (y === null) return -1;
    return (x < y ? -1 : 1) * dir;
  });
  return out;
}

function render() {
  state.renderQueued = false;
  const all = rows();
  const pages = Math.max(1, Math.ceil(all.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const slice = all.slice(state.page * PAGE, (state.page + 1) * PAGE);
  const html = slice.map((v) => {
    try {  // one odd row shows as such; it never blanks the table
      const cls = [v.device === state.selected ? "selected" : "", state.flash.has(v.device) ? "flash" : "",
        v.online ? "" : "offline"].filter(Boolean).join(" ");
      const tip = v.online ? "" : ` title="${v.state}: last telemetry ${ago(v.last_seen)} ago; figures not live"`;
      return `<tr data-device="${esc(v.device)}" data-state="${v.state}" class="${cls}"${tip}>`
        + `<td>${esc(v.device)}</td><td><span class="dot${v.online ? " online" : ""}" title="${v.state}"></span>${v.online ? "" : ` <span class="state">${v.state}</span>`}</td>`
        + `<td>${esc(v.profile)}</td><td class="opt">${esc(v.serving)}</td><td>${esc(v.bundle)}${v.more ? ` <span class="muted">+${v.more}</span>` : ""}</td>`
        + `<td class="num p50 opt">${fmt(v.p50)}</td><td class="num p95">${fmt(v.p95)}</td><td class="num p99">${fmt(v.p99)}</td>`
        + `<td class="num">${fmt(v.throughput, 1)}</td><td class="num">${esc(v.errors ?? "–")}</td><td class="num">${ago(v.last_seen)}</td></tr>`;
    } catch (err) {
      return `<tr data-device="${esc(v.device)}"><td>${esc(v.device)}</td><td colspan="10" class="muted">unreadable row</td></tr>`;
    }
  }).join("");
  $("#devices tbody").innerHTML = html;
  state.flash.clear();
  const online = [...state.devices.values()].filter((d) => d.state === "online").length;
  $("#summary").textContent = state.total ? `${state.total} devices, loading…`
    : `${state.devices.size} devices, ${online} online`;
  const agg = liveAggregate();
  $("#aggregate").textContent = agg.n ? `live: ${fmt(agg.rps, 1)} req/s, median p95 ${fmt(agg.med)} ms` : "";
  $("#count").textContent = all.length === state.devices.size ? "" : `${all.length} match`;
  $("#page").textContent = ` ${state.page + 1} / ${pages} `;
  document.querySelectorAll("#devices th").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.key === state.sortKey);
    th.classList.toggle("asc", th.dataset.key === state.sortKey && state.asc);
  });
  document.body.dataset.rendered = String(Date.now());
}
function queueRender() {
  if (!state.renderQueued) { state.renderQueued = true; requestAnimationFrame(render); }
}

// -- API token --------------------------------------------------------------------------------------------------------
let token = sessionStorage.getItem("edgefleet-token") || "";
let asking = null;
function authHeaders() { return token ? { Authorization: `Bearer ${token}` } : {}; }
function askToken(why) {
  // One prompt for every request that was refused at once; resolves when a token is entered.
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const form = $("#auth");
    $("#auth-why").textContent = why;
    form.hidden = false;
    form.onsubmit = (e) => {
      e.preventDefault();
      token = $("#auth-token").value.trim();
      sessionStorage.setItem("edgefleet-token", token);
      form.hidden = true;
      asking = null;
      resolve();
    };
  });
  return asking;
}
async function apiFetch(url) {
  for (let i = 0; i < 5; i++) {
    const r = await fetch(url, { headers: authHeaders() });
    if (r.status !== 401 && r.status !== 403) return r;
    let why = `${r.status}`;
    try { why = (await r.json()).error; } catch (e) { /* not JSON */ }
    await askToken(why);
  }
  throw new Error(`${url}: no valid token`);
}
async function getJSON(url) {
  const r = await apiFetch(url);
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.json();
}

async function loadDevices(firstPage = false) {
  // First paint: one page of rows (cheap at any fleet size), then the whole fleet for sorting and filtering.
  if (firstPage) {
    const head = await getJSON(`/api/devices?limit=${PAGE}`);
    $("#fleet").textContent = `fleet ${head.fleet}`;
    if (head.total > head.devices.length) {
      state.devices = new Map(head.devices.map((d) => [d.device, d]));
      state.total = head.total;
      render();
      document.body.dataset.ready = "1";
    }
  }
  const data = await getJSON("/api/devices");
  $("#fleet").textContent = `fleet ${data.fleet}`;
  state.devices = new Map(data.devices.map((d) => [d.device, d]));
  state.total = null;
  render();
  document.body.dataset.ready = "1";
  document.body.dataset.complete = "1";
}

// -- per-device chart ------------------------------------------------------------------------------------------------
async function selectDevice(id) {
  state.selected = id;
  $("#chart-device").textContent = id;
  const since = Date.now() / 1000 - 900;
  const data = await getJSON(`/api/devices/${encodeURIComponent(id)}/telemetry?since=${since}&limit=2000`);
  const w = data.windows.filter((x) => !data.windows.length || x.name === data.windows[data.windows.length - 1].name);
  state.chartData = [w.map((x) => x.ts), w.map((x) => x.p50), w.map((x) => x.p95), w.map((x) => x.p99)];
  drawChart();
  queueRender();
}
// Time-axis labels: one short line (HH:MM, or HH:MM:SS below a 2-minute tick), never uPlot's default two-line date
// labels; at least 48 px per tick over ranges above 5 minutes (an 11 px HH:MM is about 30 px wide) and 72 px below
// (HH:MM:SS, about 50 px), so they cannot overlap at any width (tests/fleet/test_fleet_dashboard.py measures them at
// 1280 and 800 px).
function timeSpace(u, axisIdx, min, max) { return max - min > 300 ? 48 : 72; }
const pad2 = (n) => String(n).padStart(2, "0");
function timeLabels(u, splits, axisIdx, foundSpace, foundIncr) {
  return splits.map((t) => {
    const d = new Date(t * 1000);
    return foundIncr < 120 ? `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`
      : `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  });
}
function drawChart() {
  const el = $("#chart");
  const width = Math.max(240, el.clientWidth - 4);
  if (state.chart) state.chart.destroy();
  state.chart = new uPlot({
    width, height: 220, scales: { x: { time: true } },
    axes: [{ stroke: "#7d8a96", grid: { stroke: "#26313c" }, values: timeLabels, space: timeSpace, font: "11px system-ui" },
      { stroke: "#7d8a96", grid: { stroke: "#26313c" }, label: "ms", size: 48, font: "11px system-ui" }],
    series: [{}, { label: "p50", stroke: "#3fb950" }, { label: "p95", stroke: "#d29922" }, { label: "p99", stroke: "#f85149" }],
  }, state.chartData, el);
}
function appendPoint(d) {
  if (d.device === state.selected) $("#chart-device").textContent = d.state === "online" ? d.device : `${d.device} (offline)`;
  if (!state.chart || d.device !== state.selected || !d.models || !d.models.length || d.state !== "online") return;
  const m = d.models[0], ts = d.telemetry_ts, cd = state.chartData;
  if (!ts || (cd[0].length && ts <= cd[0][cd[0].length - 1])) return;
  cd[0].push(ts); cd[1].push(m.p50); cd[2].push(m.p95); cd[3].push(m.p99);
  if (cd[0].length > 2000) cd.forEach((a) => a.shift());
  state.chart.setData(cd);
}

// -- versions, deployments, events -----------------------------------------------------------------------------------
async function loadVersions() {
  const data = await getJSON("/api/versions?window=900");
  $("#versions tbody").innerHTML = data.versions.map((v) => `<tr><td>${esc(v.name)}</td><td>${esc(v.version)}</td>`
    + `<td class="num">${v.count}</td><td class="num">${v.errors}</td><td class="num">${fmt(v.p50)}</td>`
    + `<td class="num">${fmt(v.p95)}</td><td class="num">${fmt(v.p99)}</td></tr>`).join("");
}
const STATES = ["active", "downloading", "verifying", "self-test", "pending", "failed", "rolled-back", "skipped"];
function renderDeployments(deps) {
  if (!deps.length) return;
  $("#deployments").innerHTML = deps.slice(0, 8).map((d) => {
    const total = Object.values(d.progress).reduce((a, b) => a + b, 0) || 1;
    const bar = STATES.filter((s) => d.progress[s]).map((s) => `<span class="s-${s}" style="width:${100 * d.progress[s] / total}%" title="${s}: ${d.progress[s]}"></span>`).join("");
    const counts = STATES.filter((s) => d.progress[s]).map((s) => `${s} ${d.progress[s]}`).join(" · ");
    const bundles = d.bundles.map((b) => `${esc(b.name)} ${esc(b.version)} (${esc(b.target)})`).join(", ");
    // While the canaries are observed: each bundle's last look (requests so far and needed, time, p95 ratio).
    const looks = d.state === "observing" ? ((d.decision || {}).observing || []).map((v) => {
      const ratio = v.p95_ratio != null ? `, p95 ×${v.p95_ratio.toFixed(2)} [${fmt(v.ratio_low)}, ${fmt(v.ratio_high)}]`
        + ` (limit ×${(1 + d.max_p95_regression).toFixed(2)})` : "";
      return `<div class="muted look">${esc(v.bundle)}: ${v.canary_count}/${v.needed_count} requests, `
        + `${Math.round(v.elapsed_s)}/${Math.round(v.max_s)} s${esc(ratio)}</div>`;
    }).join("") : "";
    return `<div class="dep" data-id="${esc(d.id)}"><div><span class="state ${esc(d.state)}">${esc(d.state)}</span> ${bundles}`
      + ` <span class="muted">${esc(d.id)}${d.canary_pct ? `, canary ${d.canary_pct}%` : ""}</span></div>`
      + `<div class="bar">${bar}</div><div class="muted">${counts}</div>${looks}${d.message ? `<div>${esc(d.message)}</div>` : ""}</div>`;
  }).join("");
}
const shownEvents = new Set();  // device/boot/seq of every event listed: the first fetch and the stream overlap
function addEvents(evs) {
  const ol = $("#events");
  for (const e of evs) {
    const key = `${e.device}/${e.boot}/${e.seq}`;
    if (shownEvents.has(key)) continue;
    shownEvents.add(key);
    if (shownEvents.size > 5000) shownEvents.clear();
    const li = document.createElement("li");
    li.className = e.level;
    li.textContent = `${new Date(e.ts * 1000).toLocaleTimeString()} ${e.device} ${e.kind}: ${e.message}`;
    ol.prepend(li);
  }
  while (ol.children.length > 200) ol.lastChild.remove();
}

// -- live updates ----------------------------------------------------------------------------------------------------
// Server-sent events read with fetch(): it can send the Authorization header. Each event is handled on its own, and
// each device row within it: one bad value costs that row, never the stream (issue 18).
const handlers = {
  devices(data) {
    for (const d of data.devices || []) {
      try {
        const old = state.devices.get(d.device);
        if (!old || old.telemetry_ts !== d.telemetry_ts || old.state !== d.state) state.flash.add(d.device);
        state.devices.set(d.device, d);
        appendPoint(d);
      } catch (err) { console.warn("live update of one device skipped", err); }
    }
    queueRender();
  },
  refresh() {
    // Too many changes to stream row by row (a large fleet): refetch, at most every 5 s.
    if (Date.now() - state.lastRefresh > 5000) { state.lastRefresh = Date.now(); loadDevices(); }
  },
  deployments(data) { renderDeployments(data.deployments); },
  events(data) { addEvents(data.events); },
};
function handleBlock(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length || !handlers[kind]) return;
  try { handlers[kind](JSON.parse(data.join("\n"))); } catch (err) { console.warn(`live ${kind} event skipped`, err); }
}
function setLive(on) { $("#live").textContent = on ? "live" : "reconnecting"; $("#live").className = on ? "pill on" : "pill off"; }
async function connect() {
  for (;;) {
    try {
      const r = await apiFetch("/api/stream");
      if (!r.ok || !r.body) throw new Error(`stream: ${r.status}`);
      setLive(true);
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) { handleBlock(buf.slice(0, i)); buf = buf.slice(i + 2); }
        if (buf.length > (8 << 20)) buf = "";  // a runaway event: drop it, keep the stream
      }
    } catch (err) { console.warn("live stream", err); }
    setLive(false);
    await new Promise((res) => setTimeout(res, 2000));
  }
}

// -- wiring ----------------------------------------------------------------------------------------------------------
document.querySelectorAll("#devices th").forEach((th) => th.addEventListener("click", () => {
  const k = th.dataset.key;
  state.asc = state.sortKey === k ? !state.asc : ["device", "profile", "serving", "bundle"].includes(k);
  state.sortKey = k;
  render();
}));
$("#filter").addEventListener("input", (e) => { state.filter = e.target.value.trim(); state.page = 0; render(); });
$("#prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); render(); });
$("#next").addEventListener("click", () => { state.page += 1; render(); });
$("#devices tbody").addEventListener("click", (e) => {
  const tr = e.target.closest("tr");
  if (tr) selectDevice(tr.dataset.device);
});
// Redraw at the panel's new width (window resize, or the layout stacking below 1000 px).
// Only a change of width counts, and the redraw waits for the next frame: redrawing inside the observer's callback
// would resize what it observes ("ResizeObserver loop" errors).
let chartWidth = 0;
new ResizeObserver((entries) => {
  const w = Math.round(entries[0].contentRect.width);
  if (w === chartWidth) return;
  chartWidth = w;
  requestAnimationFrame(() => { if (state.chartData) drawChart(); });
}).observe($("#chart"));

loadDevices(true).then(() => {
  connect();
  loadVersions();
  setInterval(loadVersions, 5000);
  setInterval(queueRender, 5000);  // keep "last seen" ages current without new data
  getJSON("/api/deployments").then((d) => renderDeployments(d.deployments));
  getJSON("/api/events?limit=50").then((d) => addEvents(d.events));
}).catch((err) => { $("#summary").textContent = `error: ${err.message}`; });
