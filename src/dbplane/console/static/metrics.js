// The metrics panel: the database's key metrics from GET /v1/databases/{name}/metrics,
// drawn as small SVG line charts, one line per member. Counters are shown as per-second
// rates (a decrease is a reset, as Prometheus' rate()). Only points the API returned are
// drawn; an API without the route (404) shows "no metrics yet".

import { api, ApiError, enc } from "./api.js";
import { errorBox, formatBytes, h, poll } from "./dom.js";

const REFRESH_MS = 15000;
const RANGES = ["15m", "1h", "6h", "24h"];
const SVG_NS = "http://www.w3.org/2000/svg";
export const PALETTE = ["#1f5fbf", "#1a7f37", "#8250df", "#b35900", "#b42318", "#0a7c86", "#6e7781"];
const W = 480;
const H = 150;
const PAD = { left: 58, right: 8, top: 8, bottom: 22 };

const CHARTS = [
  { metric: "dbplane_pg_connections", title: "Connections", unit: "count",
    limit: "dbplane_pg_max_connections" },
  { metric: "dbplane_pg_xact_commit_total", title: "Commits per second", unit: "rate", counter: true },
  { metric: "dbplane_member_cpu_seconds_total", title: "CPU (cores used)", unit: "cores", counter: true },
  { metric: "dbplane_member_resident_memory_bytes", title: "Memory (resident)", unit: "bytes" },
  { metric: "dbplane_pg_database_size_bytes", title: "Database size", unit: "bytes" },
  { metric: "dbplane_pg_replication_lag_seconds", title: "Replication lag", unit: "seconds" },
  { metric: "dbplane_member_up", title: "Member up (1) or unreachable (0)", unit: "up" },
];

export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

export function formatValue(v, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (unit === "bytes") return formatBytes(v);
  if (unit === "seconds") return v < 10 ? `${v.toFixed(2)} s` : `${Math.round(v)} s`;
  if (unit === "cores") return v.toFixed(v < 1 ? 3 : 2);
  if (unit === "rate") return v < 10 ? `${v.toFixed(2)}/s` : `${Math.round(v)}/s`;
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

// member -> [[t, v], ...]: series of one metric summed per member at equal timestamps
// (connections come per state), counters turned into per-second rates.
export function perMember(series, metric, counter = false) {
  const byMember = new Map();
  for (const s of series.filter((x) => x.name === metric)) {
    const member = s.labels.member || s.labels.host || "?";
    const sums = byMember.get(member) || new Map();
    for (const [t, v] of s.points) sums.set(t, (sums.get(t) || 0) + v);
    byMember.set(member, sums);
  }
  const out = new Map();
  for (const member of [...byMember.keys()].sort()) {
    let points = [...byMember.get(member).entries()].sort((a, b) => a[0] - b[0]);
    if (counter) points = rates(points);
    out.set(member, points);
  }
  return out;
}

export function rates(points) {
  const out = [];
  for (let i = 1; i < points.length; i += 1) {
    const [t0, v0] = points[i - 1];
    const [t1, v1] = points[i];
    if (t1 > t0) out.push([t1, (v1 >= v0 ? v1 - v0 : v1) / (t1 - t0)]);
  }
  return out;
}

// Runs of points without a gap wider than `gap` seconds (a member down draws no line).
function runs(points, gap) {
  const out = [];
  let run = [];
  for (const p of points) {
    if (run.length && p[0] - run[run.length - 1][0] > gap) {
      out.push(run);
      run = [];
    }
    run.push(p);
  }
  if (run.length) out.push(run);
  return out;
}

function clock(t) {
  return new Date(t * 1000).toISOString().slice(11, 16);
}

// An empty chart: an SVG with three horizontal grid lines labelled 0, top / 2 and top by
// `label(v)`, and the time axis from since to until; x(t) and y(v) place points in it.
// Shared by the metric charts and the load chart (insights.js).
export function plotFrame(ariaLabel, since, until, top, label) {
  const x = (t) => PAD.left + ((t - since) / Math.max(1, until - since)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart-svg",
    "aria-label": ariaLabel });
  for (const v of [0, top / 2, top]) {
    plot.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid-line" }),
      svg("text", { x: PAD.left - 4, y: y(v) + 4, "text-anchor": "end", class: "axis" }, label(v)));
  }
  for (const [t, anchor] of [[since, "start"], [(since + until) / 2, "middle"], [until, "end"]]) {
    plot.append(svg("text", { x: x(t), y: H - 6, "text-anchor": anchor, class: "axis" }, `${clock(t)}Z`));
  }
  return { plot, x, y };
}

