// Drives keel's dashboard in headless Chromium (Debian's /usr/bin/chromium, never a
// downloaded browser) and checks every page against a running keel.
//
//   KEEL_URL        the api listener (default http://127.0.0.1:8080)
//   KEEL_TOKEN      an access token, when keel has authentication on
//   KEEL_READONLY_TOKEN  a token of role readonly: checks its session has no write
//                   controls (optional)
//   KEEL_SEED=1     seed the data first (seed.mjs); leave unset against `keel demo`
//   KEEL_GATEWAY_URL  the gateway listener, for seeding traffic (optional)
//   KEEL_ANALYZE_SQL  the analyzer's query over an unindexed column
//                   (default: SELECT * FROM posts WHERE author_email = 'x')
//   KEEL_DEAD_QUEUE the queue with a dead job to retry (default email)
//   KEEL_RESP       host:port of the RESP listener: the invalidated key is also checked
//                   with redis-cli (optional)
//   KEEL_SCREENSHOTS  where screenshots go (default target/screenshots of the repo)
//   CHROMIUM        the browser (default /usr/bin/chromium)
//
// Waits poll with a deadline; nothing sleeps a fixed time. Exits nonzero on the first
// failed check, after printing which.

import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { execFileSync } from "node:child_process";
import { chromium } from "playwright-core";

import { client, eventually } from "./rest.mjs";
import { seed } from "./seed.mjs";

const BASE = (process.env.KEEL_URL || "http://127.0.0.1:8080").replace(/\/$/, "");
const TOKEN = process.env.KEEL_TOKEN || "";
const READONLY_TOKEN = process.env.KEEL_READONLY_TOKEN || "";
const ANALYZE_SQL = process.env.KEEL_ANALYZE_SQL || "SELECT * FROM posts WHERE author_email = 'x'";
const DEAD_QUEUE = process.env.KEEL_DEAD_QUEUE || "email";
const RESP = process.env.KEEL_RESP || "";
const HERE = path.dirname(fileURLToPath(import.meta.url));
const SHOTS = path.resolve(process.env.KEEL_SCREENSHOTS || path.join(HERE, "..", "..", "target", "screenshots"));
const DEADLINE = 20000;
const ORIGIN = new URL(BASE).origin;

const rest = client(BASE, TOKEN);
let passed = 0;

function ok(what) {
  passed += 1;
  console.log(`ok ${passed} - ${what}`);
}

/// Waits until `fn` (run in the page) returns a truthy value.
async function until(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: DEADLINE, polling: 100 });
  } catch (error) {
    throw new Error(`timed out waiting for ${what}: ${error.message.split("\n")[0]}`);
  }
}

/// Charts in `root` have drawn at least two points.
function chartsDrawn(page, root) {
  return until(page, `the charts of ${root}`, (selector) => {
    const charts = [...document.querySelectorAll(`${selector} figure.chart`)];
    return charts.length > 0 && charts.every((chart) => Number(chart.dataset.points) >= 2);
  }, root);
}

/// The table in `slot` is rendered with at least `rows` rows.
function tableLoaded(page, slot, rows) {
  return until(page, `${slot} with ${rows}+ rows`, ([selector, least]) => {
    const table = document.querySelector(`${selector} table[data-state="loaded"]`);
    return table && Number(table.dataset.rows) >= least;
  }, [slot, rows]);
}

async function screenshot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

async function show(page, name) {
  await page.evaluate((hash) => { window.location.hash = hash; }, `#/${name}`);
  await until(page, `page ${name}`, (id) => document.getElementById(id) !== null, `page-${name}`);
}

