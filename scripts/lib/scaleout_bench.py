"""`scripts/bench scaleout`: keel scaled out on this one machine.

Usage: scaleout_bench.py PATH_TO_KEEL PATH_TO_QUEUE_LOAD
       scaleout_bench.py PATH_TO_KEEL --resp-only   (part 2 alone)

1. The queue end to end (queue_load e2e, as `scripts/bench queue` runs it) with
   `queue.backend = "postgres"` on the PostgreSQL at 127.0.0.1:5432 (database keel_bench,
   a schema of this run's own, dropped after): one node, then three nodes sharing the
   schema with the enqueuers and workers spread over them.
2. RESP GET/SET, `redis-benchmark -q -c 50 -n 100000 -t set,get -P 1` and `-P 16`,
   against one keel with `cache.l2 = "redis://..."` (a private redis-server on a free
   port, no persistence), one with `cache.l2 = "redb"`, and that redis-server itself,
   the reference the keel figures are given as a share of.
3. The SQL data API's keel workloads of `scripts/bench sql` ((a) point select, (b) the
   cached named query, (c) single-row INSERT; sql_bench.py's `keel_side`) on SQLite, one
   node, then with `sql.url` on PostgreSQL (database keel_bench_sql_scaleout, its
   `accounts` and `history` tables recreated) on one node and on three, wrk's
   connections spread over the three; ratios to SQLite from this same run.

Prints markdown tables for BENCHMARKS.md. Never touches other schemas, databases or
servers.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchkit import free_port, ready, stop, wait_port
import sql_bench
from queue_bench import failures, figure, fmt, harness, KEEL, QUICK

JOBS = 20_000 if QUICK else 100_000
WORKERS = 8
ENQUEUERS = 8
RESERVE = 32
REQUESTS = 100_000
PIPELINES = (1, 16)
PG_URL = "postgres://postgres@127.0.0.1:5432/keel_bench"
SQL_PG_URL = "postgres://postgres@127.0.0.1:5432/keel_bench_sql_scaleout"


def psql(sql):
    subprocess.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "keel_bench", "-c", sql],
                   check=True, capture_output=True)


def start_keel(workdir, name, toml):
    """A release keel with `toml` added to loopback listeners; returns (process, api port, resp port)."""
    api, resp = free_port(), free_port()
    os.makedirs(f"{workdir}/{name}")
    config = f"{workdir}/{name}/keel.toml"
    with open(config, "w") as out:
        out.write(f'data_dir = "{workdir}/{name}/data"\n'
                  f'[listeners.api]\nbind = "127.0.0.1:{api}"\n'
                  f'[listeners.resp]\nbind = "127.0.0.1:{resp}"\n' + toml)
    log = open(f"{workdir}/{name}/keel.log", "w")
    keel = subprocess.Popen([KEEL, "serve", "--config", config], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while not ready(api):
        if keel.poll() is not None or time.time() > deadline:
            stop(keel)
            with open(f"{workdir}/{name}/keel.log") as output:
                sys.stderr.write(output.read()[-4000:])
            raise SystemExit(f"keel {name} did not become ready")
        time.sleep(0.02)
    return keel, api, resp


def queue_e2e(workdir, nodes):
    """The e2e run against `nodes` keels sharing one fresh schema; its RESULT dict."""
    schema = f"keel_bench_scaleout_{os.getpid()}_{nodes}"
    toml = f'[queue]\nbackend = "postgres"\nurl = "{PG_URL}"\nschema = "{schema}"\n'
    keels = []
    try:
        for index in range(nodes):
            keels.append(start_keel(workdir, f"q{nodes}-{index}", toml))
        urls = ",".join(f"http://127.0.0.1:{api}" for _, api, _ in keels)
        return harness("e2e", "--url", urls, "--jobs", str(JOBS), "--workers", str(WORKERS),
                       "--reserve", str(RESERVE), "--enqueuers", str(ENQUEUERS), "--per-request", "100")
    finally:
        for keel, _, _ in keels:
            stop(keel)
        psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def redis_benchmark(name, port, pipeline):
    """{"SET": ops/s, "GET": ops/s} from redis-benchmark against `port`."""
    command = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port),
               "-q", "-c", "50", "-n", str(REQUESTS), "-t", "set,get", "-P", str(pipeline)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    rows = {}
    for test, rps in re.findall(r"(SET|GET): ([\d.]+) requests per second", out.replace("\r", "\n")):
        rows[test] = float(rps)
    if set(rows) != {"SET", "GET"}:
        failures.append(f"redis-benchmark -P {pipeline} against {name}")
        sys.stderr.write(out)
    return rows


def resp_benchmark(workdir, name, l2):
    """{pipeline: {"SET": ops/s, "GET": ops/s}} against one keel with `l2`."""
    keel, _, resp = start_keel(workdir, name, f'[cache]\nl2 = "{l2}"\n')
    try:
        return {pipeline: redis_benchmark(name, resp, pipeline) for pipeline in PIPELINES}
    finally:
        stop(keel)


def main():
    resp_only = sys.argv[2] == "--resp-only"
    workdir = tempfile.mkdtemp(prefix="keel-bench-scaleout-")
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    try:
        if not resp_only:
            one = queue_e2e(workdir, 1)
            three = queue_e2e(workdir, 3)
        if not wait_port(redis_port, proc=redis):
            raise SystemExit("redis-server did not start")
        redb = resp_benchmark(workdir, "redb", "redb")
        shared = resp_benchmark(workdir, "redis", f"redis://127.0.0.1:{redis_port}/0")
        itself = {pipeline: redis_benchmark("redis-server", redis_port, pipeline) for pipeline in PIPELINES}
        if not resp_only:
            on_postgres = f'url = "{SQL_PG_URL}"'
            sql = {
                "sqlite": sql_bench.keel_side(workdir, "sql-sqlite"),
                "pg1": sql_bench.keel_side(workdir, "sql-pg1", 1, on_postgres, sql_bench.PG_SCHEMA),
                "pg3": sql_bench.keel_side(workdir, "sql-pg3", 3, on_postgres, sql_bench.PG_SCHEMA),
            }
    finally:
        stop(redis)
        shutil.rmtree(workdir, ignore_errors=True)

    def rate(result):
        return None if result is None or not result.get("ok") else result["jobs_per_s"]

    if not resp_only:
        print()
        print(f"| queue end to end, {JOBS:,} jobs ({ENQUEUERS} enqueuers × 100/request, {WORKERS} workers × "
              f"reserve {RESERVE} + batch ack), `queue.backend = \"postgres\"` | jobs/s | seconds |")
        print("|---|---|---|")
        print(f"| 1 node | {fmt(rate(one))} | {figure(one, 'seconds', 2)} |")
        print(f"| 3 nodes (enqueuers and workers spread over them) | {fmt(rate(three))} | "
              f"{figure(three, 'seconds', 2)} |")
    print()
    columns = [(pipeline, test) for pipeline in PIPELINES for test in ("SET", "GET")]
    print(f"| `redis-benchmark -q -c 50 -n {REQUESTS} -t set,get -P N`, ops/s (share of the Redis) | "
          + " | ".join(f"{test} -P {pipeline}" for pipeline, test in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")

    def cell(rows, pipeline, test):
        value, reference = rows[pipeline].get(test), itself[pipeline].get(test)
        if value is None or not reference or rows is itself:
            return fmt(value)
        return f"{fmt(value)} ({value / reference:.0%})"

    for label, rows in (("keel, `cache.l2 = \"redb\"`", redb), ("keel, `cache.l2 = \"redis://...\"`", shared),
                        ("the redis-server itself", itself)):
        print(f"| {label} | " + " | ".join(cell(rows, pipeline, test) for pipeline, test in columns) + " |")
    if not resp_only:
        print()
        print("SQL commands:")
        for command in sql_bench.commands:
            print(f"    {command}")
        print()
        print(f"| SQL data API, `scripts/bench sql`'s keel workloads, {sql_bench.SECONDS} s each; req/s (p50 / p99 ms; "
              "3 nodes: the worst node's) | SQLite, 1 node | PostgreSQL, 1 node | PostgreSQL, 3 nodes | "
              "PostgreSQL 1 node / SQLite | 3 nodes / SQLite |")
        print("|---|---|---|---|---|---|")
        for key, label in (("select", f"(a) point select, `POST /v1/sql/query`, {sql_bench.READERS} connections"),
                           ("named", f"(b) the same as the cached named query, {sql_bench.READERS} connections"),
                           ("insert", f"(c) single-row INSERT, `POST /v1/sql/execute`, {sql_bench.WRITERS} connections")):
            runs = [sql[name].get(key) for name in ("sqlite", "pg1", "pg3")]
            ratios = [sql_bench.ratio(run, runs[0], "rps", "rps") for run in runs[1:]]
            print(f"| {label} | " + " | ".join(sql_bench.keel_cell(run) for run in runs) + " | "
                  + " | ".join(fmt(value, 2) for value in ratios) + " |")
    everything = failures + sql_bench.failures
    if everything:
        raise SystemExit(f"scaleout bench: failed: {', '.join(everything)} (see above)")


main()