function chart(spec, data, since, until, step, limits) {
  const lines = perMember(data, spec.metric, spec.counter);
  const all = [...lines.values()].flat();
  const figure = h("figure", { class: "chart", "data-chart": spec.metric, "data-points": all.length });
  const maxLimit = limits && limits.size ? Math.max(...[...limits.values()].map((p) => p.at(-1)[1])) : null;
  figure.append(h("figcaption", null, spec.title,
    maxLimit !== null ? h("span", { class: "muted" }, ` (max_connections ${maxLimit})`) : null));
  if (!all.length) {
    figure.append(h("p", { class: "placeholder" }, "no points in this range yet"));
    return figure;
  }
  const top = spec.unit === "up" ? 1 : Math.max(...all.map((p) => p[1])) * 1.15 || 1;
  const latest = [...lines.entries()]
    .map(([m, p]) => `${m} ${p.length ? formatValue(p.at(-1)[1], spec.unit) : "—"}`);
  const { plot, x, y } = plotFrame(`${spec.title}: latest ${latest.join(", ")}`, since, until, top,
    (v) => formatValue(spec.unit === "count" ? Math.round(v) : v, spec.unit));
  const gap = Math.max(3 * (step || 10), 35);
  [...lines.entries()].forEach(([, points], i) => {
    const colour = PALETTE[i % PALETTE.length];
    for (const run of runs(points, gap)) {
      if (run.length === 1) {
        plot.append(svg("circle", { cx: x(run[0][0]), cy: y(run[0][1]), r: 2, fill: colour }));
      } else {
        plot.append(svg("polyline", { points: run.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`)
          .join(" "), fill: "none", stroke: colour, "stroke-width": 1.5 }));
      }
    }
  });
  figure.append(plot, h("ul", { class: "legend" }, [...lines.entries()].map(([member, points], i) =>
    h("li", null, h("span", { class: "swatch", "data-colour": i % PALETTE.length, "aria-hidden": "true" }),
      member, " ", h("strong", null, points.length ? formatValue(points.at(-1)[1], spec.unit) : "—")))));
  return figure;
}

// The panel's contents and its own refresh loop; returns {stop()}.
export function runMetrics(panelBody, headerSlot, name) {
  let range = "15m";
  const select = h("select", { id: "metrics-range", "aria-label": "Time range" },
    RANGES.map((r) => h("option", { value: r, selected: r === range }, `last ${r}`)));
  select.addEventListener("change", () => { range = select.value; loop.refresh(); });
  headerSlot.append(select);

  function show(result) {
    const e = result.reason;
    panelBody.replaceChildren(result.status === "fulfilled" ? render(result.value)
      : e instanceof ApiError && e.status === 404 && e.code !== "database_not_found"
        ? h("p", { class: "placeholder", "data-metrics": "none" },
          "No metrics yet: this API has no GET /v1/databases/{name}/metrics. Charts of connections, ",
          "commits, CPU, memory, size and replication lag show here once the platform collects metrics.")
        : errorBox(e));
  }

  function render(data) {
    const limits = perMember(data.series, "dbplane_pg_max_connections");
    const grid = h("div", { class: "charts", "data-metrics": "charts" },
      CHARTS.map((spec) => chart(spec, data.series, data.since, data.until, data.step,
        spec.limit ? limits : null)));
    const notes = [];
    if (data.unavailable_hosts && data.unavailable_hosts.length) {
      notes.push(h("p", { class: "alert alert-warn", role: "status" }, "No answer from the collectors on ",
        data.unavailable_hosts.join(", "), ": their members' points are missing."));
    }
    return h("div", null, notes, grid);
  }

  const loop = poll(() => [api("GET", `/v1/databases/${enc(name)}/metrics?since=${enc(range)}`)], show,
    REFRESH_MS);
  return { stop: loop.dispose };
}
