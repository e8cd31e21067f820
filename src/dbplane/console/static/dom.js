// Small DOM and formatting helpers. Every value from the API enters the page as a text
// node (never as HTML), so nothing a database name or message holds can run.

import { ApiError } from "./api.js";

// h("td", {class: "mono"}, "text", child, [more]): attributes, then children.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// A panel: a titled section whose body is replaced on every refresh.
export function panel(id, title, ...extra) {
  const body = h("div", { class: "panel-body" });
  const section = h("section", { class: "panel", id, "aria-labelledby": `${id}-title` },
    h("header", { class: "panel-head" }, h("h2", { id: `${id}-title` }, title), ...extra), body);
  return { section, body };
}

// An API refusal as the API said it: message, hint, code. role=alert is read out at once.
export function errorBox(err, context = "") {
  const e = err instanceof ApiError ? err
    : new ApiError(0, "console_error", String((err && err.message) || err));
  const title = e.status === 403 ? "Access denied" : e.status === 401 ? "Not signed in"
    : e.status === 0 ? "Cannot reach the API" : `Refused (HTTP ${e.status})`;
  return h("div", { class: "alert alert-error", role: "alert", "data-code": e.code },
    h("p", { class: "alert-title" }, context ? `${title}: ${context}` : title),
    h("p", { class: "alert-message" }, e.message),
    e.hint ? h("p", { class: "alert-hint" }, "Hint: ", e.hint) : null,
    h("p", { class: "alert-code" }, "code ", h("code", null, e.code)));
}

const TONES = {
  // database phases
  available: "ok", creating: "busy", modifying: "busy", starting: "busy", "failing-over": "busy",
  deleting: "busy", degraded: "warn", stopped: "off", unavailable: "bad", failed: "bad",
  "storage-full": "bad",
  // operations and backups
  pending: "busy", running: "busy", succeeded: "ok", expired: "off",
  // members
  streaming: "ok", "in archive recovery": "warn", stopping: "warn", "start failed": "bad",
  "crashed": "bad", unknown: "warn",
};

export function badge(text, tone = TONES[text] || "neutral") {
  return h("span", { class: `badge tone-${tone}`, "data-status": text }, text);
}

export function mono(text) {
  return text ? h("code", { class: "mono" }, text) : h("span", { class: "muted" }, "—");
}

export function formatBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

// Unix seconds -> "2026-11-24 10:22:31Z" in a <time> element with a relative title.
export function when(seconds) {
  if (!seconds) return h("span", { class: "muted" }, "—");
  const d = new Date(seconds * 1000);
  const iso = d.toISOString();
  return h("time", { datetime: iso, title: ago(seconds) }, `${iso.slice(0, 10)} ${iso.slice(11, 19)}Z`);
}

export function ago(seconds) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

// A table with a caption, header cells with scope, and a row per item (or an empty line).
export function table(caption, headers, rows, empty) {
  const head = h("thead", null, h("tr", null, headers.map((t) => h("th", { scope: "col" }, t))));
  const body = h("tbody", null, rows.length ? rows
    : h("tr", null, h("td", { colspan: headers.length, class: "empty" }, empty)));
  return h("div", { class: "table-wrap" },
    h("table", { class: "grid" }, h("caption", { class: "visually-hidden" }, caption), head, body));
}

// A refresh loop: calls() (an array of API promises) now and every `everyMs`, then
// show(...their settled results). Only the latest round renders and schedules the next, so
// an answer that arrives after a newer request (or after dispose) is dropped.
export function poll(calls, show, everyMs) {
  let timer = null;
  let disposed = false;
  let latest = 0;
  async function refresh() {
    clearTimeout(timer);
    const mine = ++latest;
    const results = await Promise.allSettled(calls());
    if (disposed || mine !== latest) return;
    try {
      show(...results);
    } finally {
      timer = setTimeout(refresh, everyMs);
    }
  }
  refresh();
  return { refresh, dispose() { disposed = true; clearTimeout(timer); } };
}
