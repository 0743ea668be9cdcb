// Hand-written SVG charts: a line chart of per-minute series and a stacked bar chart of usage
// buckets, each with axes and labels, a legend, and a text alternative (an aria-label that sums it up
// and a visually hidden table of the figures) for screen readers. Colours come from console.css
// (.series-0 ... .series-7), never from style attributes, which the console's CSP forbids.

import { h, num } from "./ui.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 210;
const MARGIN = { top: 24, right: 14, bottom: 26, left: 48 };
const SERIES_CLASSES = 8;
// Tick spacings for a time axis, in seconds: the first that gives at most 7 ticks is used.
const TIME_STEPS = [60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800, 2592000];

function s(tag, attrs = {}, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, String(value));
  for (const child of children.flat()) if (child) element.append(child);
  return element;
}

// A round upper bound and tick step for values up to `max` (1, 2 or 5 times a power of ten).
function niceScale(max) {
  const top = Math.max(max, 1);
  const rough = top / 4;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((factor) => factor * power).find((candidate) => candidate >= rough);
  const whole = Math.max(1, Math.round(step));
  return { step: whole, max: Math.ceil(top / whole) * whole };
}

function short(value) {
  if (value >= 1e9) return `${+(value / 1e9).toFixed(1)}G`;
  if (value >= 1e6) return `${+(value / 1e6).toFixed(1)}M`;
  if (value >= 1e4) return `${+(value / 1e3).toFixed(1)}k`;
  return String(value);
}

function pad(value) {
  return String(value).padStart(2, "0");
}

