// kizuna's dashboard: the service graph (cytoscape) and, for the selected service, its golden signals
// (uPlot) and the config that applies to it. Everything comes from the control plane's /api/*, refreshed
// every few seconds; the layout is recomputed only when the set of nodes changes, so 100 services stay smooth.
import cytoscape from "cytoscape";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import "./style.css";

const REFRESH_MS = 5000;
const state = { graph: null, selected: null, service: null, nodeKey: "", refreshes: 0 };
window.kizuna = state; // for tests and curious users: the last graph, the selected service, the cytoscape

const $ = (id) => document.getElementById(id);

const cy = cytoscape({
  container: $("graph"),
  wheelSensitivity: 0.3,
  minZoom: 0.1,
  maxZoom: 3,
  style: [
    { selector: "node", style: { label: "data(label)", "font-size": 11, "text-valign": "bottom",
      "text-margin-y": 3, width: 22, height: 22, "background-color": "#3f7fd9", color: "#1d2330" } },
    { selector: "node[kind = 'gateway']", style: { shape: "round-diamond", "background-color": "#8a4fd9",
      width: 30, height: 30 } },
    { selector: "node[kind = 'unknown']", style: { "background-color": "#9aa3b2" } },
    { selector: "node[kind = 'service']", style: { shape: "round-rectangle", "background-color": "#eef2f8",
      "border-width": 1, "border-style": "dashed", "border-color": "#7a8699", "text-valign": "top",
      "font-weight": "bold", "padding": 10 } },
    { selector: "node[kind = 'service']:childless", style: { width: 40, height: 24 } },
    { selector: "node:selected", style: { "border-width": 3, "border-color": "#f0a202",
      "border-style": "solid" } },
    { selector: "edge", style: { width: "data(width)", "line-color": "data(color)", "target-arrow-color":
      "data(color)", "target-arrow-shape": "triangle", "curve-style": "bezier", label: "data(label)",
      "font-size": 9, "text-background-color": "#fff", "text-background-opacity": 0.85,
      "text-background-padding": 1, "text-rotation": "autorotate" } },
    { selector: "edge[?idle]", style: { "line-style": "dotted", label: "" } },
  ],
});
state.cy = cy;

function fmt(n, digits = 1) {
  if (n === null || n === undefined) return "–";
  return Number(n).toFixed(digits).replace(/\.0+$/, "");
}

function edgeLabel(e) {
  const lock = e.mtls ? "mTLS · " : ""; // a text lock: headless and minimal systems lack emoji fonts
  if (e.protocol === "tcp") return `${lock}${fmt(e.tcpConnectionsPerSecond, 2)} conn/s`;
  const err = e.errorRate > 0 ? ` · ${fmt(e.errorRate * 100)}% err` : "";
  const p99 = e.p99 !== null ? ` · p99 ${fmt(e.p99)}ms` : "";
  return `${lock}${fmt(e.rps, 2)} rps${err}${p99}`;
}

function edgeColor(e) {
  if (e.errorRate >= 0.2) return "#c62828";
  if (e.errorRate > 0) return "#ef8f00";
  return "#4a8f4a";
}

function elementsOf(graph) {
  const nodes = graph.nodes.map((n) => ({ group: "nodes", data: { ...n, parent: n.parent || undefined } }));
  const edges = graph.edges.map((e) => ({ group: "edges", data: { ...e, label: edgeLabel(e),
    color: edgeColor(e), width: Math.min(1 + Math.log10(1 + (e.rps || 0)) * 2, 6), idle: !(e.rps > 0) &&
      !(e.tcpConnectionsPerSecond > 0) } }));
  return [...nodes, ...edges];
}

