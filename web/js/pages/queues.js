// Queues: counts per state, throughput, dead jobs (payload and error, retry or delete),
// pause and resume, and schedules with their next run.

import { del, getJson, postJson } from "../api.js";
import { LineChart } from "../chart.js";
import { card, el, format, outcome, replace, table } from "../dom.js";

const STATES = ["waiting", "delayed", "active", "completed", "failed", "dead"];

function queuePath(queue, rest) {
  return `/v1/queues/${encodeURIComponent(queue)}/${rest}`;
}

export default {
  title: "Queues",
  mount(section, { metrics, poll, fail, canWrite }) {
    const charts = [
      new LineChart({
        title: "Throughput (jobs completed per second)",
        series: [{ key: "queue_completed_per_sec", label: "completed/s" }],
        read: metrics.read, format: (value) => format.number(value, value < 10 ? 1 : 0),
      }),
      new LineChart({
        title: "Depth",
        series: [{ key: "queue_waiting", label: "waiting" }, { key: "queue_active", label: "active" }],
        read: metrics.read, format: (value) => format.number(value),
      }),
    ];
    const queues = el("div", { class: "slot", id: "queues-table" }, el("p", { class: "muted", text: "Loading…" }));
    const picker = el("select", { id: "dead-queue", name: "queue" });
    const deadMessage = el("p", { id: "dead-result", hidden: true });
    const retryAll = canWrite ? el("button", { type: "button", id: "dead-retry-all", text: "Retry all dead jobs" }) : null;
    const dead = el("div", { class: "slot", id: "dead-jobs" }, el("p", { class: "muted", text: "Loading…" }));
    const schedules = el("div", { class: "slot", id: "schedules" }, el("p", { class: "muted", text: "Loading…" }));
    let names = [];

    async function act(work, success) {
      try {
        await work();
        outcome(deadMessage, success);
      } catch (error) {
        outcome(deadMessage, error.detail, true);
      }
      await Promise.all([loadQueues(), loadDead()]).catch(fail);
    }

    async function loadDead() {
      const queue = picker.value;
      if (!queue) {
        replace(dead, el("p", { class: "muted", text: "No queues yet." }));
        return;
      }
      const page = await getJson(`${queuePath(queue, "jobs")}?state=dead&limit=50`);
      replace(dead, table(`Dead jobs of ${queue}`, [
        { label: "Job", value: (job) => `#${job.id} ${job.name}` },
        { label: "Attempts", numeric: true, value: (job) => `${job.attempts_made}/${job.max_attempts}` },
        { label: "Died", value: (job) => format.time(job.finished_at) },
        { label: "Error", value: (job) => el("pre", { class: "error-text", text: job.last_error || "—" }) },
        { label: "Payload", value: (job) => el("pre", { class: "payload", text: format.json(job.payload) }) },
        ...(canWrite ? [{
          label: "Actions",
          value: (job) => el("div", { class: "actions" },
            el("button", {
              type: "button", class: "retry", "aria-label": `Retry job ${job.id}`, text: "Retry",
              onclick: () => act(() => postJson(queuePath(queue, "dead/retry"), { ids: [job.id] }), `Job ${job.id} is waiting again.`),
            }),
            el("button", {
              type: "button", class: "danger delete", "aria-label": `Delete job ${job.id}`, text: "Delete",
              onclick: () => act(() => del(`/v1/jobs/${job.id}`), `Job ${job.id} deleted.`),
            })),
        }] : []),
      ], page.jobs, { empty: `No dead jobs in ${queue}.`, rowAttrs: (job) => ({ dataset: { jobId: job.id, queue } }) }));
      if (retryAll) retryAll.disabled = page.jobs.length === 0;
    }

    async function loadQueues() {
      const stats = (await getJson("/v1/queues")).queues;
      replace(queues, table("Queues", [
        { label: "Queue", value: (queue) => queue.queue },
        { label: "State", value: (queue) => el("span", { class: queue.paused ? "badge warn" : "badge good", text: queue.paused ? "paused" : "running" }) },
        ...STATES.map((state) => ({ label: state[0].toUpperCase() + state.slice(1), numeric: true, value: (queue) => format.number(queue[state]) })),
        { label: "Oldest waiting", numeric: true, value: (queue) => (queue.oldest_waiting_age_ms === null ? "—" : format.duration(queue.oldest_waiting_age_ms / 1000)) },
        { label: "Done/s (1 min)", numeric: true, value: (queue) => format.number(queue.completed_per_sec, 2) },
        ...(canWrite ? [{
          label: "Actions",
          value: (queue) => el("button", {
            type: "button",
            "aria-label": `${queue.paused ? "Resume" : "Pause"} queue ${queue.queue}`,
            text: queue.paused ? "Resume" : "Pause",
            onclick: async () => {
              try {
                await postJson(queuePath(queue.queue, queue.paused ? "resume" : "pause"));
                await loadQueues();
              } catch (error) {
                fail(error);
              }
            },
          }),
        }] : []),
      ], stats, { empty: "No queues yet: enqueue a job to make one." }));
      const fresh = stats.map((queue) => queue.queue);
      if (fresh.join("\n") !== names.join("\n")) {
        const chosen = picker.value || (stats.find((queue) => queue.dead > 0) || stats[0] || {}).queue || "";
        names = fresh;
        replace(picker, names.map((name) => el("option", { value: name, text: name })));
        picker.value = names.includes(chosen) ? chosen : (names[0] || "");
      }
    }

    async function loadSchedules() {
      const list = (await getJson("/v1/schedules")).schedules;
      replace(schedules, table("Schedules", [
        { label: "Schedule", value: (schedule) => schedule.name },
        { label: "Queue", value: (schedule) => schedule.queue },
        { label: "Cron", value: (schedule) => el("code", { text: `${schedule.cron} (${schedule.timezone})` }) },
        { label: "Job", value: (schedule) => schedule.job_name },
        { label: "Next run", value: (schedule) => format.time(schedule.next_run_at) },
        { label: "Last tick", value: (schedule) => format.time(schedule.last_tick) },
        { label: "Catch-up", value: (schedule) => schedule.catch_up },
      ], list, { empty: "No schedules." }));
    }

    picker.addEventListener("change", () => loadDead().catch(fail));
    if (retryAll) {
      retryAll.addEventListener("click", () => act(() => postJson(queuePath(picker.value, "dead/retry"), {}), `Dead jobs of ${picker.value} are waiting again.`));
    }

    section.append(
      el("div", { class: "charts" }, charts.map((chart) => chart.element)),
      card("Queues", queues),
      card("Dead jobs",
        el("div", { class: "form inline" }, el("label", { for: "dead-queue", text: "Queue" }), picker, retryAll),
        deadMessage, dead),
      card("Schedules", schedules));
    poll(async () => {
      await loadQueues();
      await Promise.all([loadDead(), loadSchedules()]);
    }, 5000);
    return metrics.subscribe((points) => charts.forEach((chart) => chart.update(points)));
  },
};
