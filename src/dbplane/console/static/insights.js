// The performance insights panel of a database (GET /v1/databases/{name}/insights): the
// database load (average active sessions, sampled every second by the collectors) as
// stacked bars by wait event type, the top wait events, top SQL from pg_stat_statements on
// the primary (or the API's sentence on how to enable it) and the sessions active now.

import { api, enc } from "./api.js";
import { errorBox, h, mono, poll, table } from "./dom.js";
import { PALETTE, plotFrame, svg } from "./metrics.js";

const REFRESH_MS = 15000;
const RANGES = ["5m", "15m", "1h", "6h", "24h"];
const ORDERS = { total: "total time", mean: "mean time", calls: "calls" };
const BARS = 60;                     // at most this many bars over the range
// wait event type -> PALETTE index (the legend's swatches use the same index)
const WAIT_COLOURS = { CPU: 1, IO: 0, Lock: 4, LWLock: 3, IPC: 2, Client: 5 };

export function waitColour(type) {
  return type in WAIT_COLOURS ? WAIT_COLOURS[type] : 6;
}

// The API's timeline ([[t, {wait_event_type: aas}]], the members' points side by side) as
// bars of `width` seconds: each bar is the database's average active sessions in it by
// wait event type (a point's sessions times the `each` seconds it stands for, over the width).
export function loadBars(timeline, since, until, each) {
  const width = each * Math.max(1, Math.ceil((until - since) / (BARS * each)));
  const bins = new Map();
  for (const [t, byType] of timeline) {
    const start = Math.floor(t / width) * width;
    const bin = bins.get(start) || {};
    for (const [type, v] of Object.entries(byType)) bin[type] = (bin[type] || 0) + (v * each) / width;
    bins.set(start, bin);
  }
  const bars = [...bins.entries()].sort((a, b) => a[0] - b[0]).map(([start, byType]) => ({ start, byType }));
  return { width, bars };
}

function aas(v) {
  return v === null || v === undefined ? "—" : v.toFixed(v < 10 ? 2 : 1);
}

export function formatMs(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms >= 1000) return `${(ms / 1000).toFixed(ms >= 100000 ? 0 : 2)} s`;
  return `${ms.toFixed(ms >= 100 ? 0 : 2)} ms`;
}

function loadChart(data, label) {
  const types = Object.keys(data.load_by_type || {});
  const { width, bars } = loadBars(data.load.timeline || [], data.since, data.until, data.point_seconds);
  for (const b of bars) for (const t of Object.keys(b.byType)) if (!types.includes(t)) types.push(t);
  const figure = h("figure", { class: "chart load-chart", "data-chart": "load", "data-bars": bars.length },
    h("figcaption", null, "Database load by wait event type ",
      h("span", { class: "muted" }, `(average active sessions per ${width} s)`)));
  if (!bars.length) {
    figure.append(h("p", { class: "placeholder" }, "no load samples in this range yet"));
    return figure;
  }
  const totals = bars.map((b) => Object.values(b.byType).reduce((s, v) => s + v, 0));
  const top = Math.max(...totals) * 1.15 || 1;
  const { plot, x, y } = plotFrame(`Database load, ${label}: ${aas(data.load.average_active_sessions)} ` +
    "average active sessions", data.since, data.until, top, (v) => aas(v));
  for (const b of bars) {
    const x0 = x(Math.max(b.start, data.since));
    const w = Math.max(1, x(Math.min(b.start + width, data.until)) - x0 - 1);
    let base = 0;
    for (const type of types) {
      const v = b.byType[type] || 0;
      if (v <= 0) continue;
      const clock = new Date(b.start * 1000).toISOString().slice(11, 19);
      plot.append(svg("rect", { x: x0.toFixed(1), y: y(base + v).toFixed(1), width: w.toFixed(1),
        height: Math.max(0.5, y(base) - y(base + v)).toFixed(1), fill: PALETTE[waitColour(type)],
        "data-wait": type }, svg("title", null, `${clock}Z ${type} ${aas(v)}`)));
      base += v;
    }
  }
  figure.append(plot, h("ul", { class: "legend" }, types.map((type) =>
    h("li", { "data-wait": type }, h("span", { class: "swatch", "data-colour": waitColour(type),
      "aria-hidden": "true" }), type, " ", h("strong", null, aas((data.load_by_type || {})[type] || 0))))));
  return figure;
}

