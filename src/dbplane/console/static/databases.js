// The databases page: every database the caller may see (GET /v1/databases filters by
// policy), the live hosts and their zones, and the create form (POST /v1/databases).

import { api, enc } from "./api.js";
import { badge, errorBox, h, mono, panel, poll, table } from "./dom.js";
import { trackOperation } from "./tracker.js";

const REFRESH_MS = 5000;
const NAME_PATTERN = "[a-z][a-z0-9\\-]{1,41}";

export function renderDatabases(main) {
  const list = panel("databases", "All databases",
    h("span", { class: "updated", "aria-live": "off" }));
  const hosts = panel("hosts", "Hosts");
  const createButton = h("button", { type: "button", class: "btn btn-primary", "aria-expanded": "false",
    "aria-controls": "create-database" }, "Create database");
  const create = createForm(() => page.refresh());
  create.section.hidden = true;
  createButton.addEventListener("click", () => {
    create.section.hidden = !create.section.hidden;
    createButton.setAttribute("aria-expanded", String(!create.section.hidden));
    if (!create.section.hidden) create.focus();
  });

  main.replaceChildren(
    h("div", { class: "page-head" },
      h("h1", null, "Databases"), h("div", { class: "actions" }, createButton)),
    create.section, list.section, hosts.section);

  const page = poll(() => [api("GET", "/v1/databases"), api("GET", "/v1/hosts")], (dbs, live) => {
    list.body.replaceChildren(dbs.status === "fulfilled" ? databasesTable(dbs.value) : errorBox(dbs.reason));
    hosts.body.replaceChildren(live.status === "fulfilled" ? hostsTable(live.value) : errorBox(live.reason));
    list.section.querySelector(".updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }, REFRESH_MS);
  return { dispose() { page.dispose(); create.stop(); } };
}

function databasesTable(dbs) {
  const rows = dbs.map((d) => h("tr", { "data-database": d.name },
    h("th", { scope: "row" }, h("a", { href: `#/databases/${enc(d.name)}` }, d.name)),
    h("td", null, badge(d.status)),
    h("td", null, `${d.engine} ${d.version}`),
    h("td", null, d.class),
    h("td", null, d.multi_az ? "Multi-AZ" : "single-AZ"),
    h("td", { class: "num" }, d.replicas),
    h("td", { class: "num" }, d.members),
    h("td", null, mono(d.endpoints && d.endpoints.writer)),
    h("td", null, mono(d.endpoints && d.endpoints.reader))));
  return table("Databases", ["Name", "Status", "Engine", "Class", "Availability", "Read replicas",
    "Members", "Writer endpoint", "Reader endpoint"], rows, "No databases yet: create one.");
}

function hostsTable(hosts) {
  const rows = hosts.map((x) => h("tr", null,
    h("th", { scope: "row" }, x.name), h("td", null, x.zone), h("td", null, mono(x.address))));
  return table("Live hosts", ["Host", "Zone", "Address"], rows, "No agent is running.");
}

function createForm(onChange) {
  const name = h("input", { id: "new-name", name: "name", required: true, pattern: NAME_PATTERN,
    autocomplete: "off", spellcheck: "false", "aria-describedby": "new-name-help" });
  const cls = h("select", { id: "new-class", name: "class" }, h("option", { value: "small" }, "small"));
  const multiAz = h("input", { id: "new-multi-az", name: "multi_az", type: "checkbox" });
  const replicas = h("input", { id: "new-replicas", name: "replicas", type: "number", min: 0, max: 5,
    value: 0 });
  const storage = h("input", { id: "new-storage", name: "storage_gb", type: "number", min: 1, value: 10 });
  const backups = h("input", { id: "new-backups", name: "backups", type: "checkbox", checked: true });
  const submit = h("button", { type: "submit", class: "btn btn-primary" }, "Create");
  const result = h("div", { class: "result" });
  let tracker = null;

  api("GET", "/v1/classes").then((classes) => {
    cls.replaceChildren(...classes.map((c) => h("option", { value: c.name, selected: c.name === "small" },
      `${c.name} — ${c.memory_mb} MB, ${c.max_connections} connections`)));
  }).catch(() => { /* the API refuses the create with its own message */ });

  const form = h("form", { class: "form form-grid", "aria-labelledby": "create-database-title" },
    field("Name", name, h("span", { id: "new-name-help", class: "help" },
      "2-42 lowercase letters, digits and '-', starting with a letter")),
    field("Instance class", cls),
    field("Multi-AZ (synchronous standby in another zone)", multiAz, null, "check"),
    field("Read replicas", replicas),
    field("Storage quota (GB)", storage),
    field("Continuous backups", backups, null, "check"),
    h("div", { class: "form-actions" }, submit));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    if (tracker) tracker.stop();
    result.replaceChildren();
    try {
      const op = await api("POST", "/v1/databases", {
        name: name.value.trim(), class: cls.value, multi_az: multiAz.checked,
        replicas: Number(replicas.value), storage_gb: Number(storage.value), backups: backups.checked,
      });
      tracker = trackOperation(op, onChange);
      result.replaceChildren(h("p", null, "Creating ", h("a", { href: `#/databases/${enc(op.database)}` },
        op.database), "."), tracker.element);
      onChange();
    } catch (e) {
      result.replaceChildren(errorBox(e, "create database"));
    } finally {
      submit.disabled = false;
    }
  });
  const section = h("section", { class: "panel", id: "create-database",
    "aria-labelledby": "create-database-title" },
    h("header", { class: "panel-head" }, h("h2", { id: "create-database-title" }, "Create database")),
    h("div", { class: "panel-body" }, form, result));
  return { section, focus: () => name.focus(), stop: () => tracker && tracker.stop() };
}

function field(label, input, help, kind = "") {
  return h("div", { class: `field ${kind}` }, h("label", { for: input.id }, label), input, help);
}