/// Per page: what "has data" means, from what REST says there is.
const PAGES = {
  async overview(page) {
    await chartsDrawn(page, "#page-overview");
  },
  async gateway(page) {
    await chartsDrawn(page, "#page-gateway");
    const routes = (await rest.get("/v1/gateway/routes")).json.routes.length;
    const upstreams = (await rest.get("/v1/gateway/upstreams")).json.upstreams.length;
    await tableLoaded(page, "#gateway-routes", Math.min(routes, 1));
    await tableLoaded(page, "#gateway-upstreams", Math.min(upstreams, 1));
  },
  async cache(page) {
    await chartsDrawn(page, "#page-cache");
    await tableLoaded(page, "#cache-layers", 1);
  },
  async queues(page) {
    await chartsDrawn(page, "#page-queues");
    const queues = (await rest.get("/v1/queues")).json.queues.length;
    await tableLoaded(page, "#queues-table", Math.min(queues, 1));
    await tableLoaded(page, "#dead-jobs", 0);
    await tableLoaded(page, "#schedules", 0);
  },
  async sql(page) {
    await chartsDrawn(page, "#page-sql");
    const statements = (await rest.get("/v1/sql/stats")).json.statements.length;
    await tableLoaded(page, "#sql-statements", Math.min(statements, 1));
    await tableLoaded(page, "#sql-slow", 0);
  },
  async system(page) {
    await until(page, "the system facts", () => document.querySelector("#system-about dl") !== null);
    await tableLoaded(page, "#system-storage", 1);
    await tableLoaded(page, "#system-config", 1);
  },
};

async function authEnabled() {
  const answer = await fetch(`${BASE}/v1/auth/session`);
  if (answer.status === 404) return false;
  if (answer.status === 401) return true;
  return Boolean((await answer.json()).auth_enabled);
}

async function logIn(page, token, { checkWrongToken = true } = {}) {
  await until(page, "the login form", () => !document.getElementById("login").hidden);
  assert.ok(token, "keel has authentication on: give KEEL_TOKEN");
  if (checkWrongToken) {
    await page.fill("#login-token", `wrong-${Date.now()}`);
    await page.click("#login-form button[type=submit]");
    await until(page, "the login error", () => {
      const message = document.getElementById("login-error");
      return !message.hidden && message.textContent.trim().length > 0;
    });
    await screenshot(page, "login");
    ok(`a wrong token shows an error in the login form: ${await page.textContent("#login-error")}`);
  }
  await page.fill("#login-token", token);
  await page.click("#login-form button[type=submit]");
  await until(page, "the dashboard after login", () => !document.getElementById("nav").hidden);
  ok("logged in with the token");
  assert.equal(await page.evaluate(() => JSON.stringify(localStorage) + JSON.stringify(sessionStorage)), "{}{}",
    "nothing of the session in web storage");
}

/// A readonly session sees the data but no control that changes anything.
async function readonlyHasNoWriteControls(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  await page.goto(`${BASE}/`);
  await logIn(page, READONLY_TOKEN, { checkWrongToken: false });
  await show(page, "queues");
  await tableLoaded(page, "#queues-table", 1);
  await tableLoaded(page, "#dead-jobs", 0);
  assert.equal(await page.$$eval("#page-queues button", (buttons) => buttons.length), 0, "no buttons on Queues");
  await show(page, "cache");
  await tableLoaded(page, "#cache-layers", 1);
  assert.equal(await page.$("#cache-invalidate"), null, "no invalidate form");
  assert.ok(await page.$("#cache-lookup"), "looking up stays");
  await context.close();
  ok("a readonly session has no write controls on Queues and Cache");
}

async function logOut(page) {
  await page.click("#logout");
  await until(page, "the login form after logout", () => !document.getElementById("login").hidden);
  const status = await page.evaluate(async () => (await fetch("/v1/queues", { credentials: "same-origin" })).status);
  assert.equal(status, 401, "the session is gone after logout");
  ok("logging out shows the login form and ends the session");
}