function waitsTable(waits) {
  const rows = waits.slice(0, 10).map((w) => {
    const wait = `${w.wait_event_type}:${w.wait_event}`;
    return h("tr", { "data-wait-event": wait },
      h("th", { scope: "row" }, h("span", { class: "swatch", "data-colour": waitColour(w.wait_event_type),
        "aria-hidden": "true" }), wait),
      h("td", { class: "num" }, aas(w.average_active_sessions)));
  });
  return table("Top wait events", ["Wait event", "Average active sessions"], rows, "No load in this range.");
}

function statementsTable(statements) {
  const rows = statements.map((s) => h("tr", { "data-query": s.queryid },
    h("td", { class: "num" }, formatMs(s.total_time_ms)),
    h("td", { class: "num" }, formatMs(s.mean_time_ms)),
    h("td", { class: "num" }, s.calls),
    h("td", { class: "num" }, s.rows),
    h("td", { class: "num" }, s.load_share === null ? "—" : `${Math.round(s.load_share * 100)}%`),
    h("td", null, s.database || "—", " ", h("span", { class: "muted" }, s.user || "")),
    h("td", { class: "query" }, mono(s.query))));
  return table("Top SQL", ["Total time", "Mean time", "Calls", "Rows", "Load", "Database and user", "Query"],
    rows, "No statements recorded yet.");
}

function sessionsTable(sessions) {
  const rows = sessions.map((s) => h("tr", { "data-pid": s.pid },
    h("th", { scope: "row", class: "num" }, s.pid),
    h("td", null, s.user || "—"),
    h("td", null, s.dbname || "—"),
    h("td", null, s.state),
    h("td", null, s.wait_event_type ? `${s.wait_event_type}:${s.wait_event}` : "CPU"),
    h("td", { class: "num" }, `${s.duration_s.toFixed(1)} s`),
    h("td", { class: "query" }, mono(s.query))));
  return table("Sessions now", ["PID", "User", "Database", "State", "Waiting for", "For", "Query"], rows,
    "No session is active now.");
}

function render(data, range, order) {
  const notes = [];
  if (data.unavailable_hosts && data.unavailable_hosts.length) {
    notes.push(h("p", { class: "alert alert-warn", role: "status" }, "No answer from the collectors on ",
      data.unavailable_hosts.join(", "), ": their members' load is missing."));
  }
  const load = data.load;
  return h("div", { "data-insights": "loaded" }, notes,
    h("p", { class: "insights-summary" }, h("strong", null, aas(load.average_active_sessions)),
      ` average active sessions over the last ${range}`,
      h("span", { class: "muted" },
        ` (${load.samples} samples per member; primary ${data.primary || "none"})`)),
    h("div", { class: "insights-load" }, loadChart(data, `last ${range}`),
      h("div", null, h("h3", null, "Top wait events"), waitsTable(load.by_wait || []))),
    h("h3", null, `Top SQL by ${ORDERS[order]}`,
      h("span", { class: "muted" }, " (pg_stat_statements on the primary, since its last reset)")),
    data.statements_notice
      ? h("p", { class: "alert alert-warn", role: "status", "data-notice": "statements" },
        data.statements_notice)
      : null,
    data.statements_notice && !data.statements.length ? null : statementsTable(data.statements),
    h("h3", null, "Sessions now"),
    sessionsTable(data.sessions || []),
    (data.notes || []).map((n) => h("p", { class: "muted" }, n)));
}

// The panel's contents and its own refresh loop; returns {stop()}.
export function runInsights(panelBody, headerSlot, name) {
  let range = "15m";
  let order = "total";
  const rangeSelect = h("select", { id: "insights-range", "aria-label": "Load over" },
    RANGES.map((r) => h("option", { value: r, selected: r === range }, `last ${r}`)));
  const orderSelect = h("select", { id: "insights-order", "aria-label": "Top SQL by" },
    Object.entries(ORDERS).map(([k, label]) => h("option", { value: k, selected: k === order },
      `by ${label}`)));
  rangeSelect.addEventListener("change", () => { range = rangeSelect.value; loop.refresh(); });
  orderSelect.addEventListener("change", () => { order = orderSelect.value; loop.refresh(); });
  headerSlot.append(rangeSelect, orderSelect);

  const loop = poll(
    () => [api("GET", `/v1/databases/${enc(name)}/insights?since=${enc(range)}&by=${enc(order)}`)],
    (result) => panelBody.replaceChildren(result.status === "fulfilled" ? render(result.value, range, order)
      : errorBox(result.reason)),
    REFRESH_MS);
  return { stop: loop.dispose };
}
