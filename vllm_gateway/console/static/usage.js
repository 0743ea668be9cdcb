// Usage (#/usage): tokens and requests per key and model over a range of days, by hour or day, as a
// chart and tables, with a CSV export built here from the same JSON. An admin session reads
// GET /admin/usage (every key); any other reads its own key's GET /v1/usage, with its limits now.

import { api, usageBuckets } from "./api.js";
import { barChart } from "./charts.js";
import { announce, append, field, h, num, replace, table, utc } from "./ui.js";

const DAY = 86400;

function isoDay(seconds) {
  return new Date(seconds * 1000).toISOString().slice(0, 10);
}

function dayStart(text) {
  return Date.parse(`${text}T00:00:00Z`) / 1000;
}

export function usagePage(main, page, session) {
  const admin = session.admin;
  const today = dayStart(isoDay(Date.now() / 1000));
  const from = h("input", { type: "date", name: "from", value: isoDay(today - 6 * DAY), required: true });
  const to = h("input", { type: "date", name: "to", value: isoDay(today), required: true });
  const bucket = h("select", { name: "bucket" }, h("option", { value: "1d", text: "day" }), h("option", { value: "1h", text: "hour" }));
  const by = h("select", { name: "by" }, h("option", { value: "key", text: "key" }), h("option", { value: "model", text: "model" }));
  if (!admin) by.value = "model";
  const exportButton = h("button", { type: "button", text: "Export CSV", disabled: true });
  const form = h(
    "form",
    { class: "filters card", "aria-label": "Usage range" },
    field("From (UTC)", from),
    field("To (UTC), inclusive", to),
    field("Bucket", bucket),
    admin ? field("Chart by", by) : null,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", text: "Show" }), exportButton),
  );
  const limits = h("div");
  const results = h("div", {}, h("p", { text: "Loading…" }));
  append(
    main,
    h("h1", { text: admin ? "Usage" : "My usage", tabindex: "-1" }),
    admin ? null : h("p", { class: "lead", text: `Key ${session.name} (${session.key_id}).` }),
    admin ? null : h("section", { "aria-labelledby": "limits-heading" }, h("h2", { id: "limits-heading", text: "Limits now" }), limits),
    form,
    h("section", { "aria-label": "Usage figures" }, results),
  );
  let rows = [];
  let names = new Map();

  async function load() {
    const start = dayStart(from.value);
    const end = dayStart(to.value) + DAY;
    if (!(start < end)) throw new Error("The range's first day must come before its last.");
    const params = { start_time: start, end_time: end, bucket_width: bucket.value, group_by: admin ? "api_key_id,model" : "model", limit: bucket.value === "1h" ? 168 : 31 };
    const [usage, keys] = await Promise.all([
      usageBuckets(admin ? "/admin/usage" : "/v1/usage", params),
      admin ? api("/admin/keys") : Promise.resolve({ data: [{ id: session.key_id, name: session.name }] }),
    ]);
    names = new Map(keys.data.map((key) => [key.id, key.name]));
    if (!admin) replace(limits, limitsTable(usage.answer?.limits));
    rows = usage.buckets.flatMap((item) =>
      item.results.map((result) => ({
        start: item.start_time,
        end: item.end_time,
        key_id: result.api_key_id ?? session.key_id,
        key_name: names.get(result.api_key_id ?? session.key_id) ?? "(revoked)",
        model: result.model ?? "",
        requests: result.num_model_requests,
        input: result.input_tokens,
        output: result.output_tokens,
      })),
    );
    const step = bucket.value === "1h" ? 3600 : DAY;
    const count = usage.buckets.length;
    replace(
      results,
      usage.truncated ? h("p", { class: "form-error", text: "Only the first pages of this range are shown: choose a shorter one." }) : null,
      h("div", { class: "charts" }, charts(rows, admin ? by.value : "model", usage.buckets[0]?.start_time ?? start, step, count)),
      admin ? h("h2", { text: "Per key" }) : null,
      admin ? totalsTable("Per key", rows, (row) => row.key_id, (row) => `${row.key_name} (${row.key_id})`) : null,
      h("h2", { text: "Per model" }),
      totalsTable("Per model", rows, (row) => row.model, (row) => row.model),
      h("h2", { text: `Per ${bucket.value === "1h" ? "hour" : "day"}` }),
      detailTable(rows, admin),
    );
    exportButton.disabled = false;
  }

  async function show() {
    try {
      await load();
      const total = rows.reduce((sum, row) => sum + row.requests, 0);
      announce(`Usage from ${from.value} to ${to.value}: ${num(total)} requests.`);
    } catch (error) {
      replace(results, h("p", { class: "form-error", role: "alert", text: error.message }));
      announce(error.message, "error");
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    show();
  });
  by.addEventListener("change", show);
  exportButton.addEventListener("click", () => download(`usage-${from.value}-${to.value}-${bucket.value}.csv`, csv(rows)));
  page.once(load);
}

