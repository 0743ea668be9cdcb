// DOM helpers for the console's pages: elements built with textContent (never innerHTML, so no value
// from the API can become markup), tables, badges, the status line, dialogs and number formats.

export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  append(element, children);
  return element;
}

export function append(element, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
}

export function replace(container, ...children) {
  // Pages refresh every few seconds: keep the keyboard focus on the same control (by data-key).
  const focused = container.contains(document.activeElement) ? document.activeElement.dataset.key : undefined;
  container.replaceChildren();
  append(container, children);
  if (focused) container.querySelector(`[data-key="${CSS.escape(focused)}"]`)?.focus();
}

// -- the status line (an aria-live region, so screen readers hear what happened) --

let statusTimer = 0;

export function announce(message, kind = "info") {
  const status = document.getElementById("status");
  if (!status) return;
  clearTimeout(statusTimer);
  status.className = `status status-${kind}`;
  status.textContent = message;
  if (kind !== "error") statusTimer = setTimeout(() => (status.textContent = ""), 8000);
}

// -- dialogs: the native <dialog>, modal, closed by Escape, focus kept inside --

export function confirmDialog({ title, text, confirm = "OK", danger = false }) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = confirm;
  ok.className = danger ? "danger" : "primary";
  dialog.returnValue = "";
  dialog.showModal();
  document.getElementById("confirm-cancel").focus(); // the safe choice first
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// A modal form: `build(form)` fills it; `submit(form)` resolves to a value (the dialog closes) or
// throws an Error whose message is shown in the dialog.
export function formDialog({ title, build, submit, action = "Save" }) {
  const error = h("p", { class: "form-error", role: "alert" });
  const form = h("form", { method: "dialog", class: "dialog-form" });
  const titleId = `dialog-${Math.random().toString(36).slice(2)}`;
  const dialog = h("dialog", { "aria-labelledby": titleId }, form);
  form.append(h("h2", { id: titleId, text: title }));
  build(form);
  const cancel = h("button", { type: "button", text: "Cancel", onclick: () => dialog.close() });
  const save = h("button", { type: "submit", class: "primary", text: action });
  form.append(error, h("div", { class: "actions" }, cancel, save));
  document.body.append(dialog);
  return new Promise((resolve) => {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      save.disabled = true;
      error.textContent = "";
      try {
        const value = await submit(form);
        dialog.close();
        resolve(value);
      } catch (failure) {
        error.textContent = failure.message;
      } finally {
        save.disabled = false;
      }
    });
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(undefined);
    });
    dialog.showModal();
  });
}

// -- form fields: every input has its label --

let fieldCount = 0;

export function field(label, input, hint) {
  const id = input.id || `field-${++fieldCount}`;
  input.id = id;
  const hintNode = hint ? h("span", { class: "hint", id: `${id}-hint`, text: hint }) : null;
  if (hintNode) input.setAttribute("aria-describedby", hintNode.id);
  if (input.type === "checkbox") {
    return h("div", { class: "field field-check" }, input, h("label", { for: id, text: label }), hintNode);
  }
  return h("div", { class: "field" }, h("label", { for: id, text: label }), input, hintNode);
}

// -- tables: scroll sideways on a phone rather than squeeze --

export function table({ caption, columns, rows, empty = "Nothing yet.", hiddenCaption = false }) {
  // Cells keep to one line (the table scrolls instead) unless a column may `wrap` (free text).
  const kind = (column) => (column.num ? "num" : column.wrap ? "wrap" : "");
  const head = h("tr", {}, columns.map((column) => h("th", { scope: "col", class: kind(column) }, column.label)));
  const body = rows.map((row) => h("tr", {}, columns.map((column) => h("td", { class: kind(column) }, column.value(row)))));
  if (!rows.length) body.push(h("tr", {}, h("td", { colspan: columns.length, class: "empty", text: empty })));
  const captionNode = caption ? h("caption", { class: hiddenCaption ? "visually-hidden" : "", text: caption }) : null;
  const element = h("table", {}, captionNode, h("thead", {}, head), h("tbody", {}, body));
  return h("div", { class: "table-scroll", tabindex: "0", role: "region", "aria-label": caption || "table" }, element);
}

// -- the fleet's states, one badge each --

export const STATES = ["ready", "loading", "sleeping", "waking", "stopped", "restarting", "failed", "down"];

export function badge(state) {
  const known = STATES.includes(state) ? state : "unknown";
  return h("span", { class: `badge state-${known}`, text: state || "unknown" });
}

// -- formats --

const numberFormat = new Intl.NumberFormat("en-US");

export function num(value) {
  return value === null || value === undefined ? "—" : numberFormat.format(value);
}

export function decimal(value, digits = 1) {
  return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
}

function pad(value) {
  return String(value).padStart(2, "0");
}

// A moment in UTC, as the usage ledger's buckets are cut: 2026-12-03 10:00 UTC (hours), 2026-12-03 (days).
export function utc(seconds, withHour = true) {
  const text = new Date(seconds * 1000).toISOString();
  return withHour ? `${text.slice(0, 10)} ${text.slice(11, 16)} UTC` : text.slice(0, 10);
}

// A moment (unix seconds or ISO 8601 text) in the browser's time zone: 2026-12-03 10:42:23.
export function when(moment, seconds = true) {
  if (moment === null || moment === undefined || moment === "") return "—";
  const date = typeof moment === "number" ? new Date(moment * 1000) : new Date(moment);
  if (Number.isNaN(date.getTime())) return String(moment);
  const day = `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  const time = `${pad(date.getHours())}:${pad(date.getMinutes())}${seconds ? ":" + pad(date.getSeconds()) : ""}`;
  return `${day} ${time}`;
}

export function list(value) {
  if (value === null || value === undefined || value === "") return "—";
  return Array.isArray(value) ? value.join(",") : String(value);
}

// Sign-in, a revoked key or a session that ended all lead here.
export function toSignIn() {
  window.location.replace("/console/sign-in");
}
