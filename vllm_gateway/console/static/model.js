// A model server's page (#/models/<id>): its config line, state, restarts, events, log tail and
// recent errors (GET /admin/models/{id}, every 5 s), and the fleet's actions on it, each confirmed
// in a dialog first (POST /admin/models/{id}/{action}).

import { api } from "./api.js";
import { announce, badge, confirmDialog, h, list, num, replace, table, when } from "./ui.js";

const ACTIONS = {
  start: "starts the server through the fleet scripts",
  stop: "stops the server; its requests get 503 until it is started again",
  restart: "stops the server and starts it again; requests in flight are cut",
  sleep: "puts the model to sleep (its weights leave the GPU); the next request wakes it",
  wake: "wakes the sleeping model",
};

export function modelPage(main, page, id) {
  const heading = h("h1", { tabindex: "-1" }, `Model server ${id} `);
  const state = h("span", { class: "heading-badge" });
  heading.append(state);
  const facts = h("div", { class: "card" }, h("p", { text: "Loading…" }));
  const result = h("div", { class: "action-result" });
  const buttons = Object.keys(ACTIONS).map((action) =>
    h("button", { type: "button", class: action === "stop" ? "danger" : "", "data-key": `action-${action}`, text: capital(action), onclick: () => run(action) }),
  );
  const events = h("div");
  const log = h("pre", { class: "log", tabindex: "0", "aria-label": `Last lines of ${id}'s log` });
  const errors = h("div");
  main.append(
    h("p", { class: "breadcrumb" }, h("a", { href: "#/overview", text: "Overview" }), " / ", id),
    heading,
    facts,
    h("section", { "aria-labelledby": "actions-heading" }, h("h2", { id: "actions-heading", text: "Actions" }), h("div", { class: "button-row" }, buttons), result),
    h("section", { "aria-labelledby": "events-heading" }, h("h2", { id: "events-heading", text: "Events" }), events),
    h("section", { "aria-labelledby": "log-heading" }, h("h2", { id: "log-heading", text: "Log tail" }), log),
    h("section", { "aria-labelledby": "errors-heading" }, h("h2", { id: "errors-heading", text: "Recent errors" }), errors),
  );

  async function refresh() {
    const model = await api(`/admin/models/${encodeURIComponent(id)}`);
    replace(state, badge(model.status));
    replace(facts, details(model));
    replace(events, eventsTable(model.events || []));
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = (model.log_tail || []).join("\n") || "(empty)";
    if (atBottom) log.scrollTop = log.scrollHeight;
    replace(errors, errorsTable(model.errors || []));
  }

  async function run(action) {
    const sure = await confirmDialog({
      title: `${capital(action)} ${id}?`,
      text: `This ${ACTIONS[action]}.`,
      confirm: capital(action),
      danger: action === "stop" || action === "restart",
    });
    if (!sure) return;
    buttons.forEach((button) => (button.disabled = true));
    announce(`${capital(action)} ${id}: asked the fleet…`);
    try {
      const outcome = await api(`/admin/models/${encodeURIComponent(id)}/${action}`, { method: "POST" });
      announce(`${capital(action)} ${id}: done.`, "ok");
      const output = Array.isArray(outcome.output) ? outcome.output.join("\n") : outcome.output || "";
      replace(result, h("p", { text: `${capital(action)} ${id}: done.` }), output ? h("pre", { class: "log", text: output }) : null);
    } catch (error) {
      announce(`${capital(action)} ${id} failed: ${error.message}`, "error");
      replace(result, h("p", { class: "form-error", text: error.message }));
    } finally {
      buttons.forEach((button) => (button.disabled = false));
      page.refreshNow();
    }
  }

  page.poll(refresh);
}

function capital(word) {
  return word[0].toUpperCase() + word.slice(1);
}

function details(model) {
  const rows = [
    ["Model", model.model],
    ["State", model.status],
    ["Detail", model.detail || "—"],
    ["In flight", `${num(model.in_flight)} / ${model.capacity === null || model.capacity === undefined ? "no limit" : num(model.capacity)}`],
    ["Restarts", num(model.restarts)],
    ["Device", model.device || "—"],
    ["GPUs", list(model.gpus)],
    ["CPUs", list(model.cpus)],
  ];
  return [
    h("dl", { class: "facts wide" }, rows.map(([term, value]) => [h("dt", { text: term }), h("dd", { text: value })])),
    h("h2", { class: "small-heading", text: "Config" }),
    h("pre", { class: "config", tabindex: "0", "aria-label": "Config line", text: configText(model.config) }),
  ];
}

function configText(config) {
  if (config === null || config === undefined) return "—";
  return typeof config === "string" ? config : JSON.stringify(config, null, 1);
}

function eventsTable(events) {
  const newest = [...events].reverse();
  return table({
    caption: "Events of this server, newest first",
    hiddenCaption: true,
    rows: newest,
    empty: "No events.",
    columns: [
      { label: "Time", value: (event) => when(event.time) },
      { label: "Event", value: (event) => event.event },
      { label: "PID", value: (event) => event.pid ?? "—" },
      { label: "Detail", value: (event) => event.detail || otherFields(event), wrap: true },
    ],
  });
}

function otherFields(event) {
  const shown = new Set(["time", "event", "model", "pid", "detail"]);
  const rest = Object.entries(event).filter(([name]) => !shown.has(name));
  return rest.map(([name, value]) => `${name}=${typeof value === "object" ? JSON.stringify(value) : value}`).join(" ") || "—";
}

export function errorsTable(rows) {
  return table({
    caption: "Recent failed requests, newest first",
    hiddenCaption: true,
    rows,
    empty: "No errors.",
    columns: [
      { label: "Time", value: (row) => when(row.time) },
      { label: "Status", value: (row) => String(row.status), num: true },
      { label: "Path", value: (row) => `${row.method || ""} ${row.path || ""}` },
      { label: "Key", value: (row) => row.key_name || row.key || "—" },
      { label: "Duration", value: (row) => (row.duration_ms === null || row.duration_ms === undefined ? "—" : `${num(Math.round(row.duration_ms))} ms`), num: true },
      { label: "Request ID", value: (row) => h("code", { text: row.request_id || "—" }) },
    ],
  });
}