function render(graph) {
  const elements = elementsOf(graph);
  const key = graph.nodes.map((n) => `${n.id}<${n.parent || ""}`).sort().join("|")
    + "#" + graph.edges.map((e) => e.id).sort().join("|");
  cy.batch(() => {
    const wanted = new Set(elements.map((el) => el.data.id));
    cy.elements().forEach((el) => { if (!wanted.has(el.id())) el.remove(); });
    for (const el of elements) {
      const existing = cy.getElementById(el.data.id);
      if (existing.nonempty() && el.group === "nodes" && (existing.data("parent") || undefined) !==
          el.data.parent) {
        existing.move({ parent: el.data.parent ?? null });
      }
      if (existing.nonempty()) existing.data(el.data);
      else cy.add(el);
    }
  });
  if (key !== state.nodeKey) {
    state.nodeKey = key;
    cy.layout(layoutFor(graph)).run();
  }
  if (state.selected) cy.getElementById(`svc:${state.selected.namespace}/${state.selected.name}`).select();
}

// Small meshes read best as layers (callers above callees, Bookinfo as a tree); past a few dozen workloads a
// force-directed layout uses the space better. Services are compound nodes: they wrap their workloads.
function layoutFor(graph) {
  const workloads = graph.nodes.filter((n) => n.kind !== "service").length;
  if (workloads <= 60) {
    const leaves = cy.nodes().filter((n) => n.isChildless());
    const roots = leaves.filter((n) => n.incomers("edge").empty() && n.outgoers("edge").nonempty());
    return { name: "breadthfirst", directed: true, eles: cy.elements(), roots: roots.nonempty() ? roots : undefined,
      spacingFactor: 1.3, padding: 40, animate: false, fit: true, nodeDimensionsIncludeLabels: true };
  }
  return { name: "cose", animate: false, randomize: false, nodeDimensionsIncludeLabels: true,
    numIter: workloads > 120 ? 400 : 1000, idealEdgeLength: () => 160, nodeRepulsion: () => 60000, padding: 30,
    nestingFactor: 0.8, gravity: 0.5, componentSpacing: 80, fit: true };
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

async function refresh() {
  const window_ = $("window").value;
  try {
    const graph = await getJSON(`api/graph?window=${window_}`);
    state.graph = graph;
    render(graph);
    if (state.selected) await loadService(state.selected.namespace, state.selected.name, false);
    if (state.view === "traces") await loadTraces();
    state.refreshes += 1;
    const from = graph.source === "prometheus" ? "from Prometheus" : "scraped from the proxies";
    $("status").textContent = `${graph.nodes.length} nodes · ${graph.edges.length} edges · ${from} · ` +
      `updated ${new Date().toLocaleTimeString()}`;
    $("status").className = "status";
  } catch (err) {
    $("status").textContent = `cannot reach the control plane: ${err.message}`;
    $("status").className = "status error";
  }
}

cy.on("tap", "node", (event) => {
  const data = event.target.data();
  const service = data.kind === "service" ? data : data.parent ? cy.getElementById(data.parent).data() : null;
  if (service) {
    window.location.hash = `#/services/${service.namespace}/${service.name}`;
  }
});

window.addEventListener("hashchange", fromHash);

function fromHash() {
  const hash = window.location.hash;
  const traceMatch = hash.match(/^#\/traces\/([0-9a-fA-F]+)$/);
  if (hash === "#/traces" || traceMatch) {
    state.selected = null;
    state.service = null;
    cy.elements().unselect();
    if (traceMatch) {
      state.view = "trace";
      loadTrace(traceMatch[1]);
    } else {
      state.view = "traces";
      loadTraces();
    }
    return;
  }
  state.view = "graph";
  const match = hash.match(/^#\/services\/([^/]+)\/([^/]+)$/);
  if (!match) {
    state.selected = null;
    $("details").innerHTML = `<p class="hint">Click a service (or one of its workloads) to see its golden
      signals and the config that applies to it.</p>`;
    return;
  }
  const [namespace, name] = [decodeURIComponent(match[1]), decodeURIComponent(match[2])];
  state.selected = { namespace, name };
  cy.elements().unselect();
  cy.getElementById(`svc:${namespace}/${name}`).select();
  loadService(namespace, name, true);
}

const charts = {};

async function loadService(namespace, name, fresh) {
  const window_ = $("window").value;
  let data;
  try {
    data = await getJSON(`api/services/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}` +
      `?window=${window_}`);
  } catch (err) {
    $("details").innerHTML = `<p class="bad">${escapeHtml(err.message)}</p>`;
    return;
  }
  if (!state.selected || state.selected.namespace !== namespace || state.selected.name !== name) return;
  state.service = data;
  if (fresh || !$("charts")) renderServiceFrame(data);
  updateCharts(data);
  renderServiceTables(data);
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
    "'": "&#39;" }[c]));
}

