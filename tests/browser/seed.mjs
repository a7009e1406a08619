// Seeds a fresh keel with what the dashboard test looks at, through the REST api only:
// a cache key, queue `email` with a dead job (and a completed one), table `posts` with
// an unindexed `author_email` and enough rows for the analyzer to call a scan large,
// and some gateway traffic (cache hits, rate-limit rejections) when KEEL_GATEWAY_URL
// is given. `keel demo` seeds the same names, so the checks run against either.
//
// Run on its own: KEEL_URL=http://127.0.0.1:8080 [KEEL_TOKEN=...] node seed.mjs

import { client } from "./rest.mjs";

export async function seed({ base, token, gateway }) {
  const rest = client(base, token);

  await rest.put("/v1/cache/browser-test%3Agreeting?ttl=1h&tags=browser-test", "hello from the dashboard seed");
  await rest.post("/v1/cache/mget", { keys: ["browser-test:greeting", "browser-test:absent"] });

  // One job dies (one attempt, failed), one completes: counts, throughput, dead list.
  const queue = "/v1/queues/email";
  await rest.post(`${queue}/jobs`, [
    { name: "send-welcome", payload: { to: "ada@example.com", template: "welcome" }, attempts: 1 },
    { name: "send-digest", payload: { to: "grace@example.com", template: "digest" } },
  ]);
  const reserved = (await rest.post(`${queue}/reserve`, { max: 100 })).json.jobs;
  for (const job of reserved) {
    if (job.name === "send-welcome") {
      await rest.post(`/v1/jobs/${job.id}/fail`, { lease_token: job.lease_token, error: "SMTP 550: mailbox unavailable" });
    } else {
      await rest.post(`/v1/jobs/${job.id}/ack`, { lease_token: job.lease_token, result: { sent: true } });
    }
  }
  await rest.post("/v1/queues/reports/jobs", { name: "build-report", payload: { day: "today" }, delay: "1h" });

  // 2,000 rows: the analyzer only calls a scan of 1,000 rows or more a finding.
  await rest.post("/v1/sql/batch", {
    statements: [
      { sql: "CREATE TABLE IF NOT EXISTS posts (id INTEGER PRIMARY KEY, author_email TEXT NOT NULL, title TEXT NOT NULL)" },
      {
        sql: `INSERT INTO posts (author_email, title)
              WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
              SELECT 'author' || (i % 50) || '@example.com', 'Post ' || i FROM n
              WHERE (SELECT count(*) FROM posts) = 0`,
      },
    ],
  });
  for (let i = 0; i < 3; i += 1) {
    await rest.post("/v1/sql/query", { sql: "SELECT count(*) AS n FROM posts WHERE author_email = ?", params: [`author${i}@example.com`] });
  }

  if (gateway) {
    // Past the route's burst, so some answers are 429: rejections to show.
    await Promise.all(Array.from({ length: 40 }, () => fetch(`${gateway}/api/healthz`).then((response) => response.arrayBuffer())));
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  await seed({
    base: (process.env.KEEL_URL || "http://127.0.0.1:8080").replace(/\/$/, ""),
    token: process.env.KEEL_TOKEN || "",
    gateway: process.env.KEEL_GATEWAY_URL || "",
  });
  console.log("seeded");
}
