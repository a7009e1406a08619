// SQL: the busiest statements, the slow log, and the analyzer (plan, findings, and an
// index proposal proved against the real planner in a rolled-back transaction).

import { getJson, postJson } from "../api.js";
import { LineChart } from "../chart.js";
import { card, el, format, outcome, replace, table } from "../dom.js";

/// The plan as indented lines, the way SQLite's shell prints EXPLAIN QUERY PLAN.
function planText(nodes, depth = 0) {
  return nodes.flatMap((node) => [`${"   ".repeat(depth)}${depth ? "`--" : ""}${node.detail}`, ...planText(node.children, depth + 1)]);
}

function plan(label, nodes, id) {
  return el("figure", { class: "plan" }, el("figcaption", { text: label }), el("pre", { id, text: planText(nodes).join("\n") || "(empty)" }));
}

function analyzer() {
  const input = el("textarea", { id: "analyze-sql", name: "sql", rows: 4, required: true, spellcheck: "false" });
  const message = el("p", { id: "analyze-error", hidden: true });
  const result = el("div", { class: "slot", id: "analyze-result", "aria-live": "polite" });
  const form = el("form", { class: "form", id: "analyze" },
    el("label", { for: "analyze-sql", text: "Statement to analyze (read-only; parameters may stay unbound)" }), input,
    el("button", { type: "submit", text: "Analyze" }), message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.hidden = true;
    replace(result, el("p", { class: "muted", text: "Analyzing…" }));
    try {
      const analysis = await postJson("/v1/sql/analyze", { sql: input.value });
      const parts = [plan("Plan", analysis.plan, "analyze-plan")];
      parts.push(analysis.findings.length
        ? el("ul", { class: "findings" }, analysis.findings.map((finding) =>
          el("li", {}, el("span", { class: "badge warn", text: finding.kind.replace("_", " ") }), " ", finding.detail)))
        : el("p", { class: "ok", text: "No findings: no full scan of a large table, no temporary B-tree." }));
      const proposal = analysis.proposal;
      if (proposal) {
        parts.push(el("section", { class: "proposal", id: "analyze-proposal", "aria-labelledby": "proposal-title" },
          el("h3", { id: "proposal-title", text: "Proposed index" }),
          el("pre", { class: "sql", id: "analyze-create-index", text: `${proposal.create_index};` }),
          el("p", { class: proposal.improves ? "ok" : "muted", text: proposal.improves
            ? `With it, the plan no longer scans ${proposal.table}.`
            : `It does not remove the scan of ${proposal.table}; the plan may still choose to scan.` }),
          el("div", { class: "plans" },
            plan("Plan before", proposal.plan_before, "analyze-plan-before"),
            plan("Plan after", proposal.plan_after, "analyze-plan-after"))));
      } else {
        parts.push(el("p", { class: "muted", id: "analyze-no-proposal", text: "No index to propose." }));
      }
      replace(result, parts);
    } catch (error) {
      replace(result);
      outcome(message, error.detail, true);
    }
  });
  return el("div", {}, form, result);
}

export default {
  title: "SQL",
  mount(section, { metrics, poll }) {
    const chart = new LineChart({
      title: "Statements per second",
      series: [{ key: "sql_statements_per_sec", label: "statements/s" }],
      read: metrics.read, format: (value) => format.number(value, value < 10 ? 1 : 0),
    });
    const sort = el("select", { id: "sql-sort", name: "sort" },
      el("option", { value: "total", text: "total time" }),
      el("option", { value: "mean", text: "mean time" }),
      el("option", { value: "calls", text: "calls" }));
    const statements = el("div", { class: "slot", id: "sql-statements" }, el("p", { class: "muted", text: "Loading…" }));
    const slow = el("div", { class: "slot", id: "sql-slow" }, el("p", { class: "muted", text: "Loading…" }));

    const refresh = poll(async () => {
      const [stats, slowLog] = await Promise.all([getJson(`/v1/sql/stats?sort=${sort.value}&limit=25`), getJson("/v1/sql/slow")]);
      replace(statements, table("Top statements", [
        { label: "Statement", value: (row) => el("code", { class: "sql", text: row.statement }) },
        { label: "Calls", numeric: true, value: (row) => format.number(row.calls) },
        { label: "Rows", numeric: true, value: (row) => format.number(row.rows) },
        { label: "Errors", numeric: true, value: (row) => format.number(row.errors) },
        { label: "Mean", numeric: true, value: (row) => format.ms(row.mean_ms) },
        { label: "p95", numeric: true, value: (row) => format.ms(row.p95_ms) },
        { label: "Max", numeric: true, value: (row) => format.ms(row.max_ms) },
        { label: "Total", numeric: true, value: (row) => format.ms(row.total_ms) },
      ], stats.statements, { empty: "No statements run yet." }),
      el("p", { class: "hint", id: "sql-stats-source", text: `${format.number(stats.tracked)} distinct statements tracked; ${
        stats.source === "pg_stat_statements"
          ? "figures from PostgreSQL's pg_stat_statements: every client of this database, no errors or p95"
          : "figures of this keel node"}.` }));
      replace(slow, table("Slow log", [
        { label: "When", value: (row) => format.time(row.at) },
        { label: "Statement", value: (row) => el("code", { class: "sql", text: row.statement }) },
        { label: "Time", numeric: true, value: (row) => format.ms(row.ms) },
        { label: "Rows", numeric: true, value: (row) => format.number(row.rows) },
      ], [...slowLog.slow].reverse(), { empty: "No slow statements (slower than sql.slow_query_ms)." }));
    }, 5000);
    sort.addEventListener("change", refresh);

    section.append(
      el("div", { class: "charts" }, chart.element),
      card("Top statements", el("div", { class: "form inline" }, el("label", { for: "sql-sort", text: "Sort by" }), sort), statements),
      card("Slow log", slow),
      card("Analyzer", analyzer()));
    return metrics.subscribe((points) => chart.update(points));
  },
};