async function retryDeadJob(page) {
  await show(page, "queues");
  await until(page, `queue ${DEAD_QUEUE} in the dead-job picker`,
    (queue) => [...document.querySelectorAll("#dead-queue option")].some((option) => option.value === queue), DEAD_QUEUE);
  await page.selectOption("#dead-queue", DEAD_QUEUE);
  await until(page, `a dead job of ${DEAD_QUEUE}`,
    (queue) => document.querySelector(`#dead-jobs tr[data-queue="${queue}"][data-job-id]`) !== null, DEAD_QUEUE);
  const id = await page.getAttribute("#dead-jobs tr[data-job-id]", "data-job-id");
  assert.equal((await rest.get(`/v1/jobs/${id}`)).json.state, "dead");
  await page.click(`#dead-jobs tr[data-job-id="${id}"] button.retry`);
  await until(page, "the retry's outcome", () => !document.getElementById("dead-result").hidden);
  const state = await eventually(`job ${id} to leave the dead state`, async () => {
    const job = (await rest.get(`/v1/jobs/${id}`)).json;
    return job.state !== "dead" && job.state;
  });
  ok(`retried dead job ${id} from the Queues page; REST says it is ${state}`);
}

/// One command through the real Redis client against keel's RESP listener.
function redisCli(...command) {
  const [host, port] = RESP.split(":");
  const auth = TOKEN ? ["--no-auth-warning", "-a", TOKEN] : [];
  return execFileSync("redis-cli", ["-h", host, "-p", port, ...auth, ...command], { encoding: "utf8" }).trim();
}

async function invalidateKey(page) {
  const key = `browser-check:${Date.now()}`;
  const value = "to be invalidated from the Cache page";
  await rest.put(`/v1/cache/${encodeURIComponent(key)}`, value);
  if (RESP) assert.equal(redisCli("EXISTS", key), "1", `redis-cli does not find ${key}`);
  await show(page, "cache");
  await page.fill("#cache-lookup-key", key);
  await page.click("#cache-lookup button[type=submit]");
  await until(page, "the looked-up value", (text) =>
    (document.getElementById("cache-lookup-result").textContent || "").includes(text), value);
  ok("looked a key up on the Cache page");
  await page.selectOption("#cache-invalidate-by", "keys");
  await page.fill("#cache-invalidate-value", key);
  await page.click("#cache-invalidate button[type=submit]");
  await until(page, "the invalidation's outcome", () => {
    const message = document.getElementById("cache-invalidate-result");
    return !message.hidden && /Invalidated 1 entry/.test(message.textContent);
  });
  const after = await rest.get(`/v1/cache/${encodeURIComponent(key)}`, { expect: null });
  assert.equal(after.status, 404, `the key should be gone, REST answered ${after.status}`);
  ok(`invalidated ${key} from the Cache page; REST answers 404`);
  if (RESP) {
    assert.equal(redisCli("EXISTS", key), "0", `redis-cli still finds ${key}`);
    ok(`redis-cli EXISTS ${key} answers 0`);
  }
}

async function analyze(page) {
  await show(page, "sql");
  await page.fill("#analyze-sql", ANALYZE_SQL);
  await page.click("#analyze button[type=submit]");
  await until(page, "an index proposal", () => document.getElementById("analyze-create-index") !== null
    || document.getElementById("analyze-no-proposal") !== null || !document.getElementById("analyze-error").hidden);
  const proposal = await page.$("#analyze-create-index");
  assert.ok(proposal, `no index proposal for ${ANALYZE_SQL}: ${await page.textContent("#analyze-result")} ${await page.textContent("#analyze-error")}`);
  const statement = await proposal.textContent();
  assert.match(statement, /CREATE INDEX/);
  assert.ok((await page.textContent("#analyze-plan-before")).length > 0);
  assert.ok((await page.textContent("#analyze-plan-after")).length > 0);
  await screenshot(page, "sql-analyzer");
  ok(`the analyzer proposes: ${statement}`);
}

