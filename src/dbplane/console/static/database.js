// One database: status, actions, topology (members by zone, roles, lag), endpoints,
// its alarms (alarms.js), metrics (charts from GET /v1/databases/{name}/metrics,
// metrics.js), performance insights (insights.js), operations, events, backups and
// snapshots. Each panel loads on its own: a call the caller's policies refuse shows the
// API's message in that panel, the others still load.

import { alarmsTable } from "./alarms.js";
import { api, enc } from "./api.js";
import { badge, errorBox, formatBytes, h, mono, panel, poll, table, when } from "./dom.js";
import { runInsights } from "./insights.js";
import { runMetrics } from "./metrics.js";
import { renderOperation, trackOperation, trackSnapshot } from "./tracker.js";

const REFRESH_MS = 5000;

const ACTIONS = {
  switchover: {
    label: "Switchover",
    explain: "Planned switchover: the standby (or a replica) becomes primary once it has every " +
      "committed write; the proxy holds new writer transactions meanwhile.",
    run: (name) => api("POST", `/v1/databases/${enc(name)}/switchover`, { to: null }),
  },
  failover: {
    label: "Failover",
    explain: "Forced failover, for drills: Patroni promotes the target whatever the primary does.",
    run: (name) => api("POST", `/v1/databases/${enc(name)}/failover`, { to: null }),
  },
  snapshot: {
    label: "Create snapshot",
    explain: "A manual backup, kept until deleted. Needs continuous backups on.",
    run: (name) => api("POST", `/v1/databases/${enc(name)}/snapshots`, {}),
    snapshot: true,
  },
};

export function renderDatabase(main, name) {
  const heading = h("div", { class: "page-head" },
    h("nav", { "aria-label": "Breadcrumb", class: "crumbs" },
      h("a", { href: "#/databases" }, "Databases"), " / "),
    h("h1", null, name), h("span", { id: "db-status" }));
  const sentence = h("p", { class: "status-sentence", id: "db-sentence" });
  const actions = actionBar(name, () => page.refresh());
  const panels = {
    summary: panel("summary", "Summary"),
    topology: panel("topology", "Topology"),
    alarms: panel("alarms", "Alarms", h("a", { href: "#/alarms", class: "panel-link" }, "all alarms")),
    metrics: panel("metrics", "Metrics"),
    insights: panel("insights", "Performance insights"),
    operations: panel("operations", "Operations"),
    events: panel("events", "Events"),
    backups: panel("backups", "Backups and snapshots"),
  };
  main.replaceChildren(heading, sentence, actions.element,
    h("div", { class: "panels" }, panels.summary.section, panels.topology.section),
    panels.alarms.section, panels.metrics.section, panels.insights.section, panels.operations.section,
    panels.events.section, panels.backups.section);

  const calls = () => [
    api("GET", `/v1/databases/${enc(name)}`),
    api("GET", "/v1/hosts"),
    api("GET", `/v1/operations?database=${enc(name)}`),
    api("GET", `/v1/events?database=${enc(name)}&limit=50`),
    api("GET", `/v1/snapshots?database=${enc(name)}`),
    api("GET", `/v1/alarms?database=${enc(name)}`),
  ];

  function render(db, hosts, ops, events, snaps, alarms) {
    if (db.status === "fulfilled") {
      const d = db.value;
      document.getElementById("db-status").replaceChildren(badge(d.status));
      sentence.textContent = d.status_message;
      panels.summary.body.replaceChildren(summary(d));
      panels.topology.body.replaceChildren(topology(d, hosts.status === "fulfilled" ? hosts.value : null));
    } else {
      sentence.textContent = "";
      panels.summary.body.replaceChildren(errorBox(db.reason));
      panels.topology.body.replaceChildren();
    }
    panels.alarms.body.replaceChildren(settled(alarms, (a) => alarmsTable(a, false)));
    panels.operations.body.replaceChildren(settled(ops, operationsTable));
    panels.events.body.replaceChildren(settled(events, eventsTable));
    panels.backups.body.replaceChildren(db.status === "fulfilled" ? backupSummary(db.value.backup) : "",
      settled(snaps, snapshotsTable));
  }
  const page = poll(calls, render, REFRESH_MS);
  const metrics = runMetrics(panels.metrics.body, panels.metrics.section.querySelector(".panel-head"), name);
  const insights = runInsights(panels.insights.body, panels.insights.section.querySelector(".panel-head"),
    name);
  return {
    dispose() { page.dispose(); actions.stop(); metrics.stop(); insights.stop(); },
  };
}

