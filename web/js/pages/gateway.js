// Gateway: routes with their settings and counters, upstream health, and the request
// and rate-limit rates.

import { getJson } from "../api.js";
import { LineChart } from "../chart.js";
import { card, el, format, replace, table } from "../dom.js";

const sum = (counts) => Object.values(counts || {}).reduce((total, count) => total + count, 0);

function match(route) {
  return `${route.host || "any host"} ${route.path_prefix}`;
}

function cacheSetting(route) {
  if (!route.cache) return "off";
  const stale = route.cache.stale_while_revalidate ? `, stale ${route.cache.stale_while_revalidate}` : "";
  return `ttl ${route.cache.ttl}${stale}`;
}

function cacheResults(route) {
  if (!route.cache) return "—";
  const results = route.cache_results || {};
  const shown = ["hit", "miss", "stale", "coalesced", "bypass"]
    .filter((result) => results[result])
    .map((result) => `${result} ${format.number(results[result])}`);
  const lookups = sum(results) - (results.bypass || 0);
  const ratio = lookups ? ` (${format.percent(((results.hit || 0) + (results.stale || 0)) / lookups)} hit)` : "";
  return shown.length ? `${shown.join(", ")}${ratio}` : "no lookups yet";
}

function rateLimit(route) {
  if (!route.rate_limit) return "off";
  const limit = route.rate_limit;
  return `${limit.rate} by ${limit.key}${limit.burst ? `, burst ${limit.burst}` : ""}`;
}

export default {
  title: "Gateway",
  mount(section, { metrics, poll }) {
    const chart = new LineChart({
      title: "Requests and rate-limit rejections per second",
      series: [{ key: "requests_per_sec", label: "requests/s" }, { key: "ratelimit_rejected_per_sec", label: "rejected/s" }],
      read: metrics.read, format: (value) => format.number(value, value < 10 ? 1 : 0),
    });
    const routes = el("div", { class: "slot", id: "gateway-routes" }, el("p", { class: "muted", text: "Loading…" }));
    const upstreams = el("div", { class: "slot", id: "gateway-upstreams" }, el("p", { class: "muted", text: "Loading…" }));
    section.append(
      el("div", { class: "charts" }, chart.element),
      card("Routes", el("p", { class: "hint", text: "In matching order: most specific host first, then the longest prefix." }), routes),
      card("Upstream servers", upstreams));

    poll(async () => {
      const [routeList, upstreamList] = await Promise.all([getJson("/v1/gateway/routes"), getJson("/v1/gateway/upstreams")]);
      replace(routes, table("Routes", [
        { label: "Route", value: (route) => route.name },
        { label: "Match", value: (route) => el("code", { text: match(route) }) },
        { label: "Upstream", value: (route) => route.upstream },
        { label: "Cache", value: cacheSetting },
        { label: "Rate limit", value: rateLimit },
        { label: "Requests", numeric: true, value: (route) => format.number(sum(route.requests)) },
        { label: "5xx", numeric: true, value: (route) => format.number(route.requests["5xx"] || 0) },
        { label: "Cache results", value: cacheResults },
        { label: "Rate-limited", numeric: true, value: (route) => (route.rate_limited === null ? "—" : format.number(route.rate_limited)) },
      ], routeList.routes, { empty: "No routes configured ([[gateway.routes]])." }));
      const servers = upstreamList.upstreams.flatMap((pool) => pool.servers.map((server) => ({ pool: pool.name, ...server })));
      replace(upstreams, table("Upstream servers", [
        { label: "Upstream", value: (server) => server.pool },
        { label: "Server", value: (server) => el("code", { text: server.address }) },
        { label: "Health", value: (server) => el("span", { class: server.healthy ? "badge good" : "badge bad", text: server.healthy ? "healthy" : "unhealthy" }) },
        { label: "Circuit", value: (server) => el("span", { class: server.circuit === "closed" ? "badge good" : "badge warn", text: server.circuit.replace("_", "-") }) },
        { label: "In flight", numeric: true, value: (server) => format.number(server.active) },
        { label: "Requests", numeric: true, value: (server) => format.number(server.requests) },
        { label: "Failures", numeric: true, value: (server) => format.number(server.failures) },
      ], servers, { empty: "No upstreams configured ([gateway.upstreams])." }));
    }, 5000);
    return metrics.subscribe((points) => chart.update(points));
  },
};