/// With auth on, a state-changing request without X-CSRF-Token is refused, even with
/// the session cookie, and changes nothing.
async function csrfRefused(context) {
  const key = `browser-csrf:${Date.now()}`;
  await rest.put(`/v1/cache/${encodeURIComponent(key)}`, "must survive");
  const probe = await context.newPage();
  await probe.goto(`${BASE}/icon.svg`);
  const status = await probe.evaluate(async (target) => {
    const response = await fetch("/v1/cache/invalidate", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ keys: [target] }),
    });
    return response.status;
  }, key);
  await probe.close();
  assert.equal(status, 403, `a POST without X-CSRF-Token answered ${status}`);
  assert.equal((await rest.get(`/v1/cache/${encodeURIComponent(key)}`, { expect: null })).status, 200);
  ok(`a POST without X-CSRF-Token is refused (${status}) and changes nothing`);
}

async function phoneWidth(page) {
  await page.setViewportSize({ width: 375, height: 812 });
  await show(page, "overview");
  await chartsDrawn(page, "#page-overview");
  const widths = await page.evaluate(() => ({ scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth }));
  assert.ok(widths.scroll <= widths.client, `horizontal scroll at 375 px: ${widths.scroll} > ${widths.client}`);
  await screenshot(page, "overview-phone");
  ok("Overview at 375 px wide has no horizontal scroll");
  await page.emulateMedia({ colorScheme: "dark" });
  await screenshot(page, "overview-phone-dark");
  await page.emulateMedia({ colorScheme: "light" });
  await page.setViewportSize({ width: 1280, height: 900 });
}

async function main() {
  await mkdir(SHOTS, { recursive: true });
  if (process.env.KEEL_SEED === "1") {
    await seed({ base: BASE, token: TOKEN, gateway: process.env.KEEL_GATEWAY_URL || "" });
    ok("seeded keel through REST");
  }
  const auth = await authEnabled();
  console.log(`# ${BASE}: authentication ${auth ? "on" : "off"}`);

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
      "--no-first-run", "--disable-component-update", "--disable-sync"],
  });
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, colorScheme: "light" });
    const page = await context.newPage();
    const consoleErrors = [];
    const foreign = [];
    page.on("console", (message) => {
      if (message.type() !== "error") return;
      const where = message.location().url || "";
      // The session probe (404 before auth exists, 401 before login) and the wrong
      // token are expected failures; any other is a finding.
      if (/\/v1\/auth\/(session|login)$/.test(new URL(where, BASE).pathname)) return;
      consoleErrors.push(`${message.text()} (${where})`);
    });
    page.on("pageerror", (error) => consoleErrors.push(`uncaught: ${error.message}`));
    context.on("request", (request) => {
      const url = request.url();
      if (!url.startsWith("data:") && new URL(url).origin !== ORIGIN) foreign.push(url);
    });

    await page.goto(`${BASE}/`);
    if (auth) {
      await logIn(page, TOKEN);
    } else {
      await until(page, "the dashboard", () => !document.getElementById("nav").hidden);
      ok("auth is off: the dashboard opens without a login");
    }

    for (const [name, ready] of Object.entries(PAGES)) {
      await show(page, name);
      await ready(page);
      await screenshot(page, name);
      ok(`${name}: data shown, screenshot ${path.join(SHOTS, `${name}.png`)}`);
    }

    await retryDeadJob(page);
    await invalidateKey(page);
    await analyze(page);
    await phoneWidth(page);
    if (auth) {
      await csrfRefused(context);
      if (READONLY_TOKEN) await readonlyHasNoWriteControls(browser);
      else console.log("# skipped: the readonly check needs KEEL_READONLY_TOKEN");
    } else {
      console.log("# skipped: the CSRF and role checks need authentication on");
    }

    assert.deepEqual(consoleErrors, [], "console errors");
    ok("no console errors");
    assert.deepEqual(foreign, [], "requests to other hosts");
    ok(`no requests to any host but ${ORIGIN}`);
    if (auth) await logOut(page);
  } finally {
    await browser.close();
  }
  console.log(`${passed} passed, 0 failed`);
}

main().catch((error) => {
  console.error(`not ok - ${error.stack || error.message}`);
  console.log(`${passed} passed, 1 failed`);
  process.exit(1);
});
