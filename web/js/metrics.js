// The live series every chart draws from: the 1 s history (`/v1/metrics/history`) once,
// then one point a second from the server-sent events of `/v1/metrics/stream`. One
// stream for the whole dashboard, whichever page is shown.

import { getJson } from "./api.js";

const KEEP = 900; // The server keeps 15 minutes at 1 s; so do we.

let index = new Map();
let points = [];
let source = null;
let retry = null;
/// Bumped by every start and stop, so work begun for an older start (an await that
/// returns after a logout) does nothing.
let generation = 0;
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

/// Loads the history and follows the stream. Errors reach `onError` (the page's alert),
/// except a 401, which api.js already answers with the login form.
export async function start(onError) {
  stop();
  const mine = generation;
  const report = (error) => {
    if (error.status !== 401 && mine === generation) onError(error);
  };
  try {
    await loadHistory();
  } catch (error) {
    report(error);
  }
  if (mine !== generation) return;
  const stream = new EventSource("/v1/metrics/stream", { withCredentials: true });
  source = stream;
  let broken = false;
  stream.addEventListener("point", (event) => {
    const point = JSON.parse(event.data);
    if (points.length && points[points.length - 1].at >= point.at) return;
    points.push(point);
    if (points.length > KEEP) points.splice(0, points.length - KEEP);
    notify();
  });
  stream.addEventListener("open", () => {
    // After a break, fill the gap from the history.
    if (broken) loadHistory().catch(report);
    broken = false;
  });
  stream.addEventListener("error", () => {
    broken = true;
    if (mine === generation && stream.readyState === EventSource.CLOSED) {
      // The browser gave up (an error status such as 401): ask once by fetch, which
      // shows the login form on a 401, then try again a little later.
      source = null;
      loadHistory().catch(report);
      retry = setTimeout(() => {
        if (mine === generation) start(onError);
      }, 5000);
    }
  });
}

export function stop() {
  generation += 1;
  if (source) source.close();
  source = null;
  clearTimeout(retry);
}
