// A small SVG line chart for time series: one figure, a few lines, a legend with the
// latest values. The drawing stretches to the figure's width (viewBox without aspect
// ratio, strokes that do not scale); text stays in HTML so it never stretches.

import { el } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 160;

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

/// A round upper bound at or above `value` (1, 2, 2.5, 5 times a power of ten).
function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

export class LineChart {
  /// `series`: `[{key, label}]`; `read(point, key)` gives a number or null;
  /// `format(value)` prints one; `max` fixes the top of the scale (1 for ratios).
  constructor({ title, series, read, format, max = null, windowSeconds = 300 }) {
    this.series = series;
    this.read = read;
    this.format = format;
    this.fixedMax = max;
    this.windowSeconds = windowSeconds;
    this.title = title;

    this.paths = series.map((_, index) => svg("path", { class: `line s${index}`, "vector-effect": "non-scaling-stroke" }));
    this.grid = [0, 0.5, 1].map((fraction) => svg("line", {
      class: "grid", x1: 0, x2: WIDTH, y1: HEIGHT * fraction, y2: HEIGHT * fraction, "vector-effect": "non-scaling-stroke",
    }));
    this.drawing = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: "none", role: "img", "aria-label": `${title}: no data yet` });
    this.drawing.append(...this.grid, ...this.paths);

    this.top = el("span", { class: "axis top", text: "" });
    this.start = el("span", { text: "" });
    this.values = series.map(() => el("span", { class: "value", text: "—" }));
    const legend = el("ul", { class: "legend" }, series.map((entry, index) =>
      el("li", {}, el("span", { class: `swatch s${index}`, "aria-hidden": "true" }), `${entry.label} `, this.values[index])));
    this.element = el("figure", { class: "chart", dataset: { points: 0 } },
      el("figcaption", { text: title }),
      el("div", { class: "plot" }, this.top, this.drawing, el("span", { class: "axis bottom", text: "0" })),
      el("div", { class: "time-axis", "aria-hidden": "true" }, this.start, el("span", { text: "now" })),
      legend);
  }

  /// Draws `points` (oldest first, `at` in Unix seconds). The time axis spans what
  /// there is, from one minute up to the chart's window, so a keel that just started
  /// does not draw in a sliver at the right edge.
  update(points) {
    const latestAt = points.length ? points[points.length - 1].at : 0;
    const available = points.length ? latestAt - points[0].at : 0;
    const span = Math.min(this.windowSeconds, Math.max(60, available));
    const shown = points.filter((point) => point.at > latestAt - span);
    let highest = 0;
    for (const point of shown) {
      for (const entry of this.series) {
        const value = this.read(point, entry.key);
        if (value !== null && value !== undefined && value > highest) highest = value;
      }
    }
    const top = this.fixedMax ?? niceCeiling(highest);
    const x = (at) => ((at - (latestAt - span)) / span) * WIDTH;
    const y = (value) => HEIGHT - (Math.min(value, top) / top) * HEIGHT;
    this.series.forEach((entry, index) => {
      let d = "";
      let drawing = false;
      for (const point of shown) {
        const value = this.read(point, entry.key);
        if (value === null || value === undefined) {
          drawing = false;
          continue;
        }
        d += `${drawing ? "L" : "M"}${x(point.at).toFixed(1)} ${y(value).toFixed(1)}`;
        drawing = true;
      }
      this.paths[index].setAttribute("d", d);
    });
    this.top.textContent = this.format(top);
    const latest = this.series.map((entry) => {
      for (let i = shown.length - 1; i >= 0; i -= 1) {
        const value = this.read(shown[i], entry.key);
        if (value !== null && value !== undefined) return value;
      }
      return null;
    });
    latest.forEach((value, index) => {
      this.values[index].textContent = value === null ? "—" : this.format(value);
    });
    const summary = this.series.map((entry, index) => `${entry.label} ${latest[index] === null ? "no data" : this.format(latest[index])}`);
    const minutes = `${Math.round(span / 60)} min`;
    this.start.textContent = `−${minutes}`;
    this.drawing.setAttribute("aria-label", `${this.title}, last ${minutes}; latest: ${summary.join(", ")}`);
    this.element.dataset.points = String(shown.length);
  }
}
