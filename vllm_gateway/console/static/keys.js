// Keys (#/keys): the keys with their limits, last use and 30 days of usage, a form to create one,
// edit, rotate and revoke in dialogs, and the audit trail. A new secret (created or rotated) is shown
// once in the page, with a copy button, and dropped from the page when dismissed; it is never stored.

import { api, usageBuckets } from "./api.js";
import { announce, confirmDialog, field, formDialog, h, num, replace, table, when } from "./ui.js";

const DAY = 86400;

export function keysPage(main, page) {
  const secretSlot = h("div");
  const keysSlot = h("div", {}, h("p", { text: "Loading…" }));
  const auditSlot = h("div");
  const state = { keys: [], models: [], usage: new Map() };
  const createForm = h("form", { class: "key-form card", "aria-labelledby": "create-heading", novalidate: true });
  main.append(
    h("h1", { text: "Keys", tabindex: "-1" }),
    secretSlot,
    h("section", { "aria-labelledby": "keys-heading" }, h("h2", { id: "keys-heading", text: "API keys" }), keysSlot),
    h("section", {}, h("h2", { id: "create-heading", text: "Create a key" }), createForm),
    h("section", { "aria-labelledby": "audit-heading" }, h("h2", { id: "audit-heading", text: "Audit trail" }), auditSlot),
  );

  function showSecret(record, verb) {
    const value = h("code", { class: "secret-value", id: "secret-value", text: record.key });
    const copy = h("button", {
      type: "button",
      class: "primary",
      text: "Copy",
      onclick: () => copyText(value),
    });
    const done = h("button", {
      type: "button",
      text: "Done",
      onclick: () => {
        secretSlot.replaceChildren(); // the secret leaves the page
        announce("The key is no longer shown.");
      },
    });
    const panel = h(
      "section",
      { class: "card secret", "aria-labelledby": "secret-heading" },
      h("h2", { id: "secret-heading", tabindex: "-1", text: `Key ${verb}: ${record.name}` }),
      h("p", { text: "Shown only this once: copy it now. The gateway keeps only its hash." }),
      h("p", { class: "secret-line" }, value, " ", copy, " ", done),
    );
    secretSlot.replaceChildren(panel);
    panel.querySelector("h2").focus();
  }

  async function loadKeys() {
    const [keys, models, usage] = await Promise.all([
      api("/admin/keys"),
      api("/v1/models"),
      usageBuckets("/admin/usage", {
        start_time: Math.floor(Date.now() / 1000) - 30 * DAY,
        bucket_width: "1d",
        group_by: "api_key_id",
        limit: 31,
      }),
    ]);
    state.keys = keys.data;
    state.models = models.data.map((model) => model.id);
    state.usage = new Map();
    for (const bucket of usage.buckets) {
      for (const result of bucket.results) {
        const total = state.usage.get(result.api_key_id) || { requests: 0, tokens: 0 };
        total.requests += result.num_model_requests;
        total.tokens += result.input_tokens + result.output_tokens;
        state.usage.set(result.api_key_id, total);
      }
    }
    replace(keysSlot, keysTable());
    if (!createForm.childElementCount) buildCreateForm();
  }

  async function loadAudit() {
    const audit = await api("/admin/audit?limit=100");
    replace(auditSlot, auditTable([...audit.data].reverse()));
  }

  function keysTable() {
    return table({
      caption: "API keys",
      hiddenCaption: true,
      rows: state.keys,
      empty: "No keys.",
      columns: [
        {
          label: "Name",
          value: (key) =>
            h(
              "span",
              { class: "key-name" },
              h("strong", { text: key.name }),
              key.admin ? h("span", { class: "tag", text: "admin" }) : null,
              key.disabled ? h("span", { class: "tag tag-off", text: "disabled" }) : null,
              h("br"),
              h("code", { class: "muted", text: key.id }),
              h("br"),
              h("code", { class: "muted", title: "The key's first characters", text: `${key.prefix}…` }),
            ),
        },
        { label: "Models", value: (key) => (key.models ? key.models.join(", ") : "all") },
        { label: "Rate limit", value: (key) => key.rate_limit || "default" },
        { label: "Token limit", value: (key) => key.token_limit || "default" },
        { label: "Weight", value: (key) => (key.weight ?? "default"), num: true },
        { label: "Parallel", value: (key) => (key.max_parallel_requests ?? "default"), num: true },
        { label: "Expires", value: (key) => (key.expires_at ? when(key.expires_at, false) : "never") },
        { label: "Last used", value: (key) => (key.last_used_at ? when(key.last_used_at, false) : "never") },
        { label: "Req. 30 d", value: (key) => num(state.usage.get(key.id)?.requests || 0), num: true },
        { label: "Tokens 30 d", value: (key) => num(state.usage.get(key.id)?.tokens || 0), num: true },
        {
          label: "Actions",
          value: (key) =>
            h(
              "span",
              { class: "row-actions" },
              h("button", { type: "button", "data-key": `edit-${key.id}`, "aria-label": `Edit ${key.name}`, text: "Edit", onclick: () => edit(key) }),
              h("button", { type: "button", "data-key": `rotate-${key.id}`, "aria-label": `Rotate ${key.name}`, text: "Rotate", onclick: () => rotate(key) }),
              h("button", { type: "button", class: "danger", "data-key": `revoke-${key.id}`, "aria-label": `Revoke ${key.name}`, text: "Revoke", onclick: () => revoke(key) }),
            ),
        },
      ],
    });
  }

  function buildCreateForm() {
    const inputs = keyFields(createForm, state.models, null);
    const error = h("p", { class: "form-error", role: "alert" });
    createForm.append(error, h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", text: "Create key" })));
    createForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.textContent = "";
      try {
        const body = fieldsOf(inputs, null);
        const created = await api("/admin/keys", { method: "POST", body });
        createForm.reset();
        showSecret(created, "created");
        announce(`Created key ${created.name}.`, "ok");
        await Promise.all([loadKeys(), loadAudit()]);
      } catch (failure) {
        error.textContent = failure.message;
      }
    });
  }

  async function edit(key) {
    const changed = await formDialog({
      title: `Edit ${key.name}`,
      build: (form) => (form.inputs = keyFields(form, state.models, key)),
      submit: async (form) => {
        const changes = fieldsOf(form.inputs, key);
        if (!Object.keys(changes).length) return key;
        return api(`/admin/keys/${encodeURIComponent(key.id)}`, { method: "PATCH", body: changes });
      },
    });
    if (changed) {
      announce(`Saved ${changed.name}.`, "ok");
      await Promise.all([loadKeys(), loadAudit()]);
    }
  }

  async function rotate(key) {
    const rotated = await formDialog({
      title: `Rotate ${key.name}`,
      action: "Rotate",
      build: (form) => {
        form.append(h("p", { text: "The key gets a new secret, shown once; its id, limits and usage stay." }));
        form.grace = h("input", { type: "number", min: "0", step: "1", inputmode: "numeric", placeholder: "0" });
        form.append(field("Grace, in seconds", form.grace, "How long the old secret keeps working (empty: it stops now)."));
      },
      submit: (form) => {
        const grace = form.grace.value.trim();
        const body = grace === "" ? undefined : { grace_seconds: Number(grace) };
        return api(`/admin/keys/${encodeURIComponent(key.id)}/rotate`, { method: "POST", body });
      },
    });
    if (rotated) {
      showSecret(rotated, "rotated");
      announce(`Rotated ${rotated.name}.`, "ok");
      await Promise.all([loadKeys(), loadAudit()]);
    }
  }

  async function revoke(key) {
    const sure = await confirmDialog({
      title: `Revoke ${key.name}?`,
      text: `The key ${key.id} stops working at once and is removed. Its usage stays in the ledger.`,
      confirm: "Revoke",
      danger: true,
    });
    if (!sure) return;
    try {
      await api(`/admin/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
      announce(`Revoked ${key.name}.`, "ok");
    } catch (error) {
      announce(`Revoking ${key.name} failed: ${error.message}`, "error");
    }
    await Promise.all([loadKeys(), loadAudit()]);
  }

  page.once(() => Promise.all([loadKeys(), loadAudit()]));
}

// -- the key form, shared by "create" (key null) and "edit" --

function keyFields(form, models, key) {
  const text = (name, placeholder) =>
    h("input", { type: "text", name, placeholder, value: key?.[name] ?? "", autocomplete: "off", spellcheck: "false" });
  const inputs = {
    name: text("name", ""),
    rate_limit: text("rate_limit", "default, e.g. 100/minute"),
    token_limit: text("token_limit", "default, e.g. 40000/minute;2000000/day"),
    weight: h("input", { type: "number", name: "weight", min: "0.01", max: "1000", step: "any", placeholder: "1", value: key?.weight ?? "" }),
    max_parallel_requests: h("input", { type: "number", name: "max_parallel_requests", min: "1", step: "1", placeholder: "default", value: key?.max_parallel_requests ?? "" }),
    expires_at: h("input", { type: "datetime-local", name: "expires_at", value: key?.expires_at ? localInput(key.expires_at) : "" }),
    admin: h("input", { type: "checkbox", name: "admin", checked: Boolean(key?.admin) }),
    models: models.map((model) => h("input", { type: "checkbox", name: "models", value: model, checked: Boolean(key?.models?.includes(model)) })),
  };
  inputs.name.required = true;
  const modelBoxes = h(
    "fieldset",
    { class: "models-field" },
    h("legend", { text: "Models" }),
    h("p", { class: "hint", text: "None ticked: every model." }),
    inputs.models.map((box) => field(box.value, box)),
  );
  form.append(
    h(
      "div",
      { class: "form-grid" },
      field("Name", inputs.name),
      field("Rate limit", inputs.rate_limit, "Requests per window; empty: the gateway's default."),
      field("Token limit", inputs.token_limit, "Tokens per window; empty: the default."),
      field("Weight", inputs.weight, "Share of a busy model's turns, 0.01 to 1000; empty: 1."),
      field("Max parallel requests", inputs.max_parallel_requests, "In flight and waiting at once; empty: the default."),
      field("Expires", inputs.expires_at, "In your time zone; empty: never."),
    ),
    modelBoxes,
    field("Admin key (may use /admin/*)", inputs.admin),
  );
  if (key) {
    inputs.disabled = h("input", { type: "checkbox", name: "disabled", checked: Boolean(key.disabled) });
    form.append(field("Disabled", inputs.disabled));
  }
  return inputs;
}

function localInput(seconds) {
  const date = new Date(seconds * 1000);
  const local = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return local.toISOString().slice(0, 16);
}

// The body of a create (key null: the fields given) or of an edit (the fields that changed; an
// emptied one goes back to its default, null).
function fieldsOf(inputs, key) {
  const values = {
    name: inputs.name.value.trim(),
    rate_limit: inputs.rate_limit.value.trim() || null,
    token_limit: inputs.token_limit.value.trim() || null,
    weight: inputs.weight.value === "" ? null : Number(inputs.weight.value),
    max_parallel_requests: inputs.max_parallel_requests.value === "" ? null : Number(inputs.max_parallel_requests.value),
    expires_at: inputs.expires_at.value ? Math.floor(new Date(inputs.expires_at.value).getTime() / 1000) : null,
    admin: inputs.admin.checked,
  };
  const ticked = inputs.models.filter((box) => box.checked).map((box) => box.value);
  values.models = ticked.length ? ticked : null;
  if (inputs.disabled) values.disabled = inputs.disabled.checked;
  if (!values.name) throw new Error("A key needs a name.");
  const body = {};
  for (const [name, value] of Object.entries(values)) {
    if (key === null) {
      if (value !== null && value !== false) body[name] = value;
    } else if (changed(key[name], value, name)) {
      body[name] = value;
    }
  }
  return body;
}

function changed(before, after, name) {
  if (name === "models") return JSON.stringify(before ?? null) !== JSON.stringify(after);
  // The form shows minutes: an expiry is changed when it moved by a minute or more.
  if (name === "expires_at") return (before == null) !== (after == null) || (before != null && Math.abs(before - after) >= 60);
  return (before ?? null) !== after;
}

async function copyText(node) {
  try {
    await navigator.clipboard.writeText(node.textContent);
  } catch {
    // Plain HTTP to a host other than localhost has no clipboard API: select it for Ctrl+C instead.
    const range = document.createRange();
    range.selectNodeContents(node);
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    announce("Selected: press Ctrl+C (⌘C) to copy.");
    return;
  }
  announce("Copied to the clipboard.", "ok");
}

function auditTable(entries) {
  return table({
    caption: "Audit trail, newest first",
    hiddenCaption: true,
    rows: entries,
    empty: "No key changes yet.",
    columns: [
      { label: "Time", value: (entry) => when(entry.time) },
      { label: "Action", value: (entry) => entry.action },
      { label: "Key", value: (entry) => `${entry.key_name ?? "—"} (${entry.key_id ?? "—"})` },
      { label: "By", value: (entry) => (entry.via === "api" ? `${entry.admin_key_name} (API, ${entry.address ?? "?"})` : `${entry.user ?? "?"} (CLI)`) },
      { label: "What", value: (entry) => whatChanged(entry), wrap: true },
    ],
  });
}

function whatChanged(entry) {
  if (entry.changes) return Object.entries(entry.changes).map(([name, value]) => `${name}=${JSON.stringify(value)}`).join(", ") || "—";
  if (entry.grace_seconds !== undefined) return `grace ${entry.grace_seconds} s`;
  return "—";
}