function settled(result, render) {
  return result.status === "fulfilled" ? render(result.value) : errorBox(result.reason);
}

// -- actions --------------------------------------------------------------------------------------

function actionBar(name, onChange) {
  const result = h("div", { class: "result", id: "action-result" });
  const confirmBox = h("div", { class: "confirm", hidden: true, role: "group",
    "aria-label": "Confirm action" });
  let tracker = null;
  const buttons = Object.entries(ACTIONS).map(([key, action]) => h("button", {
    type: "button", class: "btn", "data-action": key,
    onclick: () => ask(key, action),
  }, action.label));

  function ask(key, action) {
    const go = h("button", { type: "button", class: "btn btn-primary", "data-confirm": key },
      `${action.label} ${name}`);
    const cancel = h("button", { type: "button", class: "btn btn-quiet" }, "Cancel");
    confirmBox.replaceChildren(h("p", null, action.explain), go, " ", cancel);
    confirmBox.hidden = false;
    cancel.addEventListener("click", () => { confirmBox.hidden = true; });
    go.addEventListener("click", () => { confirmBox.hidden = true; start(action); });
    go.focus();
  }

  async function start(action) {
    if (tracker) tracker.stop();
    result.replaceChildren(h("p", null, `${action.label}: sending…`));
    try {
      const record = await action.run(name);
      tracker = action.snapshot ? trackSnapshot(record, onChange) : trackOperation(record, onChange);
      result.replaceChildren(tracker.element);
      onChange();
    } catch (e) {
      result.replaceChildren(errorBox(e, action.label.toLowerCase()));
    }
  }

  return {
    element: h("div", { class: "action-bar" }, h("div", { class: "actions" }, buttons), confirmBox, result),
    stop: () => tracker && tracker.stop(),
  };
}

// -- summary and topology -------------------------------------------------------------------------