export function timeLabel(seconds, span) {
  const date = new Date(seconds * 1000);
  const clock = `${pad(date.getHours())}:${pad(date.getMinutes())}`;
  if (span <= 86400 + 3600) return clock;
  const day = `${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  return span <= 3 * 86400 ? `${day} ${clock}` : day;
}

// The common frame: the y axis and its grid, the x axis with time ticks (or `labels`, [{at, text}]
// at positions in points); returns the plot's scales.
function frame(svg, { start, step, count, yMax, unit, labels }) {
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const scale = niceScale(yMax);
  const y = (value) => MARGIN.top + plotHeight - (value / scale.max) * plotHeight;
  const x = (index) => MARGIN.left + (index / Math.max(count, 1)) * plotWidth;
  const axes = s("g", { class: "axes", "aria-hidden": "true" });
  for (let tick = 0; tick <= scale.max; tick += scale.step) {
    axes.append(s("line", { class: "grid", x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(tick), y2: y(tick) }));
    const label = s("text", { class: "tick", x: MARGIN.left - 6, y: y(tick) + 4, "text-anchor": "end" });
    label.textContent = short(tick);
    axes.append(label);
  }
  const span = count * step;
  if (!labels) {
    const spacing = TIME_STEPS.find((candidate) => span / candidate <= 7) || TIME_STEPS.at(-1);
    const offset = new Date(start * 1000).getTimezoneOffset() * 60; // ticks on round local times
    const first = Math.ceil((start - offset) / spacing) * spacing + offset;
    labels = [];
    for (let tick = first; tick <= start + span; tick += spacing) labels.push({ at: (tick - start) / step, text: timeLabel(tick, span) });
  }
  for (const { at, text } of labels) {
    const position = x(at);
    axes.append(s("line", { class: "axis-tick", x1: position, x2: position, y1: MARGIN.top + plotHeight, y2: MARGIN.top + plotHeight + 4 }));
    const label = s("text", { class: "tick", x: position, y: HEIGHT - 8, "text-anchor": "middle" });
    label.textContent = text;
    axes.append(label);
  }
  axes.append(s("line", { class: "axis", x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(0), y2: y(0) }));
  axes.append(s("line", { class: "axis", x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: y(0) }));
  const unitLabel = s("text", { class: "unit", x: MARGIN.left, y: 12, "text-anchor": "start" });
  unitLabel.textContent = unit;
  axes.append(unitLabel);
  svg.append(axes);
  return { x, y, plotWidth };
}

function legend(series) {
  return h(
    "ul",
    { class: "legend" },
    series.map((line, index) =>
      h("li", {}, h("span", { class: `swatch series-${index % SERIES_CLASSES}`, "aria-hidden": "true" }), line.name),
    ),
  );
}

function sum(values) {
  return values.reduce((total, value) => total + value, 0);
}

// What a screen reader hears for the whole chart: each series' total and its peak.
function summary(title, series, start, step, span, name = (moment) => timeLabel(moment, span)) {
  const parts = series.map((line) => {
    const peak = Math.max(0, ...line.values);
    const at = line.values.indexOf(peak);
    const peakText = peak > 0 ? `, peak ${num(peak)} at ${name(start + at * step)}` : "";
    return `${line.name}: ${num(sum(line.values))} in all${peakText}`;
  });
  return `${title}. ${parts.join("; ") || "No data"}.`;
}

// The figures as a table for screen readers; `every` points summed per row (a day of minutes: 60).
function figuresTable(title, series, start, step, every, rowLabel) {
  const count = Math.max(0, ...series.map((line) => line.values.length));
  const rows = [];
  for (let index = 0; index < count; index += every) {
    const cells = series.map((line) => h("td", { text: num(sum(line.values.slice(index, index + every))) }));
    rows.push(h("tr", {}, h("th", { scope: "row", text: rowLabel(start + index * step) }), cells));
  }
  return h(
    "table",
    { class: "visually-hidden" },
    h("caption", { text: title }),
    h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Time" }), series.map((line) => h("th", { scope: "col", text: line.name })))),
    h("tbody", {}, rows),
  );
}

// series: [{name, values}] of `count` points each, from `start` (unix s) every `step` seconds.
export function lineChart({ title, start, step, series, unit, tableEvery = 1 }) {
  const count = Math.max(1, ...series.map((line) => line.values.length));
  const span = count * step;
  const yMax = Math.max(0, ...series.flatMap((line) => line.values));
  const svg = s("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "chart" });
  svg.setAttribute("aria-label", summary(title, series, start, step, span));
  const { x, y } = frame(svg, { start, step, count: count - 1 || 1, yMax, unit });
  series.forEach((line, index) => {
    const points = line.values.map((value, at) => `${x(at).toFixed(1)},${y(value).toFixed(1)}`).join(" ");
    svg.append(s("polyline", { class: `line series-${index % SERIES_CLASSES}`, points }));
  });
  const label = (moment) => timeLabel(moment, span) + (tableEvery > 1 ? ` (${num(tableEvery)} min)` : "");
  return chartFigure(title, svg, series, figuresTable(title, series, start, step, tableEvery, label));
}

// A chart as a page shows it: its title, the drawing, its legend and the hidden table of its figures.
function chartFigure(title, svg, series, table) {
  return h("figure", { class: "chart-figure" }, h("figcaption", { text: title }), svg, legend(series), table);
}

// A usage bucket's name: its UTC day, or its UTC hour (with the day when the range is longer).
export function bucketLabel(seconds, step, span) {
  const text = new Date(seconds * 1000).toISOString();
  if (step >= 86400) return text.slice(5, 10);
  return span > 86400 ? `${text.slice(5, 10)} ${text.slice(11, 13)}h` : `${text.slice(11, 13)}:00`;
}

// Stacked bars, one per bucket: series [{name, values}] of one value per bucket (UTC buckets, as the
// usage ledger cuts them).
export function barChart({ title, start, step, series, unit }) {
  const count = Math.max(1, ...series.map((line) => line.values.length));
  const span = count * step;
  const totals = Array.from({ length: count }, (_, at) => sum(series.map((line) => line.values[at] || 0)));
  const svg = s("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "chart" });
  const name = (moment) => bucketLabel(moment, step, span);
  svg.setAttribute("aria-label", summary(title, series, start, step, span, name));
  const every = Math.ceil(count / 8);
  const labels = [];
  for (let at = 0; at < count; at += every) labels.push({ at: at + 0.5, text: name(start + at * step) });
  const { x, y, plotWidth } = frame(svg, { start, step, count, yMax: Math.max(0, ...totals), unit, labels });
  const width = Math.max(1, (plotWidth / count) * 0.8);
  for (let at = 0; at < count; at++) {
    let base = 0;
    series.forEach((line, index) => {
      const value = line.values[at] || 0;
      if (!value) return;
      const bar = s("rect", {
        class: `bar series-${index % SERIES_CLASSES}`,
        x: (x(at) + (plotWidth / count) * 0.1).toFixed(1),
        y: y(base + value).toFixed(1),
        width: width.toFixed(1),
        height: Math.max(0.5, y(base) - y(base + value)).toFixed(1),
      });
      const tip = s("title");
      tip.textContent = `${line.name}, ${name(start + at * step)}: ${num(value)}`;
      bar.append(tip);
      svg.append(bar);
      base += value;
    });
  }
  return chartFigure(title, svg, series, figuresTable(title, series, start, step, 1, name));
}
