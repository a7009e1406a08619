-- scripts/bench sql, workload (a): primary-key point select through POST /v1/sql/query,
-- a random aid in 1..100000 for every request (the keel side of pgbench -S).
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
local body = '{"sql":"SELECT aid, bid, abalance FROM accounts WHERE aid = :aid","params":{"aid":%d}}'

function request()
  return wrk.format(nil, nil, nil, string.format(body, math.random(1, 100000)))
end
