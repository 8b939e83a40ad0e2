// The Flux dashboard: polls the gateway's JSON API once a second and draws the live numbers,
// five minutes of uPlot charts, a canvas grid of connections and the log of recent evictions.
// Plain browser JavaScript: no framework, no build step, nothing fetched from elsewhere.
"use strict";

const POLL_MS = 1000;
/** Samples the charts keep: five minutes at one a second, as the server does. */
const HISTORY = 300;
/** A ring at least this full is drawn yellow ("filling"); backpressured ones are red. */
const FILLING = 0.25;
/** The grid's cells shrink (down to 3 px) to keep it under this height. */
const GRID_MAX_HEIGHT = 420;
const COLOURS = { green: "#2fb36b", yellow: "#e8b423", red: "#e04848" };
const STATES = ["green", "yellow", "red"];

// ---------------------------------------------------------------------------------------------
// Formatting

const SI = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];

function formatCount(n) {
  if (n == null || Number.isNaN(n)) return "–";
  for (const [scale, suffix] of SI) {
    if (Math.abs(n) >= scale * 10) return (n / scale).toFixed(1) + suffix;
  }
  if (Math.abs(n) >= 10 || Number.isInteger(n)) return Math.round(n).toLocaleString("en");
  return n.toFixed(1);
}