function summary(d) {
  const rows = [
    ["Engine", `${d.engine} ${d.version}`],
    ["Class", `${d.class} (${d.memory_mb} MB)`],
    ["Availability", d.multi_az ? "Multi-AZ: synchronous standby in another zone" : "single-AZ"],
    ["Read replicas", String(d.replicas)],
    ["Storage", `${formatBytes(d.storage_used_bytes)} used of ${d.storage_gb} GB`],
    ["Writer endpoint", mono(d.endpoints.writer)],
    ["Reader endpoint", mono(d.endpoints.reader)],
    ["Admin user", mono(d.admin_user)],
    ["Client TLS", d.tls ? d.tls.clients : "—"],
    ["Created", when(d.created_at)],
    ["Pending changes", d.pending_changes.length ? d.pending_changes.join("; ") : "none"],
  ];
  return h("dl", { class: "facts" }, rows.map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
}

const ROLE_LABEL = {
  primary: "primary", sync_standby: "sync standby", replica: "replica", unknown: "unknown",
};

// Patroni's member states: running and streaming are healthy (an operation "running" is not)
const MEMBER_TONES = {
  running: "ok", streaming: "ok", starting: "busy", restarting: "busy", "creating replica": "busy",
  "running custom bootstrap script": "busy", stopped: "bad", "start failed": "bad", crashed: "bad",
};

function memberState(state) {
  return badge(state, MEMBER_TONES[state] || "warn");
}

function lag(m) {
  if (m.role === "primary") return "—";
  const parts = [];
  if (m.lag_bytes !== null && m.lag_bytes !== undefined) parts.push(formatBytes(m.lag_bytes));
  if (m.lag_seconds !== null && m.lag_seconds !== undefined) parts.push(`${m.lag_seconds.toFixed(1)} s`);
  return parts.length ? parts.join(" / ") : "unknown";
}

function topology(d, hosts) {
  const zones = [...new Set([...(hosts || []).map((x) => x.zone), ...d.members.map((m) => m.zone)])].sort();
  const diagram = h("div", { class: "zones", role: "list", "aria-label": "Members by zone" },
    zones.map((zone) => {
      const members = d.members.filter((m) => m.zone === zone);
      return h("div", { class: "zone", role: "listitem", "data-zone": zone },
        h("div", { class: "zone-name" }, `zone ${zone}`),
        members.length ? members.map((m) => h("div", { class: `member role-${m.role}`, "data-member": m.name,
          "data-role": m.role },
          h("div", { class: "member-role" }, ROLE_LABEL[m.role] || m.role),
          h("div", { class: "member-name" }, m.name, " ", memberState(m.state)),
          h("div", { class: "member-where mono" }, `${m.host} ${m.address}:${m.port}`),
          m.role === "primary" ? null : h("div", { class: "member-lag" }, "lag ", lag(m))))
          : h("div", { class: "zone-empty muted" }, "no member"));
    }));
  const rows = d.members.map((m) => h("tr", { "data-member": m.name },
    h("th", { scope: "row" }, m.name),
    h("td", null, h("span", { class: `role role-${m.role}` }, ROLE_LABEL[m.role] || m.role)),
    h("td", null, m.zone),
    h("td", null, m.host),
    h("td", null, mono(`${m.address}:${m.port}`)),
    h("td", null, memberState(m.state)),
    h("td", { class: "num" }, lag(m)),
    h("td", { class: "num" }, m.timeline ?? "—"),
    h("td", null, m.message || "")));
  return h("div", null, diagram,
    table("Members", ["Member", "Role", "Zone", "Host", "Node endpoint", "State", "Lag", "TL", "Note"],
      rows, "No member placed yet."));
}

// -- operations, events, backups ------------------------------------------------------------------

function operationsTable(ops) {
  const latest = ops.slice().reverse().slice(0, 20);
  const rows = latest.map((o) => h("tr", { "data-operation": o.id, "data-kind": o.kind },
    h("th", { scope: "row" }, mono(o.id)),
    h("td", null, o.kind),
    h("td", null, renderOperation({ ...o, events: [] })),
    h("td", null, when(o.created_at)),
    h("td", null, when(o.updated_at))));
  return table("Operations, newest first", ["Operation", "Kind", "State and progress", "Started", "Updated"],
    rows, "No operations.");
}

function eventsTable(events) {
  const rows = events.slice().reverse().map((e) => h("tr", { "data-event-kind": e.kind },
    h("td", null, when(e.time)), h("td", null, e.kind), h("td", null, e.message)));
  return table("Events, newest first", ["Time", "Event", "Message"], rows, "No events.");
}

function backupSummary(b) {
  const settings = b.settings || {};
  const archive = b.archive;
  const rows = [
    ["Continuous backups", settings.enabled ? `on, kept ${settings.retention_days} days` : "off"],
    ["WAL archive", archive ? `${archive.state}${archive.error ? `: ${archive.error}` : ""}` : "—"],
    ["Restorable", b.earliest_restorable_time
      ? [when(b.earliest_restorable_time), " to ", when(b.latest_restorable_time)] : "—"],
  ];
  return h("dl", { class: "facts facts-inline" }, rows.map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
}

function snapshotsTable(snaps) {
  const rows = snaps.map((s) => h("tr", { "data-snapshot": s.id },
    h("th", { scope: "row" }, mono(s.id)),
    h("td", null, s.type),
    h("td", null, s.kind),
    h("td", null, badge(s.state)),
    h("td", { class: "num" }, formatBytes(s.size_bytes)),
    h("td", null, when(s.started_at)),
    h("td", null, when(s.finished_at)),
    h("td", null, s.error || s.verify_error || "")));
  return table("Snapshots and automated backups, newest first",
    ["Backup", "Type", "Kind", "State", "Size", "Started", "Finished", "Error"], rows, "No backups.");
}