function renderServiceFrame(data) {
  for (const key of Object.keys(charts)) { charts[key].destroy(); delete charts[key]; }
  $("details").innerHTML = `
    <h2 id="service-title">${escapeHtml(data.name)}<span class="muted">.${escapeHtml(data.namespace)}</span></h2>
    <div class="muted">${escapeHtml(data.fqdn)}${data.exists ? "" : " (no such Service)"}</div>
    <h3>Golden signals</h3>
    <div id="charts">
      <div class="chart" id="chart-rps"></div>
      <div class="chart" id="chart-errors"></div>
      <div class="chart" id="chart-latency"></div>
    </div>
    <div id="service-tables"></div>`;
  const width = Math.max(300, $("details").clientWidth - 40);
  const common = (title, series) => ({ title, width, height: 140, scales: { x: { time: true } },
    series: [{}, ...series], axes: [{}, { size: 50 }], legend: { live: false } });
  charts.rps = new uPlot(common("requests / s", [{ label: "rps", stroke: "#3f7fd9", width: 2 }]),
    [[], []], $("chart-rps"));
  charts.errors = new uPlot(common("error share (non-2xx/3xx, %)", [{ label: "errors %", stroke: "#c62828",
    width: 2 }]), [[], []], $("chart-errors"));
  charts.latency = new uPlot(common("latency (ms)", [{ label: "p50", stroke: "#4a8f4a", width: 2 },
    { label: "p99", stroke: "#ef8f00", width: 2 }]), [[], [], []], $("chart-latency"));
}

function updateCharts(data) {
  const s = data.series;
  charts.rps?.setData([s.time, s.rps]);
  charts.errors?.setData([s.time, s.errorRate.map((v) => (v === null ? null : v * 100))]);
  charts.latency?.setData([s.time, s.p50, s.p99]);
}

function edgeRows(edges, side) {
  if (!edges.length) return `<p class="muted">none in this window</p>`;
  return `<table><tr><th>${side === "from" ? "caller → workload" : "workload → callee"}</th><th>rps</th><th>errors</th><th>p99 ms</th><th>mTLS</th></tr>${
    edges.map((e) => `<tr><td>${escapeHtml(`${e.source} → ${e.target}`)}</td>
      <td>${fmt(e.rps, 2)}</td><td>${fmt(e.errorRate * 100)}%</td><td>${fmt(e.p99)}</td>
      <td>${e.mtls ? "yes" : "no"}</td></tr>`).join("")}</table>`;
}

function renderServiceTables(data) {
  const proxies = data.proxies.length ? `<table><tr><th>proxy</th><th>connected</th><th>acked version</th>
    <th>in sync</th><th>NACK / error</th></tr>${data.proxies.map((p) => `<tr><td>${escapeHtml(p.id)}</td>
    <td class="${p.connected ? "ok" : "bad"}">${p.connected ? "yes" : "no"}</td>
    <td>${escapeHtml(p.ackedVersion ?? "–")}</td><td class="${p.synced ? "ok" : "bad"}">${p.synced ? "yes" : "no"}</td>
    <td class="bad">${escapeHtml(p.nack || p.error || "")}</td></tr>`).join("")}</table>`
    : `<p class="muted">no proxies run this service's workloads</p>`;
  const config = data.config.length ? data.config.map((c) => `<div class="rule"><strong>${escapeHtml(c.kind)}
    ${escapeHtml(c.namespace)}/${escapeHtml(c.name)}</strong><pre>${escapeHtml(c.yaml)}</pre></div>`).join("")
    : `<p class="muted">no VirtualService or DestinationRule applies (default routing)</p>`;
  $("service-tables").innerHTML = `
    <h3>Inbound</h3>${edgeRows(data.inbound, "from")}
    <h3>Outbound</h3>${edgeRows(data.outbound, "to")}
    <h3>Config that applies</h3><div id="service-config">${config}</div>
    <h3>Push status</h3><div id="service-proxies">${proxies}</div>`;
}

