// The one way the dashboard talks to keel: same-origin fetches with the session cookie,
// the CSRF token on every state-changing request, and problem+json turned into errors
// that say what the server said.
//
// The CSRF token lives in this module only (never in storage): a reload fetches the
// session again. The access token is sent once, to /v1/auth/login, and never kept.

let csrf = null;
let unauthorizedHandler = () => {};

/// An answer other than 2xx. `detail` is the problem+json detail when the server sent one.
export class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem.detail || problem.title || `HTTP ${status}`;
    super(detail);
    this.name = "ApiError";
    this.status = status;
    this.code = problem.code || null;
    this.title = problem.title || null;
    this.detail = detail;
  }
}

/// Called on any 401 (no session, or it expired), after the request failed.
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

const WRITES = new Set(["POST", "PUT", "DELETE", "PATCH"]);

async function problemOf(response) {
  const text = await response.text().catch(() => "");
  try {
    const parsed = JSON.parse(text);
    if (parsed && typeof parsed === "object") return parsed;
  } catch {
    // Not JSON: a proxy's page or plain text; show its first line.
  }
  return { detail: text.split("\n")[0].slice(0, 200) || response.statusText };
}

/// Sends one request. `body` is JSON-encoded unless it is a string (sent as is).
/// Resolves to the Response for a 2xx; rejects with ApiError otherwise.
export async function request(method, path, { body, headers = {}, quietUnauthorized = false } = {}) {
  const init = { method, credentials: "same-origin", headers: { ...headers } };
  if (body !== undefined) {
    if (typeof body === "string") {
      init.body = body;
    } else {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
  }
  if (WRITES.has(method) && csrf) init.headers["X-CSRF-Token"] = csrf;
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, { detail: `keel did not answer (${error.message})` });
  }
  if (response.ok) return response;
  const problem = await problemOf(response);
  if (response.status === 401 && !quietUnauthorized) unauthorizedHandler();
  throw new ApiError(response.status, problem);
}

export async function getJson(path) {
  return (await request("GET", path)).json();
}

export async function postJson(path, body = {}) {
  const response = await request("POST", path, { body });
  return response.status === 204 ? null : response.json();
}

export async function del(path) {
  await request("DELETE", path);
}

/// The session: `{auth_enabled, name, role, scopes, csrf}`, or null when a login is
/// needed. A keel without the session route (404) has auth disabled.
export async function loadSession() {
  try {
    const session = await (await request("GET", "/v1/auth/session", { quietUnauthorized: true })).json();
    csrf = session.csrf || null;
    return session;
  } catch (error) {
    if (error.status === 404) {
      csrf = null;
      return { auth_enabled: false };
    }
    if (error.status === 401) {
      csrf = null;
      return null;
    }
    throw error;
  }
}

export async function login(token) {
  const session = await (await request("POST", "/v1/auth/login", { body: { token }, quietUnauthorized: true })).json();
  csrf = session.csrf || null;
  return session;
}

export async function logout() {
  try {
    await request("POST", "/v1/auth/logout", { quietUnauthorized: true });
  } finally {
    csrf = null;
  }
}

/// Whether the session may change things. Read-only sessions get no write controls.
export function canWrite(session) {
  return !session || !session.auth_enabled || session.role !== "readonly";
}
