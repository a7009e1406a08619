// System: what is running (version, uptime), where it keeps its data and how big the
// files are, and the effective configuration with secrets redacted by the server.

import { getJson } from "../api.js";
import { card, el, facts, format, replace, table } from "../dom.js";

/// `{a: {b: 1}}` as `[["a.b", "1"]]`; arrays of tables keep their index (`routes.0.name`).
function flatten(value, prefix = "", out = []) {
  if (value !== null && typeof value === "object" && Object.keys(value).length) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? `${prefix}.${key}` : key, out);
  } else {
    out.push([prefix, value === null ? "(unset)" : typeof value === "object" ? JSON.stringify(value) : String(value)]);
  }
  return out;
}

export default {
  title: "System",
  mount(section, { poll }) {
    const about = el("div", { class: "slot", id: "system-about" }, el("p", { class: "muted", text: "Loading…" }));
    const storage = el("div", { class: "slot", id: "system-storage" }, el("p", { class: "muted", text: "Loading…" }));
    const filter = el("input", { id: "config-filter", type: "search", name: "filter", autocomplete: "off", spellcheck: "false" });
    const config = el("div", { class: "slot", id: "system-config" }, el("p", { class: "muted", text: "Loading…" }));
    let pairs = [];

    function showConfig() {
      const needle = filter.value.trim().toLowerCase();
      const shown = needle ? pairs.filter(([key, value]) => key.toLowerCase().includes(needle) || value.toLowerCase().includes(needle)) : pairs;
      replace(config, table("Effective configuration", [
        { label: "Key", value: ([key]) => el("code", { text: key }) },
        { label: "Value", value: ([, value]) => el("code", { text: value }) },
      ], shown, { empty: "No key matches." }));
    }
    filter.addEventListener("input", showConfig);

    section.append(
      card("Keel", about),
      card("Storage", storage),
      card("Configuration",
        el("p", { class: "hint", text: "The effective configuration (file, KEEL_* environment, flags), as keel check-config prints it; secrets are redacted by the server." }),
        el("div", { class: "form inline" }, el("label", { for: "config-filter", text: "Filter keys" }), filter),
        config));

    let first = true;
    poll(async () => {
      const system = await getJson("/v1/system");
      replace(about, facts([
        ["Version", `${system.version} (${system.profile})`],
        ["Commit", el("code", { text: system.commit })],
        ["Started", format.time(system.started_at)],
        ["Uptime", format.duration(system.uptime_seconds)],
        ["Process", `pid ${system.pid}`],
        ["Data directory", el("code", { text: system.data_dir })],
        ["Authentication", system.auth_enabled ? "on" : "off"],
      ]));
      const total = system.storage.reduce((sum, file) => sum + (file.bytes || 0) + (file.wal_bytes || 0), 0);
      replace(storage, table("Database files", [
        { label: "File", value: (file) => file.name },
        { label: "Path", value: (file) => el("code", { text: file.path }) },
        { label: "Size", numeric: true, value: (file) => (file.bytes === null ? "absent" : format.bytes(file.bytes)) },
        { label: "WAL", numeric: true, value: (file) => (file.wal_bytes === null ? "—" : format.bytes(file.wal_bytes)) },
      ], system.storage), el("p", { class: "hint", text: `${format.bytes(total)} in all.` }));
      if (first) {
        pairs = flatten(system.config);
        showConfig();
        first = false;
      }
    }, 10000);
  },
};
