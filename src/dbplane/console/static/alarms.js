// Alarms: the Alarms page (#/alarms, GET /v1/alarms[?state=]), one alarm with its state
// history (#/alarms/NAME, GET /v1/alarms/{name}) and the table the database page shows for
// its own alarms (GET /v1/alarms?database=). States are written by the controller's
// evaluator; the console only reads them (docs/observability.md#alarms).

import { api, enc } from "./api.js";
import { badge, errorBox, h, mono, panel, poll, table, when } from "./dom.js";

const REFRESH_MS = 5000;
const STATES = ["ALARM", "INSUFFICIENT_DATA", "OK"];          // the order of the list, too
const STATE_TONES = { ALARM: "bad", INSUFFICIENT_DATA: "warn", OK: "ok" };

export function stateBadge(state) {
  return badge(state, STATE_TONES[state] || "neutral");
}

// ALARM first, then INSUFFICIENT_DATA, then OK; by name within a state.
export function sortAlarms(alarms) {
  const rank = (a) => (STATES.includes(a.state) ? STATES.indexOf(a.state) : STATES.length);
  return alarms.slice().sort((a, b) => rank(a) - rank(b) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

// As `dbplane alarms list` writes it: max(m / d) > 0.8 for 1 of 1 x 60 s
export function condition(a) {
  const matchers = Object.entries(a.labels || {}).map(([k, v]) => `${k}=${v}`).join(",");
  const what = a.metric + (matchers ? `{${matchers}}` : "") + (a.denominator ? ` / ${a.denominator}` : "");
  return `${a.statistic}(${what}) ${a.comparison} ${a.threshold} for ` +
    `${a.datapoints_to_alarm} of ${a.evaluation_periods} x ${a.period} s`;
}

export function formatValue(v) {
  return v === null || v === undefined ? "—" : String(Number(v.toPrecision(4)));
}

function alarmLink(name) {
  return h("a", { href: `#/alarms/${enc(name)}` }, name);
}

function databaseLink(database) {
  return database ? h("a", { href: `#/databases/${enc(database)}` }, database)
    : h("span", { class: "muted" }, "(platform)");
}

// The alarms as a table, ALARM first; withDatabase adds the database column.
export function alarmsTable(alarms, withDatabase = true) {
  const rows = sortAlarms(alarms).map((a) => h("tr", { "data-alarm": a.name, "data-state": a.state },
    h("th", { scope: "row" }, alarmLink(a.name)),
    h("td", null, stateBadge(a.state)),
    withDatabase ? h("td", null, databaseLink(a.database)) : null,
    h("td", { class: "wrap" }, mono(condition(a))),
    h("td", { class: "num" }, formatValue(a.value)),
    h("td", null, when(a.state_since)),
    h("td", { class: "reason" }, a.reason)));
  const headers = ["Alarm", "State", withDatabase ? "Database" : null, "Condition", "Value", "Last change",
    "Reason"].filter(Boolean);
  return table("Alarms, ALARM first", headers, rows, "No alarms.");
}

// "2 ALARM, 1 INSUFFICIENT_DATA, 12 OK"
function counts(alarms) {
  const n = (s) => alarms.filter((a) => a.state === s).length;
  return h("span", { class: "alarm-counts" }, STATES.filter((s) => n(s)).map((s, i) =>
    [i ? ", " : "", `${n(s)} `, stateBadge(s)]));
}

// -- #/alarms ---------------------------------------------------------------------------------------

export function renderAlarms(main) {
  const list = panel("alarm-list", "All alarms", h("span", { class: "updated", "aria-live": "off" }));
  const filter = h("select", { id: "alarm-state", "aria-label": "Show alarms in state" },
    h("option", { value: "" }, "every state"), STATES.map((s) => h("option", { value: s }, `${s} only`)));
  const summary = h("span", { class: "muted", id: "alarm-summary" });
  main.replaceChildren(
    h("div", { class: "page-head" }, h("h1", null, "Alarms"), summary,
      h("div", { class: "actions" }, filter)),
    h("p", { class: "status-sentence" }, "Threshold rules on the platform's metrics, evaluated every 10 s ",
      "by the controller. Every database gets defaults for the classic failures; change them with ",
      h("code", null, "dbplane alarms set"), "."),
    list.section);
  const page = poll(
    () => [api("GET", `/v1/alarms${filter.value ? `?state=${enc(filter.value)}` : ""}`)],
    (result) => {
      if (result.status === "fulfilled") {
        list.body.replaceChildren(alarmsTable(result.value));
        summary.replaceChildren(counts(result.value));
      } else {
        list.body.replaceChildren(errorBox(result.reason));
        summary.replaceChildren();
      }
      list.section.querySelector(".updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    }, REFRESH_MS);
  filter.addEventListener("change", () => page.refresh());
  return page;
}

// -- #/alarms/NAME ----------------------------------------------------------------------------------

export function renderAlarm(main, name) {
  const status = h("span", { id: "alarm-status" });
  const sentence = h("p", { class: "status-sentence", id: "alarm-reason" });
  const about = panel("alarm-definition", "Definition");
  const history = panel("alarm-history", "State history", h("span", { class: "muted" }, "newest first"));
  main.replaceChildren(
    h("div", { class: "page-head" },
      h("nav", { "aria-label": "Breadcrumb", class: "crumbs" },
        h("a", { href: "#/alarms" }, "Alarms"), " / "),
      h("h1", null, name), status),
    sentence, about.section, history.section);
  return poll(() => [api("GET", `/v1/alarms/${enc(name)}`)], (result) => {
    if (result.status !== "fulfilled") {
      status.replaceChildren();
      sentence.textContent = "";
      about.body.replaceChildren(errorBox(result.reason));
      history.body.replaceChildren();
      return;
    }
    const a = result.value;
    status.replaceChildren(stateBadge(a.state));
    const since = new Date(a.state_since * 1000).toISOString();
    sentence.textContent = `${a.state} since ${since.slice(0, 10)} ${since.slice(11, 19)}Z: ${a.reason}`;
    about.body.replaceChildren(definition(a));
    history.body.replaceChildren(historyTable(a.history || []));
  }, REFRESH_MS);
}

function definition(a) {
  const rows = [
    ["Database", [databaseLink(a.database),
      a.default ? h("span", { class: "muted" }, " (one of its default alarms)") : ""]],
    ["About", a.description || "—"],
    ["Condition", mono(condition(a))],
    ["Missing data", a.treat_missing],
    ["Latest value", `${formatValue(a.value)}${a.evaluated_at ? "" : " (not evaluated yet)"}`],
    ["Evaluated", when(a.evaluated_at)],
    ["Notifies", notifies(a)],
    ["Updated", when(a.updated_at)],
  ];
  return h("dl", { class: "facts" }, rows.map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
}

// Where changes into or out of ALARM go (alarms/evaluator.py): the database's events and
// the webhooks, counted only, since a webhook's URL often carries a token.
function notifies(a) {
  const n = (a.webhooks || []).length;
  const to = [a.database ? `the events of ${a.database}` : null,
    n ? `${n} webhook${n > 1 ? "s" : ""}` : null];
  return to.filter(Boolean).join(" and ") || "nothing: a platform alarm without webhooks";
}

function historyTable(changes) {
  const rows = changes.map((c) => h("tr", { "data-change": `${c.old}>${c.new}` },
    h("td", null, when(c.time)),
    h("td", null, stateBadge(c.old), " → ", stateBadge(c.new)),
    h("td", { class: "num" }, formatValue(c.value)),
    h("td", null, c.reason)));
  return table("State changes, newest first", ["Time", "Change", "Value", "Reason"], rows,
    "No state change yet: the alarm has kept its first state.");
}
