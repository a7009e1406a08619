// Talking to keel's REST api from node (seeding, and checking what the browser did),
// with the access token as a Bearer credential when one is given.

export function client(base, token) {
  async function call(method, path, body, { expect = [200, 201, 204] } = {}) {
    const headers = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    let payload;
    if (body !== undefined) {
      if (typeof body === "string") {
        payload = body;
      } else {
        payload = JSON.stringify(body);
        headers["Content-Type"] = "application/json";
      }
    }
    const response = await fetch(`${base}${path}`, { method, headers, body: payload });
    const text = await response.text();
    if (expect && !expect.includes(response.status)) {
      throw new Error(`${method} ${path} answered ${response.status}: ${text.slice(0, 300)}`);
    }
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      // A value from the cache, or another non-JSON body.
    }
    return { status: response.status, text, json };
  }
  return {
    call,
    get: (path, options) => call("GET", path, undefined, options),
    post: (path, body = {}, options) => call("POST", path, body, options),
    put: (path, body, options) => call("PUT", path, body, options),
  };
}

/// Polls `probe` (async, returns a truthy value when done) every 100 ms until `ms`.
export async function eventually(what, probe, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const value = await probe();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last.message}` : ""}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
