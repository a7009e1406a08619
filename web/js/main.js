// The dashboard's shell: the session (login form when one is needed), the hash router
// that mounts one page at a time, the shared alert for errors, and the live metrics.

import * as api from "./api.js";
import * as metrics from "./metrics.js";
import { el, replace } from "./dom.js";
import overview from "./pages/overview.js";
import gateway from "./pages/gateway.js";
import cache from "./pages/cache.js";
import queues from "./pages/queues.js";
import sql from "./pages/sql.js";
import system from "./pages/system.js";

const PAGES = { overview, gateway, cache, queues, sql, system };

const $ = (id) => document.getElementById(id);
let session = null;
let unmount = null;
let timers = [];

function showAlert(error) {
  const alert = $("alert");
  const heading = error.status ? `${error.title || "Error"} (${error.status})` : "Error";
  replace(alert,
    el("strong", { text: heading }), " ",
    el("span", { class: "detail", text: error.detail || error.message || String(error) }),
    error.code ? el("code", { text: error.code }) : null,
    el("button", { type: "button", class: "link", "aria-label": "Dismiss the error", text: "Dismiss", onclick: clearAlert }));
  alert.hidden = false;
}

function clearAlert() {
  $("alert").hidden = true;
  $("alert").replaceChildren();
}

function leavePage() {
  for (const timer of timers) clearInterval(timer);
  timers = [];
  if (unmount) unmount();
  unmount = null;
  $("page").replaceChildren();
}

/// What a page gets: the session, whether it may write, error display, metrics, and
/// `poll(fn, ms)`, which runs `fn` now and every `ms` until the page is left.
function context() {
  return {
    session,
    canWrite: api.canWrite(session),
    fail: showAlert,
    metrics,
    poll(fn, ms) {
      const run = () => Promise.resolve().then(fn).catch((error) => {
        if (error.status !== 401) showAlert(error);
      });
      run();
      timers.push(setInterval(run, ms));
      return run;
    },
  };
}

function route(moveFocus = false) {
  if (!session) return;
  const name = location.hash.replace(/^#\/?/, "").split("/")[0] || "overview";
  const page = PAGES[name];
  leavePage();
  clearAlert();
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === `#/${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const container = $("page");
  if (!page) {
    replace(container, el("h1", { tabindex: "-1", text: "No such page" }),
      el("p", {}, "Try ", el("a", { href: "#/overview", text: "the overview" }), "."));
    return;
  }
  document.title = `${page.title} · Keel`;
  const section = el("section", { id: `page-${name}`, class: "page", "aria-labelledby": `title-${name}` },
    el("h1", { id: `title-${name}`, tabindex: "-1", text: page.title }));
  container.append(section);
  unmount = page.mount(section, context()) || null;
  // After a navigation, keyboard and screen-reader users land on the new page's title.
  if (moveFocus) section.querySelector("h1").focus();
}

function showLogin() {
  session = null;
  leavePage();
  metrics.stop();
  $("loading").hidden = true;
  $("nav").hidden = true;
  $("session").hidden = true;
  $("page").hidden = true;
  $("login").hidden = false;
  $("login-token").focus();
}

function showApp() {
  $("loading").hidden = true;
  $("login").hidden = true;
  $("login-error").hidden = true;
  $("nav").hidden = false;
  $("page").hidden = false;
  if (session.auth_enabled) {
    $("session-who").textContent = `${session.name || "signed in"} · ${session.role || "?"}`;
    $("session").hidden = false;
  } else {
    $("session").hidden = true;
  }
  metrics.start(showAlert);
  route();
}

async function boot() {
  try {
    session = await api.loadSession();
  } catch (error) {
    $("loading").textContent = "Keel did not answer; reload to try again.";
    showAlert(error);
    return;
  }
  if (session) showApp();
  else showLogin();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("login-token");
  const message = $("login-error");
  message.hidden = true;
  try {
    session = await api.login(input.value);
    input.value = "";
    clearAlert();
    showApp();
  } catch (error) {
    message.textContent = error.status === 404
      ? "This keel has no login route yet; it may be running without authentication."
      : error.detail;
    message.hidden = false;
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
});

$("logout").addEventListener("click", async () => {
  try {
    await api.logout();
  } catch (error) {
    showAlert(error);
  }
  showLogin();
});

api.onUnauthorized(() => {
  if (session) showLogin();
});

// The skip link moves focus without touching the hash, which belongs to the router.
document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  $("main").focus();
});

window.addEventListener("hashchange", () => route(true));
boot();
