// Follows what an action started until it ends: an operation (GET /v1/operations/{id})
// or a snapshot (GET /v1/snapshots/{id}), polled every second, shown with its progress.

import { api, enc } from "./api.js";
import { badge, errorBox, h, when } from "./dom.js";

const POLL_MS = 1000;

// Returns {element, stop()}; onDone(record) is called once when it ends.
export function trackOperation(op, onDone) {
  return track({
    title: `Operation ${op.kind}`, id: op.id, initial: op,
    fetch: () => api("GET", `/v1/operations/${enc(op.id)}`),
    done: (o) => o.state === "succeeded" || o.state === "failed",
    render: renderOperation, onDone,
  });
}

export function trackSnapshot(snapshot, onDone) {
  return track({
    title: "Snapshot", id: snapshot.id, initial: snapshot,
    fetch: () => api("GET", `/v1/snapshots/${enc(snapshot.id)}`),
    done: (s) => ["available", "failed", "expired"].includes(s.state),
    render: renderSnapshot, onDone,
  });
}

function track({ title, id, initial, fetch, done, render, onDone }) {
  const body = h("div", { class: "tracker-body" });
  const element = h("section", { class: "tracker", "aria-live": "polite", "data-tracking": id },
    h("h3", null, title, " ", h("code", { class: "mono" }, id)), body);
  let timer = null;
  let stopped = false;
  const show = (record, error) => {
    body.replaceChildren(render(record), error ? errorBox(error, "could not refresh") : "");
    element.dataset.state = record.state;
  };
  const poll = async () => {
    let record = initial;
    try {
      record = await fetch();
      initial = record;
      show(record);
    } catch (e) {
      show(record, e);
    }
    if (stopped) return;
    if (done(record)) {
      if (onDone) onDone(record);
    } else {
      timer = setTimeout(poll, POLL_MS);
    }
  };
  show(initial);
  timer = setTimeout(poll, done(initial) ? 0 : POLL_MS);
  return { element, stop() { stopped = true; clearTimeout(timer); } };
}

function progressBar(value, label) {
  return h("progress", { max: 100, value, "aria-label": label }, `${value}%`);
}

export function renderOperation(op) {
  const events = (op.events || []).slice(-5);
  return h("div", { class: "op" },
    h("div", { class: "op-line" }, badge(op.state), " ",
      progressBar(op.progress || 0, `${op.kind} progress`), " ",
      h("span", { class: "op-pct" }, `${op.progress || 0}%`), " ",
      h("span", { class: "op-msg" }, op.message || "")),
    op.error ? h("div", { class: "alert alert-error", role: "alert", "data-code": op.error.code },
      h("p", { class: "alert-message" }, op.error.message),
      op.error.hint ? h("p", { class: "alert-hint" }, "Hint: ", op.error.hint) : null) : null,
    events.length ? h("ol", { class: "op-events" },
      events.map((e) => h("li", null, when(e.time), " ", e.message))) : null);
}

function renderSnapshot(s) {
  return h("div", { class: "op" },
    h("div", { class: "op-line" }, badge(s.state), " ",
      h("span", { class: "op-msg" }, s.state === "pending" ? "waiting for a backup worker"
        : s.state === "running" ? `taking the base backup on ${s.host || "a host"}`
          : s.state === "available" ? "the snapshot is available" : s.error || s.state)));
}
