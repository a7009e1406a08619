// The live series every chart draws from: the 1 s history (`/v1/metrics/history`) once,
// then one point a second from the server-sent events of `/v1/metrics/stream`. One
// stream for the whole dashboard, whichever page is shown.

import { getJson } from "./api.js";

const KEEP = 900; // The server keeps 15 minutes at 1 s; so do we.

let index = new Map();
let points = [];
let source = null;
let retry = null;
const listeners = new Set();

function notify() {
  for (const listener of listeners) listener(points);
}

async function loadHistory() {
  const history = await getJson("/v1/metrics/history?resolution=1s");
  index = new Map(history.series.map((name, position) => [name, position]));
  points = history.points;
  notify();
}

/// The value of series `name` in `point`, or null.
export function read(point, name) {
  const position = index.get(name);
  return position === undefined ? null : point.values[position] ?? null;
}

/// Calls `listener(points)` now and on every new point; returns the unsubscribe function.
export function subscribe(listener) {
  listeners.add(listener);
  listener(points);
  return () => listeners.delete(listener);
}

/// Loads the history and follows the stream. Errors reach `onError` (the page's alert).
export async function start(onError) {
  stop();
  try {
    await loadHistory();
  } catch (error) {
    onError(error);
  }
  source = new EventSource("/v1/metrics/stream", { withCredentials: true });
  let broken = false;
  source.addEventListener("point", (event) => {
    const point = JSON.parse(event.data);
    if (points.length && points[points.length - 1].at >= point.at) return;
    points.push(point);
    if (points.length > KEEP) points.splice(0, points.length - KEEP);
    notify();
  });
  source.addEventListener("open", () => {
    // After a break, fill the gap from the history.
    if (broken) loadHistory().catch(onError);
    broken = false;
  });
  source.addEventListener("error", () => {
    broken = true;
    if (source && source.readyState === EventSource.CLOSED) {
      // The browser gave up (an error status such as 401): ask once by fetch, which
      // shows the login form on a 401, then try again a little later.
      source = null;
      loadHistory().catch(onError);
      retry = setTimeout(() => start(onError), 5000);
    }
  });
}

export function stop() {
  if (source) source.close();
  source = null;
  clearTimeout(retry);
}
