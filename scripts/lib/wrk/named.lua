-- scripts/bench sql, workload (b): the same point select as the cached named query
-- GET /v1/sql/q/account?aid=N, a random aid in 1..100000 for every request.
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  math.randomseed(os.time() * 64 + (id or 0))
end

function request()
  return wrk.format("GET", "/v1/sql/q/account?aid=" .. math.random(1, 100000))
end
