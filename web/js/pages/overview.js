// Overview: the key series at a glance, live.

import { LineChart } from "../chart.js";
import { el, format } from "../dom.js";

/// Gateway 5xx answers per request, in the same second.
function errorRate(point, read) {
  const requests = read(point, "requests_per_sec");
  const errors = read(point, "errors_per_sec");
  return requests ? (errors ?? 0) / requests : null;
}

export default {
  title: "Overview",
  mount(section, { metrics }) {
    const read = metrics.read;
    const charts = [
      new LineChart({
        title: "Requests per second (api and gateway)",
        series: [{ key: "requests_per_sec", label: "requests/s" }],
        read, format: (value) => format.number(value, value < 10 ? 1 : 0),
      }),
      new LineChart({
        title: "Latency",
        series: [
          { key: "latency_p50_ms", label: "p50" },
          { key: "latency_p95_ms", label: "p95" },
          { key: "latency_p99_ms", label: "p99" },
        ],
        read, format: format.ms,
      }),
      new LineChart({
        title: "Error rate (gateway 5xx per request)",
        series: [{ key: "error_rate", label: "5xx" }],
        read: (point) => errorRate(point, read), format: format.percent,
      }),
      new LineChart({
        title: "Cache hit ratio",
        series: [{ key: "cache_l1_hit_ratio", label: "L1" }, { key: "cache_l2_hit_ratio", label: "L2" }],
        read, format: format.percent, max: 1,
      }),
      new LineChart({
        title: "Queue depth",
        series: [{ key: "queue_waiting", label: "waiting" }, { key: "queue_active", label: "active" }],
        read, format: (value) => format.number(value),
      }),
      new LineChart({
        title: "Memory (resident)",
        series: [{ key: "rss_bytes", label: "RSS" }],
        read, format: format.bytes,
      }),
      new LineChart({
        title: "CPU",
        series: [{ key: "cpu_percent", label: "CPU" }],
        read, format: (value) => `${format.number(value, 1)} %`,
      }),
    ];
    section.append(el("div", { class: "charts" }, charts.map((chart) => chart.element)));
    return metrics.subscribe((points) => charts.forEach((chart) => chart.update(points)));
  },
};
