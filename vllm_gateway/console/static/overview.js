// Overview (#/overview): each model's state, placement, load and latency, and its requests and tokens
// per minute over the last hour and day. Reads GET /admin/overview every 5 s.

import { api } from "./api.js";
import { lineChart } from "./charts.js";
import { badge, decimal, h, list, num, replace, when } from "./ui.js";

export function overviewPage(main, page) {
  const updated = h("p", { class: "updated", text: "Loading…" });
  const models = h("div", { class: "model-grid" });
  const charts = h("div", { class: "charts" });
  main.append(
    h("h1", { text: "Overview", tabindex: "-1" }),
    updated,
    h("section", { "aria-labelledby": "models-heading" }, h("h2", { id: "models-heading", class: "visually-hidden", text: "Models" }), models),
    h("section", { "aria-labelledby": "traffic-heading" }, h("h2", { id: "traffic-heading", text: "Traffic" }), charts),
  );

  page.poll(async () => {
    const overview = await api("/admin/overview");
    replace(models, overview.models.map(modelCard));
    replace(charts, trafficCharts(overview.per_minute));
    updated.textContent = `Updated ${when(overview.generated_at)}; refreshes every 5 s.`;
  });
}

function backendFacts(model) {
  const backends = model.backends || [];
  const joined = (name) => [...new Set(backends.map((backend) => list(backend[name])))].join(" · ") || "—";
  return { gpus: joined("gpus"), cpus: joined("cpus") };
}

function fact(term, value) {
  return [h("dt", { text: term }), h("dd", { text: value })];
}

function modelCard(model) {
  const { gpus, cpus } = backendFacts(model);
  const capacity = model.capacity === null || model.capacity === undefined ? "no limit" : num(model.capacity);
  const backends = model.backends || [];
  const first = backends[0];
  const title = first
    ? h("a", { href: `#/models/${encodeURIComponent(first.id)}`, "data-key": `model-${model.model}`, text: model.model })
    : model.model;
  return h(
    "article",
    { class: "card model-card", "data-model": model.model, "aria-label": `Model ${model.model}` },
    h("header", { class: "card-head" }, h("h3", {}, title), badge(model.status)),
    h(
      "dl",
      { class: "facts" },
      fact("GPUs", gpus),
      fact("CPUs", cpus),
      fact("In flight", `${num(model.in_flight)} / ${capacity}`),
      fact("Waiting", num(model.waiting)),
      fact("Tokens/s", decimal(model.tokens_per_second)),
      fact("TTFT p50 / p99 (5 min)", `${ms(model.ttft_p50_ms)} / ${ms(model.ttft_p99_ms)}`),
    ),
    backends.length > 1 || (first && first.detail && first.status !== "ready")
      ? h(
          "ul",
          { class: "backends" },
          backends.map((backend) =>
            h(
              "li",
              {},
              h("a", { href: `#/models/${encodeURIComponent(backend.id)}`, "data-key": `backend-${backend.id}`, text: backend.id }),
              " ",
              badge(backend.status),
              backend.detail ? h("span", { class: "detail", text: ` ${backend.detail}` }) : null,
            ),
          ),
        )
      : null,
  );
}

function ms(value) {
  return value === null || value === undefined ? "—" : `${num(Math.round(value))} ms`;
}

function trafficCharts(perMinute) {
  const charts = [];
  for (const [span, label, every] of [
    ["hour", "last hour", 1],
    ["day", "last day", 60],
  ]) {
    const block = perMinute?.[span];
    if (!block) continue;
    for (const [figure, title] of [
      ["requests", "Requests per minute"],
      ["tokens", "Tokens per minute"],
    ]) {
      const series = Object.entries(block[figure] || {}).map(([name, values]) => ({ name, values }));
      charts.push(
        lineChart({
          title: `${title}, ${label}`,
          start: block.start,
          step: block.step_s || 60,
          series,
          unit: figure === "requests" ? "req/min" : "tok/min",
          tableEvery: every,
        }),
      );
    }
  }
  return charts;
}
