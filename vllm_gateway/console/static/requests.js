// Requests (#/requests): the newest lines of the access log (GET /admin/requests), filtered by key,
// model and status, every 5 s. The log has every request, this page's own polls included; by default
// the page shows only those that went to a model (it hides the gateway's own endpoints itself, from
// a longer page of lines, since the API filters by key, model and status only).

// The gateway's own endpoints: /admin/*, /console/*, /health, /metrics, /v1/models, /v1/usage.
const OWN_PATH = /^\/(admin|console)(\/|$)|^\/(health|metrics)$|^\/v1\/(models|usage)(\/|$|\?)/;
const SHOWN = 100;
const SCANNED = 500; // lines asked for when the gateway's own are hidden

import { api, query } from "./api.js";
import { field, h, num, replace, table, when } from "./ui.js";

export function requestsPage(main, page) {
  const key = h("select", { name: "key" }, h("option", { value: "", text: "any key" }));
  const model = h("select", { name: "model" }, h("option", { value: "", text: "any model" }));
  const status = h("input", { type: "text", name: "status", placeholder: "e.g. 200, 4xx", size: "8", autocomplete: "off", spellcheck: "false" });
  const modelOnly = h("input", { type: "checkbox", name: "model_only", checked: true });
  const form = h(
    "form",
    { class: "filters card", "aria-label": "Filters" },
    field("Key", key),
    field("Model", model),
    field("Status", status, "A status or a class such as 5xx; empty: any."),
    field("Model requests only", modelOnly, "Hides the gateway's own endpoints (/admin, /console, /health, /v1/models)."),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", text: "Filter" })),
  );
  const updated = h("p", { class: "updated", text: "Loading…" });
  const rows = h("div");
  main.append(h("h1", { text: "Requests", tabindex: "-1" }), form, updated, rows);

  // Filters live in the URL's hash (#/requests?key=...), so a filtered view can be linked to.
  const wanted = new URLSearchParams(window.location.hash.split("?")[1] || "");
  status.value = wanted.get("status") || "";
  modelOnly.checked = wanted.get("all") !== "1";

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const filters = query({ key: key.value, model: model.value, status: status.value.trim(), all: modelOnly.checked ? "" : "1" });
    history.replaceState(null, "", `#/requests${filters}`);
    page.refreshNow();
  });
  for (const control of [key, model, modelOnly]) control.addEventListener("change", () => form.requestSubmit());

  page.once(async () => {
    const [keys, models] = await Promise.all([api("/admin/keys"), api("/v1/models")]);
    key.append(...keys.data.map((entry) => h("option", { value: entry.id, text: `${entry.name} (${entry.id})` })));
    model.append(...models.data.map((entry) => h("option", { value: entry.id, text: entry.id })));
    key.value = wanted.get("key") || "";
    model.value = wanted.get("model") || "";
  });

  page.poll(async () => {
    const chosen = new URLSearchParams(window.location.hash.split("?")[1] || "");
    const hideOwn = chosen.get("all") !== "1" && !chosen.get("model"); // a model's lines are all relayed
    const filters = { key: chosen.get("key"), model: chosen.get("model"), status: chosen.get("status") };
    const answer = await api(`/admin/requests${query({ ...filters, limit: hideOwn ? SCANNED : SHOWN })}`);
    const lines = hideOwn ? answer.data.filter((line) => !OWN_PATH.test(line.path || "")) : answer.data;
    replace(rows, requestsTable(lines.slice(0, SHOWN)));
    const scope = hideOwn ? ` to models, of the newest ${num(SCANNED)} lines` : answer.has_more ? ", the newest" : "";
    updated.textContent = `${num(Math.min(lines.length, SHOWN))} requests${scope}; updated ${when(Date.now() / 1000)}, every 5 s.`;
  });
}

function ms(value) {
  return value === null || value === undefined ? "—" : num(Math.round(value));
}

function requestsTable(data) {
  return table({
    caption: "Requests, newest first",
    hiddenCaption: true,
    rows: data,
    empty: "No requests match.",
    columns: [
      { label: "Time", value: (row) => when(row.time) },
      { label: "Status", value: (row) => h("span", { class: `http-status http-${String(row.status)[0]}xx`, text: row.status }), num: true },
      { label: "Request", value: (row) => `${row.method} ${row.path}` },
      { label: "Key", value: (row) => row.key_name || row.key || "—" },
      { label: "Model", value: (row) => row.model || "—" },
      { label: "Backend", value: (row) => row.backend || "—" },
      { label: "ms", value: (row) => ms(row.duration_ms), num: true },
      { label: "Queue ms", value: (row) => ms(row.queue_ms), num: true },
      { label: "Prompt tok", value: (row) => num(row.prompt_tokens), num: true },
      { label: "Output tok", value: (row) => num(row.completion_tokens), num: true },
      { label: "Request ID", value: (row) => h("code", { text: row.request_id || "—" }) },
    ],
  });
}