function charts(rows, dimension, start, step, count) {
  const label = dimension === "key" ? (row) => row.key_name : (row) => row.model || "(all)";
  const groups = new Map();
  for (const row of rows) {
    const name = label(row);
    if (!groups.has(name)) groups.set(name, { tokens: new Array(count).fill(0), requests: new Array(count).fill(0) });
    const at = Math.round((row.start - start) / step);
    groups.get(name).tokens[at] += row.input + row.output;
    groups.get(name).requests[at] += row.requests;
  }
  const series = (figure) => [...groups].map(([name, values]) => ({ name, values: values[figure] }));
  const per = step === 3600 ? "hour" : "day";
  return [
    barChart({ title: `Tokens per ${per}, by ${dimension}`, start, step, series: series("tokens"), unit: "tokens" }),
    barChart({ title: `Requests per ${per}, by ${dimension}`, start, step, series: series("requests"), unit: "requests" }),
  ];
}

function totalsTable(caption, rows, keyOf, labelOf) {
  const totals = new Map();
  for (const row of rows) {
    const key = keyOf(row);
    const total = totals.get(key) || { label: labelOf(row), requests: 0, input: 0, output: 0 };
    total.requests += row.requests;
    total.input += row.input;
    total.output += row.output;
    totals.set(key, total);
  }
  const all = [...totals.values()].sort((a, b) => b.input + b.output - (a.input + a.output));
  if (all.length > 1) {
    const sum = (name) => all.reduce((total, entry) => total + entry[name], 0);
    all.push({ label: "All", requests: sum("requests"), input: sum("input"), output: sum("output"), all: true });
  }
  return table({
    caption,
    hiddenCaption: true,
    rows: all,
    empty: "No requests in this range.",
    columns: [
      { label: caption.replace("Per ", "").replace(/^./, (letter) => letter.toUpperCase()), value: (entry) => (entry.all ? h("strong", { text: entry.label }) : entry.label) },
      { label: "Requests", value: (entry) => num(entry.requests), num: true },
      { label: "Input tokens", value: (entry) => num(entry.input), num: true },
      { label: "Output tokens", value: (entry) => num(entry.output), num: true },
      { label: "Tokens", value: (entry) => num(entry.input + entry.output), num: true },
    ],
  });
}

function detailTable(rows, admin) {
  const newest = [...rows].sort((a, b) => b.start - a.start);
  return table({
    caption: "Usage per bucket, newest first",
    hiddenCaption: true,
    rows: newest,
    empty: "No requests in this range.",
    columns: [
      { label: "From", value: (row) => utc(row.start, row.end - row.start < DAY) },
      admin ? { label: "Key", value: (row) => row.key_name } : null,
      { label: "Model", value: (row) => row.model },
      { label: "Requests", value: (row) => num(row.requests), num: true },
      { label: "Input tokens", value: (row) => num(row.input), num: true },
      { label: "Output tokens", value: (row) => num(row.output), num: true },
    ].filter(Boolean),
  });
}

function limitsTable(limits) {
  const windows = [
    ...(limits?.requests || []).map((window) => ({ kind: "requests", ...window })),
    ...(limits?.tokens || []).map((window) => ({ kind: "tokens", ...window })),
  ];
  return table({
    caption: "Rate and token windows now",
    hiddenCaption: true,
    rows: windows,
    empty: "No limits.",
    columns: [
      { label: "Limit", value: (window) => `${window.window} ${window.kind}` },
      { label: "Used", value: (window) => num(window.used), num: true },
      { label: "Remaining", value: (window) => num(window.remaining), num: true },
      { label: "Resets in", value: (window) => `${num(window.resets_in_s)} s`, num: true },
    ],
  });
}

// -- CSV, made in the page from the rows shown --

function cell(value) {
  let text = String(value);
  if (/^[=+\-@\t\r]/.test(text)) text = `'${text}`; // a spreadsheet would run a formula
  return /[",\n\r]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

export function csv(rows) {
  const head = ["bucket_start", "bucket_end", "api_key_id", "key_name", "model", "requests", "input_tokens", "output_tokens"];
  const lines = rows.map((row) =>
    [new Date(row.start * 1000).toISOString(), new Date(row.end * 1000).toISOString(), row.key_id, row.key_name, row.model, row.requests, row.input, row.output]
      .map(cell)
      .join(","),
  );
  return [head.join(","), ...lines].join("\r\n") + "\r\n";
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "text/csv;charset=utf-8" }));
  const link = h("a", { href: url, download: name, class: "visually-hidden", text: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  announce(`Exported ${name}.`, "ok");
}
