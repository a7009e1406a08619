// A stand-in for keel's session auth while it is being built: a reverse proxy in front
// of a keel without auth that implements the dashboard's auth contract, so the browser
// test can check the login, the CSRF header and role handling today.
//
//   GET  /v1/auth/session  200 {auth_enabled, name, role, scopes, csrf} or 401
//   POST /v1/auth/login    {"token"} -> 200 + HttpOnly SameSite=Strict keel_session; 401
//   POST /v1/auth/logout
//   any other /v1 route: a session cookie (writes also need X-CSRF-Token) or
//   `Authorization: Bearer <token>`; otherwise 401 (403 for a write without CSRF).
//
// Once keel answers /v1/auth/session itself, point the test at keel and drop this.
//
//   node auth-stub.mjs --upstream http://127.0.0.1:8080 --port 8081 --token T [--readonly-token R]

import { randomBytes } from "node:crypto";
import http from "node:http";
import { parseArgs } from "node:util";

const { values: options } = parseArgs({
  options: {
    upstream: { type: "string" },
    port: { type: "string", default: "0" },
    token: { type: "string" },
    "readonly-token": { type: "string" },
  },
});
const upstream = new URL(options.upstream);
const roles = new Map([[options.token, "admin"]]);
if (options["readonly-token"]) roles.set(options["readonly-token"], "readonly");
const sessions = new Map(); // cookie value -> {csrf, role}

function problem(response, status, code, detail) {
  response.writeHead(status, { "Content-Type": "application/problem+json" });
  response.end(JSON.stringify({ type: `urn:keel:problem:${code}`, title: http.STATUS_CODES[status], status, detail, code }));
}

function sessionOf(request) {
  const cookie = (request.headers.cookie || "").split(";").map((part) => part.trim())
    .find((part) => part.startsWith("keel_session="));
  const id = cookie ? cookie.slice("keel_session=".length) : null;
  return id && sessions.has(id) ? { id, ...sessions.get(id) } : null;
}

function sessionJson({ csrf, role }) {
  return JSON.stringify({ auth_enabled: true, name: `stub-${role}`, role, scopes: [], csrf });
}

async function body(request) {
  const chunks = [];
  for await (const chunk of request) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

function forward(request, response) {
  const headers = { ...request.headers, host: upstream.host };
  delete headers.cookie;
  delete headers.authorization;
  const outgoing = http.request({ host: upstream.hostname, port: upstream.port, path: request.url, method: request.method, headers }, (answer) => {
    response.writeHead(answer.statusCode, answer.headers);
    answer.pipe(response);
  });
  outgoing.on("error", (error) => problem(response, 502, "bad_gateway", error.message));
  request.pipe(outgoing);
}

const server = http.createServer(async (request, response) => {
  const path = new URL(request.url, "http://stub").pathname;
  const session = sessionOf(request);
  if (path === "/v1/auth/session" && request.method === "GET") {
    if (!session) return problem(response, 401, "unauthenticated", "log in first");
    response.writeHead(200, { "Content-Type": "application/json" });
    return response.end(sessionJson(session));
  }
  if (path === "/v1/auth/login" && request.method === "POST") {
    let token;
    try {
      token = JSON.parse(await body(request)).token;
    } catch {
      return problem(response, 400, "bad_json", "send {\"token\": \"...\"}");
    }
    if (!roles.has(token)) return problem(response, 401, "invalid_credentials", "the token is not valid");
    const id = randomBytes(24).toString("hex");
    const created = { csrf: randomBytes(24).toString("hex"), role: roles.get(token) };
    sessions.set(id, created);
    response.writeHead(200, {
      "Content-Type": "application/json",
      "Set-Cookie": `keel_session=${id}; Path=/; HttpOnly; SameSite=Strict`,
    });
    return response.end(sessionJson(created));
  }
  if (path === "/v1/auth/logout" && request.method === "POST") {
    if (session) sessions.delete(session.id);
    response.writeHead(204, { "Set-Cookie": "keel_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0" });
    return response.end();
  }
  if (path.startsWith("/v1/")) {
    const bearer = request.headers.authorization === `Bearer ${options.token}`;
    if (!bearer && !session) return problem(response, 401, "unauthenticated", "log in first");
    const write = !["GET", "HEAD", "OPTIONS"].includes(request.method);
    if (!bearer && write && request.headers["x-csrf-token"] !== session.csrf) {
      return problem(response, 403, "csrf", "a state-changing request needs the X-CSRF-Token header of the session");
    }
    if (!bearer && write && session.role === "readonly" && path !== "/v1/sql/analyze") {
      return problem(response, 403, "forbidden", "the session is read-only");
    }
  }
  return forward(request, response);
});

server.listen(Number(options.port), "127.0.0.1", () => {
  console.log(`auth stub on http://127.0.0.1:${server.address().port} -> ${upstream.origin}`);
});
