-- scripts/bench sql, workload (c): one single-row INSERT per request through
-- POST /v1/sql/execute (group-committed, durable), like pgbench's pgbench_history insert.
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  math.randomseed(os.time() * 64 + (id or 0))
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local body = '{"sql":"INSERT INTO history (aid, delta, mtime) VALUES (?, ?, CURRENT_TIMESTAMP)","params":[%d,%d]}'

function request()
  return wrk.format(nil, nil, nil, string.format(body, math.random(1, 100000), math.random(-5000, 5000)))
end