function formatBytes(n) {
  if (n == null || Number.isNaN(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i === 0 ? Math.round(n) : n.toFixed(1)) + " " + units[i];
}

function formatPercent(p) {
  if (p == null) return "–";
  return (p >= 99.95 ? "100" : p.toFixed(1)) + "%";
}

function formatMs(ms) {
  if (ms == null) return "–";
  if (ms < 1) return Math.round(ms * 1000) + " µs";
  return (ms < 100 ? ms.toFixed(2) : Math.round(ms)) + " ms";
}

function formatTime(unixMs) {
  return new Date(unixMs).toLocaleTimeString("en-GB", { hour12: false });
}

// ---------------------------------------------------------------------------------------------
// Fetching

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

const status = document.getElementById("status");

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

// ---------------------------------------------------------------------------------------------
// The numbers

/** Writes `text` into every element showing `metric`, and the raw value into `data-value`. */
function show(metric, text, raw) {
  for (const el of document.querySelectorAll(`[data-metric="${metric}"]`)) {
    el.textContent = text;
    if (raw !== undefined) el.dataset.value = String(raw);
  }
}

function renderStats(stats) {
  const totals = stats.totals;
  const latest = stats.latest ?? {};
  show("websockets", formatCount(totals.websockets), totals.websockets);
  show("connections", formatCount(totals.connections), totals.connections);
  for (const rate of ["messages_in", "messages_out", "broadcasts", "deliveries"]) {
    show(rate, formatCount(latest[rate] ?? 0), latest[rate] ?? 0);
  }
  show("bytes_in", formatBytes(latest.bytes_in ?? 0), latest.bytes_in ?? 0);
  show("bytes_out", formatBytes(latest.bytes_out ?? 0), latest.bytes_out ?? 0);
  for (const total of ["messages_in", "messages_out", "backpressure_events", "drops", "evictions"]) {
    show(total + "_total", formatCount(totals[total]), totals[total]);
  }

  const writes = latest.write_success_rate ?? stats.write_success_rate;
  show("write_success_rate", formatPercent(writes), writes);
  show("write_success_total", formatPercent(stats.write_success_rate), stats.write_success_rate);
  show("write_success_target", String(stats.write_success_target));
  const card = document.getElementById("write-card");
  card.classList.toggle("good", writes > stats.write_success_target);
  card.classList.toggle("bad", writes <= stats.write_success_target);

  const pool = latest.pool_hit_rate ?? stats.frame_pool.hit_rate;
  show("pool_hit_rate", formatPercent(pool), pool);
  show("pool_hit_total", formatPercent(stats.frame_pool.hit_rate), stats.frame_pool.hit_rate);
  show("pool_idle", formatCount(stats.frame_pool.idle), stats.frame_pool.idle);

  // The whole process's allocation rate (issue 16's budget is under 1 MB/s); absent when the
  // gateway runs without its counting allocator.
  if (stats.heap) {
    show("heap_allocations", formatCount(latest.heap_allocations ?? 0), latest.heap_allocations ?? 0);
    show("heap_bytes", formatBytes(latest.heap_bytes ?? 0), latest.heap_bytes ?? 0);
    show("heap_allocations_total", formatCount(stats.heap.allocations), stats.heap.allocations);
  } else {
    show("heap_allocations", "not counted");
  }

  show("fanout_p50", formatMs(stats.fanout.p50_ms), stats.fanout.p50_ms);
  show("fanout_p99", formatMs(stats.fanout.p99_ms), stats.fanout.p99_ms);
  show("fanout_count", formatCount(stats.fanout.count), stats.fanout.count);

  // Drops and give-ups are the cost of a slow or dead webhook endpoint: shown in red when any.
  const hooks = stats.webhooks;
  show("webhooks_delivered", formatCount(hooks.events_delivered), hooks.events_delivered);
  show("webhooks_state", hooks.enabled ? "delivered" : "off");
  show("webhooks_dropped", formatCount(hooks.events_dropped), hooks.events_dropped);
  show("webhooks_given_up", formatCount(hooks.events_given_up), hooks.events_given_up);
  show("webhooks_queue", `${formatCount(hooks.queue_depth)} / ${formatCount(hooks.queue_capacity)}`, hooks.queue_depth);
  document.getElementById("webhooks-card").classList.toggle("bad", hooks.events_dropped + hooks.events_given_up > 0);
  renderCluster(stats.cluster);
  renderApps(stats.apps, stats.interval_s);
}

/** Each app's totals at the last poll, for its per-second rates. */
const appTotalsBefore = new Map();

/** The apps panel: one row per app, with rates over the last poll. */
function renderApps(apps, intervalS) {
  const body = document.querySelector("#apps tbody");
  if (apps.length === 0) {
    body.innerHTML = '<tr class="empty"><td colspan="9">No app yet.</td></tr>';
    return;
  }
  body.replaceChildren(...apps.map((app) => {
    const before = appTotalsBefore.get(app.id);
    const rate = (key) => (before ? formatCount(Math.max(0, app[key] - before[key]) / intervalS) : "–");
    appTotalsBefore.set(app.id, app);
    const row = document.createElement("tr");
    const cells = [
      app.id, app.enabled ? "serving" : "disabled", formatCount(app.connections), rate("messages_in"), rate("broadcasts"),
      rate("deliveries"), formatCount(app.deliveries), formatCount(app.over_quota), formatCount(app.rate_limited),
    ];
    for (const [i, text] of cells.entries()) {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (i >= 2) cell.className = "num";
      row.append(cell);
    }
    row.dataset.app = app.id;
    return row;
  }));
}

/** The cluster panel: shown only when the node is in a cluster (FLUX_REDIS_URL). */
function renderCluster(cluster) {
  const panel = document.getElementById("cluster-panel");
  panel.hidden = !cluster;
  if (!cluster) return;
  show("cluster_node", cluster.node_id);
  const link = document.getElementById("cluster-link");
  link.dataset.state = cluster.link_up ? "live" : "down";
  link.textContent = cluster.link_up ? "Redis up" : "Redis down";
  show("cluster_out", formatCount(cluster.messages_out), cluster.messages_out);
  show("cluster_in", formatCount(cluster.messages_in), cluster.messages_in);
  show("cluster_bytes_out", formatBytes(cluster.bytes_out), cluster.bytes_out);
  show("cluster_bytes_in", formatBytes(cluster.bytes_in), cluster.bytes_in);
  show("cluster_dropped", formatCount(cluster.dropped), cluster.dropped);
  show("cluster_reconnects", formatCount(cluster.reconnects), cluster.reconnects);
  show("cluster_delivery_p50", formatMs(cluster.remote_delivery.p50_ms), cluster.remote_delivery.p50_ms);
  show("cluster_delivery_p99", formatMs(cluster.remote_delivery.p99_ms), cluster.remote_delivery.p99_ms);
  const body = document.querySelector("#cluster-nodes tbody");
  if (cluster.nodes.length === 0) {
    body.innerHTML = '<tr class="empty"><td colspan="5">No other node yet.</td></tr>';
    return;
  }
  body.replaceChildren(...cluster.nodes.map((node) => {
    const row = document.createElement("tr");
    const cells = [node.id, node.addr, formatCount(node.connections), formatMs(node.last_heard_ms) + " ago", node.synced ? "in sync" : "syncing"];
    for (const [i, text] of cells.entries()) {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (i === 2 || i === 3) cell.className = "num";
      row.append(cell);
    }
    row.dataset.node = node.id;
    return row;
  }));
}

// ---------------------------------------------------------------------------------------------
// The charts

const CHARTS = [
  { id: "chart-messages", format: formatCount, series: [["messages_in", "in", "#2f6fdb"], ["messages_out", "out", "#2fb36b"]] },
  { id: "chart-deliveries", format: formatCount, series: [["deliveries", "deliveries", "#7c5cd6"]] },
  { id: "chart-bytes", format: (n) => formatBytes(n), series: [["bytes_in", "in", "#2f6fdb"], ["bytes_out", "out", "#2fb36b"]] },
  { id: "chart-connections", format: formatCount, series: [["websockets", "WebSockets", "#2f6fdb"], ["connections", "TCP", "#94a3b8"]] },
  {
    id: "chart-trouble",
    format: formatCount,
    series: [["backpressure_events", "backpressure", "#e8b423"], ["drops", "drops", "#f08a24"], ["evictions", "evictions", "#e04848"]],
  },
];

/** Samples from the server, oldest first: what every chart draws. */
const samples = [];

const charts = CHARTS.map((def) => {
  const el = document.getElementById(def.id);
  const options = {
    width: Math.max(el.clientWidth, 300),
    height: 180,
    cursor: { drag: { x: false, y: false } },
    // Series names only: the cards show the current values.
    legend: { live: false },
    scales: { x: { time: true }, y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    axes: [{ stroke: "#6b7687" }, { stroke: "#6b7687", size: 80, values: (_u, ticks) => ticks.map(def.format) }],
    series: [
      {},
      ...def.series.map(([, label, stroke]) => ({
        label,
        stroke,
        width: 1.5,
        fill: stroke + "18",
        value: (_u, v) => (v == null ? "–" : def.format(v)),
      })),
    ],
  };
  const plot = new uPlot(options, [[], ...def.series.map(() => [])], el);
  new ResizeObserver(() => plot.setSize({ width: Math.max(el.clientWidth, 300), height: 180 })).observe(el);
  return { def, plot };
});

function drawCharts() {
  const xs = samples.map((s) => s.t);
  for (const { def, plot } of charts) {
    plot.setData([xs, ...def.series.map(([key]) => samples.map((s) => s[key]))]);
  }
}

function addSample(sample) {
  if (!sample || (samples.length && sample.t <= samples[samples.length - 1].t)) return;
  samples.push(sample);
  if (samples.length > HISTORY) samples.splice(0, samples.length - HISTORY);
  drawCharts();
}

// ---------------------------------------------------------------------------------------------
// The connections grid: one canvas, one small cell per connection, drawn in three passes (one
// per colour), so 10,000 connections cost a few milliseconds and no DOM nodes.

const canvas = document.getElementById("grid");
const context = canvas.getContext("2d");
const tip = document.getElementById("grid-tip");
const detail = document.getElementById("grid-detail");
const grid = { connections: [], states: [], size: 12, cols: 1, hovered: -1, pinned: null };

function stateOf(c) {
  if (c.backpressured_ms != null) return "red";
  return c.ring_len >= FILLING * c.ring_slots ? "yellow" : "green";
}

function setConnections(doc) {
  grid.connections = doc.connections;
  grid.states = doc.connections.map(stateOf);
  const counts = { green: 0, yellow: 0, red: 0 };
  for (const s of grid.states) counts[s] += 1;
  for (const s of STATES) {
    document.getElementById("count-" + s).textContent = counts[s].toLocaleString("en");
    canvas.dataset[s] = String(counts[s]);
  }
  document.getElementById("grid-shown").textContent =
    doc.shown < doc.total ? `showing ${doc.shown.toLocaleString("en")} of ${doc.total.toLocaleString("en")}, troubled first` : `${doc.total.toLocaleString("en")} open`;
  // A summary for tests and the console: the colours' counts and the red cells' socket ids.
  window.__fluxGrid = {
    total: doc.total,
    shown: doc.shown,
    ...counts,
    redSocketIds: doc.connections.filter((_, i) => grid.states[i] === "red").map((c) => c.socket_id),
    /** The centre of a connection's cell, in CSS pixels from the canvas's corner, or null. */
    locate(socketId) {
      const i = grid.connections.findIndex((c) => c.socket_id === socketId);
      if (i < 0) return null;
      return { x: ((i % grid.cols) + 0.5) * grid.size, y: (Math.floor(i / grid.cols) + 0.5) * grid.size };
    },
  };
  drawGrid();
  showDetail();
}

function drawGrid() {
  const n = grid.connections.length;
  const width = canvas.clientWidth || 600;
  let size = 16;
  while (size > 3 && Math.ceil(n / Math.floor(width / size)) * size > GRID_MAX_HEIGHT) size -= 1;
  grid.size = size;
  grid.cols = Math.max(1, Math.floor(width / size));
  const height = Math.max(size, Math.ceil(n / grid.cols) * size);
  const ratio = window.devicePixelRatio || 1;
  canvas.style.height = (n ? height : 40) + "px";
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round((n ? height : 40) * ratio);
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);
  if (!n) {
    context.fillStyle = "#6b7687";
    context.font = "13px system-ui, sans-serif";
    context.fillText("No WebSocket connections.", 2, 24);
    return;
  }
  const gap = size >= 6 ? 1 : 0;
  for (const state of STATES) {
    context.fillStyle = COLOURS[state];
    for (let i = 0; i < n; i += 1) {
      if (grid.states[i] !== state) continue;
      context.fillRect((i % grid.cols) * size, Math.floor(i / grid.cols) * size, size - gap, size - gap);
    }
  }
  const pinned = grid.connections.findIndex((c) => c.socket_id === grid.pinned);
  for (const [i, colour] of [[grid.hovered, "#18202c"], [pinned, "#2f6fdb"]]) {
    if (i < 0 || i >= n) continue;
    context.strokeStyle = colour;
    context.lineWidth = 2;
    context.strokeRect((i % grid.cols) * size + 1, Math.floor(i / grid.cols) * size + 1, size - 2, size - 2);
  }
}

function cellAt(event) {
  const rect = canvas.getBoundingClientRect();
  const col = Math.floor((event.clientX - rect.left) / grid.size);
  const row = Math.floor((event.clientY - rect.top) / grid.size);
  const i = row * grid.cols + col;
  return col < grid.cols && i >= 0 && i < grid.connections.length ? i : -1;
}

/** A connection's description, as [label, value] lines. */
function describe(c) {
  const channels = c.channels.length > 4 ? `${c.channels.slice(0, 4).join(", ")} +${c.channels.length - 4} more` : c.channels.join(", ") || "none";
  return [
    ["socket", c.socket_id],
    ["peer", `${c.peer} (worker ${c.worker})`],
    ["channels", channels],
    ["ring", `${c.ring_len} / ${c.ring_slots} frames`],
    ["dropped", c.dropped.toLocaleString("en")],
    ["backpressured", c.backpressured_ms == null ? "no" : `${c.backpressured_ms.toLocaleString("en")} ms`],
  ];
}

/** Fills `el` with the lines of `describe`, as text nodes (client data is never parsed as HTML). */
function fillLines(el, lines, separator) {
  el.replaceChildren();
  lines.forEach(([label, value], i) => {
    if (i) el.append(separator());
    const b = document.createElement("b");
    b.textContent = label + " ";
    el.append(b, document.createTextNode(value));
  });
}

canvas.addEventListener("mousemove", (event) => {
  const i = cellAt(event);
  if (i !== grid.hovered) {
    grid.hovered = i;
    drawGrid();
  }
  if (i < 0) {
    tip.hidden = true;
    return;
  }
  fillLines(tip, describe(grid.connections[i]), () => document.createElement("br"));
  tip.hidden = false;
  const wrap = canvas.parentElement.getBoundingClientRect();
  const x = event.clientX - wrap.left + 14;
  tip.style.left = Math.min(x, wrap.width - tip.offsetWidth - 4) + "px";
  tip.style.top = event.clientY - wrap.top + 14 + "px";
});

canvas.addEventListener("mouseleave", () => {
  grid.hovered = -1;
  tip.hidden = true;
  drawGrid();
});

canvas.addEventListener("click", (event) => {
  const i = cellAt(event);
  const id = i < 0 ? null : grid.connections[i].socket_id;
  grid.pinned = id === grid.pinned ? null : id;
  drawGrid();
  showDetail();
});

function showDetail() {
  if (!grid.pinned) {
    detail.classList.add("muted");
    detail.textContent = "Hover over a cell to see its connection; click to keep it here.";
    return;
  }
  detail.classList.remove("muted");
  const c = grid.connections.find((conn) => conn.socket_id === grid.pinned);
  if (!c) {
    detail.textContent = `Socket ${grid.pinned} has closed (or was evicted). Click another cell.`;
    return;
  }
  fillLines(detail, describe(c), () => document.createTextNode(" · "));
}

new ResizeObserver(drawGrid).observe(canvas.parentElement);

// ---------------------------------------------------------------------------------------------
// The eviction log

const evictionRows = document.querySelector("#evictions tbody");
const seenEvictions = new Set();

function renderEvictions(doc) {
  window.__fluxEvictions = doc.recent;
  document.getElementById("evictions-note").textContent =
    doc.total > doc.recent.length ? `the last ${doc.recent.length} of ${doc.total}` : "";
  if (!doc.recent.length) return;
  const rows = doc.recent.map((e) => {
    const key = `${e.socket_id}@${e.at_unix_ms}`;
    const tr = document.createElement("tr");
    tr.dataset.socketId = e.socket_id;
    if (!seenEvictions.has(key)) {
      seenEvictions.add(key);
      tr.className = "fresh";
    }
    const cells = [
      [formatTime(e.at_unix_ms)],
      [e.socket_id],
      [e.peer],
      [e.channels.join(", ")],
      [`${e.backpressured_ms.toLocaleString("en")} ms`, "num"],
      [e.frames_queued.toLocaleString("en"), "num"],
      [e.dropped.toLocaleString("en"), "num"],
    ];
    for (const [text, className] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (className) td.className = className;
      tr.append(td);
    }
    return tr;
  });
  evictionRows.replaceChildren(...rows);
}

// ---------------------------------------------------------------------------------------------
// The loop

async function tick() {
  const [stats, connections, evictions] = await Promise.allSettled([
    getJSON("/api/stats"),
    getJSON("/api/connections"),
    getJSON("/api/evictions"),
  ]);
  if (stats.status === "fulfilled") {
    renderStats(stats.value);
    addSample(stats.value.latest);
  }
  if (connections.status === "fulfilled") setConnections(connections.value);
  if (evictions.status === "fulfilled") renderEvictions(evictions.value);
  const failed = [stats, connections, evictions].find((r) => r.status === "rejected");
  if (failed) {
    setStatus("down", "gateway unreachable – retrying");
    console.warn(failed.reason);
  } else {
    setStatus("live", "live");
  }
}

async function run() {
  try {
    const history = await getJSON("/api/history");
    samples.push(...history.samples.slice(-HISTORY));
    drawCharts();
  } catch (error) {
    console.warn("no history yet:", error);
  }
  for (;;) {
    const started = Date.now();
    await tick();
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, POLL_MS - (Date.now() - started))));
  }
}

run();
