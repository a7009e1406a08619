// Cache: per-layer figures, the hit ratio over time, looking up one key, and
// invalidating by key, pattern or tag.

import { ApiError, getJson, postJson, request } from "../api.js";
import { LineChart } from "../chart.js";
import { card, el, facts, format, outcome, replace, table } from "../dom.js";

const SHOWN_BYTES = 4096;

function keyPath(key) {
  return `/v1/cache/${encodeURIComponent(key)}`;
}

function lookupForm(fail) {
  const result = el("div", { class: "slot", id: "cache-lookup-result", "aria-live": "polite" });
  const input = el("input", { id: "cache-lookup-key", name: "key", required: true, autocomplete: "off", spellcheck: "false" });
  const form = el("form", { class: "form inline", id: "cache-lookup" },
    el("label", { for: "cache-lookup-key", text: "Key" }), input,
    el("button", { type: "submit", text: "Look up" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value;
    try {
      const response = await request("GET", keyPath(key));
      const bytes = new Uint8Array(await response.arrayBuffer());
      const text = new TextDecoder("utf-8", { fatal: false }).decode(bytes.subarray(0, SHOWN_BYTES));
      const ttl = response.headers.get("x-keel-ttl-ms");
      replace(result, facts([
        ["Key", el("code", { text: key })],
        ["Size", format.bytes(bytes.length)],
        ["Expires in", ttl === null ? "never" : format.duration(Number(ttl) / 1000)],
        ["Tags", response.headers.get("x-keel-tags") || "none"],
        ["Value", el("pre", { class: "value", text: bytes.length > SHOWN_BYTES ? `${text}…` : text })],
      ]));
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        replace(result, el("p", { class: "muted", role: "status", text: `No entry for ${key}.` }));
      } else {
        replace(result);
        fail(error);
      }
    }
  });
  return el("div", {}, form, result);
}

function invalidateForm(onDone) {
  const message = el("p", { id: "cache-invalidate-result", hidden: true });
  const by = el("select", { id: "cache-invalidate-by", name: "by" },
    el("option", { value: "keys", text: "Key" }),
    el("option", { value: "pattern", text: "Pattern (glob, e.g. user:*)" }),
    el("option", { value: "tags", text: "Tag" }));
  const value = el("input", { id: "cache-invalidate-value", name: "value", required: true, autocomplete: "off", spellcheck: "false" });
  const form = el("form", { class: "form inline", id: "cache-invalidate" },
    el("label", { for: "cache-invalidate-by", text: "Invalidate by" }), by,
    el("label", { for: "cache-invalidate-value", text: "Value" }), value,
    el("button", { type: "submit", class: "danger", text: "Invalidate" }), message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = by.value === "pattern" ? { pattern: value.value } : { [by.value]: [value.value] };
    try {
      const answer = await postJson("/v1/cache/invalidate", body);
      outcome(message, `Invalidated ${format.number(answer.invalidated)} ${answer.invalidated === 1 ? "entry" : "entries"}.`);
      onDone();
    } catch (error) {
      outcome(message, error.detail, true);
    }
  });
  return form;
}

export default {
  title: "Cache",
  mount(section, { metrics, poll, fail, canWrite }) {
    const chart = new LineChart({
      title: "Hit ratio by layer",
      series: [{ key: "cache_l1_hit_ratio", label: "L1" }, { key: "cache_l2_hit_ratio", label: "L2" }],
      read: metrics.read, format: format.percent, max: 1,
    });
    const layers = el("div", { class: "slot", id: "cache-layers" }, el("p", { class: "muted", text: "Loading…" }));
    const refresh = poll(async () => {
      const stats = await getJson("/v1/cache/stats");
      const rows = [{ layer: "L1 (memory)", ...stats.l1 }];
      if (stats.l2) rows.push({ layer: "L2", ...stats.l2 });
      replace(layers, table("Cache layers", [
        { label: "Layer", value: (row) => row.layer },
        { label: "Kind", value: (row) => row.kind },
        { label: "Hit ratio", numeric: true, value: (row) => format.percent(row.hits + row.misses ? row.hit_ratio : null) },
        { label: "Hits", numeric: true, value: (row) => format.number(row.hits) },
        { label: "Misses", numeric: true, value: (row) => format.number(row.misses) },
        { label: "Entries", numeric: true, value: (row) => format.number(row.entries) },
        { label: "Memory", numeric: true, value: (row) => (row.bytes === null ? "—" : `${format.bytes(row.bytes)}${row.capacity_bytes ? ` of ${format.bytes(row.capacity_bytes)}` : ""}`) },
        { label: "Evictions", numeric: true, value: (row) => format.number(row.evictions) },
        { label: "Queued writes", numeric: true, value: (row) => format.number(row.queued_writes) },
      ], rows), stats.namespaces.length
        ? el("p", { class: "hint", text: `Loader namespaces: ${stats.namespaces.join(", ")}` }) : null);
    }, 5000);
    section.append(
      el("div", { class: "charts" }, chart.element),
      card("Layers", layers),
      card("Look up a key", lookupForm(fail)));
    if (canWrite) section.append(card("Invalidate", invalidateForm(refresh)));
    return metrics.subscribe((points) => chart.update(points));
  },
};
