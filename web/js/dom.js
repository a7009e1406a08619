// Small DOM helpers. Text from the server only ever goes in through textContent (here in
// `el`), never through innerHTML.

/// Makes an element. `attrs` keys: `class`, `text`, `on<event>` handlers, `dataset`,
/// booleans (set when true), anything else as an attribute.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = String(value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/// A section with a heading, for one part of a page.
export function card(title, ...children) {
  const id = `card-${title.toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;
  return el("section", { class: "card", "aria-labelledby": id }, el("h2", { id, text: title }), ...children);
}

/// A table of `rows` (objects) by `columns`: `{label, value: row => text|Node, numeric}`.
/// `data-rows` tells tests (and styles) how many rows it has.
export function table(label, columns, rows, { empty = "Nothing yet.", rowAttrs } = {}) {
  const head = el("tr", {}, columns.map((column) =>
    el("th", { scope: "col", class: column.numeric ? "num" : null, text: column.label })));
  const body = rows.length
    ? rows.map((row) => el("tr", rowAttrs ? rowAttrs(row) : {}, columns.map((column) => {
      const value = column.value(row);
      return el("td", { class: column.numeric ? "num" : null }, value instanceof Node ? value : text(value));
    })))
    : [el("tr", {}, el("td", { colspan: columns.length, class: "muted", text: empty }))];
  return el("div", { class: "table-wrap" },
    el("table", { dataset: { rows: rows.length, state: "loaded" } },
      el("caption", { class: "visually-hidden", text: label }),
      el("thead", {}, head), el("tbody", {}, body)));
}

/// A definition list of `[term, value]` pairs.
export function facts(pairs) {
  return el("dl", { class: "facts" }, pairs.flatMap(([term, value]) =>
    [el("dt", { text: term }), el("dd", {}, value instanceof Node ? value : text(value))]));
}

function text(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

/// Replaces a container's children.
export function replace(container, ...children) {
  container.replaceChildren(...children.flat().filter((child) => child !== null && child !== undefined));
}

/// A message line for an action's outcome: `role=status` for success, `alert` for errors.
export function outcome(node, message, isError = false) {
  node.textContent = message;
  node.className = isError ? "error" : "ok";
  node.setAttribute("role", isError ? "alert" : "status");
  node.hidden = false;
}

export const format = {
  number(value, digits = 0) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
  },
  percent(ratio) {
    if (ratio === null || ratio === undefined || Number.isNaN(ratio)) return "—";
    return `${(ratio * 100).toFixed(1)} %`;
  },
  bytes(value) {
    if (value === null || value === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let amount = Number(value);
    let unit = 0;
    while (amount >= 1024 && unit < units.length - 1) {
      amount /= 1024;
      unit += 1;
    }
    return `${amount.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
  },
  ms(value) {
    if (value === null || value === undefined) return "—";
    return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Number(value).toFixed(value < 10 ? 2 : 0)} ms`;
  },
  duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.floor(seconds);
    const parts = [[Math.floor(s / 86400), "d"], [Math.floor((s % 86400) / 3600), "h"], [Math.floor((s % 3600) / 60), "m"], [s % 60, "s"]];
    const shown = parts.filter(([amount], index) => amount > 0 || index === parts.length - 1);
    return shown.slice(0, 2).map(([amount, unit]) => `${amount}${unit}`).join(" ");
  },
  time(ms) {
    if (!ms) return "—";
    // Local time as YYYY-MM-DD HH:MM:SS (the Swedish locale's format).
    return new Date(ms).toLocaleString("sv-SE");
  },
  json(value) {
    return JSON.stringify(value, null, 2);
  },
};