async function loadTraces() {
  let data;
  try {
    data = await getJSON("api/traces?limit=100");
  } catch (err) {
    $("details").innerHTML = `<p class="bad">${escapeHtml(err.message)}</p>`;
    return;
  }
  if (state.view !== "traces") return;
  state.traces = data.traces;
  const rows = data.traces.map((t) => `<tr><td><a href="#/traces/${t.traceId}">${escapeHtml(t.root)}</a></td>
    <td>${escapeHtml(t.services.join(", "))}</td><td>${t.spans}</td><td>${fmt(t.durationMs, 2)}</td>
    <td class="${t.error ? "bad" : "ok"}">${t.error ? "error" : "ok"}</td></tr>`).join("");
  $("details").innerHTML = `<h2>Recent traces</h2>
    ${data.traces.length ? `<table class="traces" id="trace-list"><tr><th>root span</th><th>services</th>
      <th>spans</th><th>ms</th><th></th></tr>${rows}</table>`
      : `<p class="muted" id="trace-list">no traces yet: the sidecars export the sampled requests' spans to
        the control plane</p>`}`;
}

async function loadTrace(traceId) {
  let data;
  try {
    data = await getJSON(`api/traces/${encodeURIComponent(traceId)}`);
  } catch (err) {
    $("details").innerHTML = `<p class="bad">${escapeHtml(err.message)}</p>`;
    return;
  }
  state.trace = data;
  const spans = data.spans;
  const byId = new Map(spans.map((s) => [s.spanId, s]));
  const depth = (s) => { let d = 0; let p = byId.get(s.parentSpanId); while (p && d < 50) { d += 1;
    p = byId.get(p.parentSpanId); } return d; };
  // Children right under their parent: walk the tree from the roots, each level by start time.
  const children = new Map();
  for (const s of spans) {
    const key = byId.has(s.parentSpanId) ? s.parentSpanId : "";
    if (!children.has(key)) children.set(key, []);
    children.get(key).push(s);
  }
  const ordered = [];
  const walk = (key) => { for (const s of (children.get(key) || []).sort((a, b) => a.start - b.start)) {
    ordered.push(s); walk(s.spanId); } };
  walk("");
  const t0 = Math.min(...spans.map((s) => s.start));
  const total = Math.max(1, Math.max(...spans.map((s) => s.end)) - t0);
  const rows = ordered.map((s) => {
    const left = ((s.start - t0) / total) * 100;
    const width = Math.max(((s.end - s.start) / total) * 100, 0.3);
    return `<div class="span-row" data-span="${escapeHtml(s.spanId)}">
      <div class="span-name" style="padding-left:${depth(s) * 12}px" title="${escapeHtml(s.name)}">
        <strong>${escapeHtml(s.service)}</strong> ${escapeHtml(s.kind)} ${escapeHtml(s.name)}</div>
      <div class="span-track"><div class="span-bar ${s.error ? "error" : escapeHtml(s.kind)}"
        style="left:${left}%;width:${width}%"></div></div>
      <div class="span-ms">${fmt((s.end - s.start) / 1e6, 2)} ms</div></div>`;
  }).join("");
  $("details").innerHTML = `<p><a href="#/traces">← recent traces</a></p>
    <h2>Trace <span class="muted">${escapeHtml(data.traceId)}</span></h2>
    <p class="muted">${spans.length} spans · ${fmt(total / 1e6, 2)} ms</p>
    <div class="waterfall" id="waterfall">${rows}</div>`;
}

$("window").addEventListener("change", refresh);
refresh().then(fromHash);
setInterval(refresh, REFRESH_MS);
