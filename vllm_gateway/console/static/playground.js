// Playground (#/playground): chat with a model the signed-in key may use (GET /v1/models). The answer
// streams in (POST /v1/chat/completions with stream: true, read with a ReadableStream and parsed as
// server-sent events); the conversation lives in this page only. It is an ordinary relayed request,
// so it counts against the key's limits and in its usage like any other.

import { answered, api, headers } from "./api.js";
import { announce, field, h, num } from "./ui.js";

export function playgroundPage(main, page, session) {
  const model = h("select", { name: "model", required: true });
  const message = h("textarea", { name: "message", rows: "3", required: true, placeholder: "Ask something…" });
  const maxTokens = h("input", { type: "number", name: "max_tokens", min: "1", step: "1", value: "256" });
  const send = h("button", { type: "submit", class: "primary", text: "Send" });
  const stop = h("button", { type: "button", text: "Stop", disabled: true });
  const clear = h("button", { type: "button", text: "New conversation" });
  const conversation = h("ol", { class: "conversation", "aria-label": "Conversation" });
  const form = h(
    "form",
    { class: "card chat-form", "aria-label": "Message" },
    h("div", { class: "form-grid" }, field("Model", model), field("Max tokens", maxTokens)),
    field("Message", message, "Enter sends; Shift+Enter starts a new line."),
    h("div", { class: "actions" }, send, stop, clear),
  );
  main.append(
    h("h1", { text: "Playground", tabindex: "-1" }),
    h("p", { class: "lead", text: `Chats as key ${session.name}; counted in its usage and limits like any request.` }),
    conversation,
    form,
  );
  const history = [];
  let controller = null;

  message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller?.abort());
  clear.addEventListener("click", () => {
    controller?.abort();
    history.length = 0;
    conversation.replaceChildren();
    announce("New conversation.");
    message.focus();
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = message.value.trim();
    if (!text || controller) return;
    history.push({ role: "user", content: text });
    conversation.append(turn("You", text, "user"));
    message.value = "";
    const body = h("div", { class: "turn-text" });
    const meta = h("p", { class: "turn-meta", text: "…" });
    const reply = h("li", { class: "turn assistant" }, h("p", { class: "turn-who", text: model.value }), body, meta);
    conversation.append(reply);
    reply.scrollIntoView({ block: "nearest" });
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    const started = performance.now();
    try {
      const outcome = await stream(model.value, history, Number(maxTokens.value) || undefined, controller.signal, (piece) => {
        body.textContent += piece;
      });
      history.push({ role: "assistant", content: body.textContent });
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const tokens = outcome.usage ? `, ${num(outcome.usage.completion_tokens)} tokens` : "";
      meta.textContent = `${seconds} s${tokens}`;
      announce(`Answer complete (${seconds} s${tokens}).`, "ok");
    } catch (error) {
      const stopped = error.name === "AbortError";
      meta.textContent = stopped ? "Stopped." : `Error: ${error.message}`;
      meta.classList.toggle("form-error", !stopped);
      if (body.textContent) history.push({ role: "assistant", content: body.textContent });
      else history.pop(); // nothing came: the question can be asked again
      announce(stopped ? "Stopped." : error.message, stopped ? "info" : "error");
    } finally {
      controller = null;
      send.disabled = false;
      stop.disabled = true;
    }
  });

  page.once(async () => {
    const models = await api("/v1/models");
    model.replaceChildren(...models.data.map((entry) => h("option", { value: entry.id, text: `${entry.id} (${entry.status})` })));
    if (!models.data.length) announce("This key may use no model.", "error");
  });
}

function turn(who, text, kind) {
  return h("li", { class: `turn ${kind}` }, h("p", { class: "turn-who", text: who }), h("div", { class: "turn-text", text }));
}

// POST the chat with stream: true and call onText with each piece of the answer as it comes.
async function stream(model, messages, maxTokens, signal, onText) {
  const answer = await fetch("/v1/chat/completions", {
    method: "POST",
    credentials: "same-origin",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, max_tokens: maxTokens }),
    signal,
  });
  if (!answer.ok) await answered(answer); // throws with the gateway's message
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (!line.startsWith("data:")) continue; // comments, event names, the blank line between events
      const data = line.slice(5).trim();
      if (data === "[DONE]") return { usage };
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message || "The stream broke off.");
      if (event.usage) usage = event.usage;
      const delta = event.choices?.[0]?.delta;
      if (delta?.content) onText(delta.content);
    }
  }
  return { usage };
}
