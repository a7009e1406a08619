"""`scripts/bench sql`: keel's SQL data API against PostgreSQL behind PgBouncer, same run.

Usage: sql_bench.py PATH_TO_KEEL

Keel first: a keel (fresh data dir, api listener on a free loopback port, RESP off, a
config with the cached named query `account`) is seeded through /v1/sql/execute with
100,000 `accounts` rows (one INSERT … WITH RECURSIVE), then wrk (Lua scripts in
scripts/lib/wrk/, a random aid in 1..100000 per request) drives
  (a) the primary-key point select through POST /v1/sql/query, 50 connections,
  (b) the same select as the cached named query GET /v1/sql/q/account?aid=N, 50
      connections, after a warm-up pass that requests every aid once,
  (c) a single-row INSERT into `history` through POST /v1/sql/execute, 32 connections.
Then keel is stopped and the peer runs: `pgbench -i -s 1` against the PostgreSQL at
127.0.0.1:5432 (database keel_bench_sql; pgbench drops and recreates its own pgbench_*
tables), and through a private PgBouncer (a child process on a free loopback port,
pool_mode = transaction, temporary ini and log) `pgbench -S` for (a) and a one-row
INSERT into pgbench_history for (c). Prints the commands, a markdown table with
keel/peer ratios for BENCHMARKS.md and a `RESULT {json}` line.
KEEL_BENCH_QUICK=1 makes every run 3 s. Never touches other databases or servers.
"""
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchkit import free_port, ready, duration_ms, parse_wrk, stop

KEEL = sys.argv[1]
QUICK = os.environ.get("KEEL_BENCH_QUICK") == "1"
SECONDS = 3 if QUICK else 10
ACCOUNTS = 100_000
READERS = 50
WRITERS = 32
WRK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk")
PG_HOST, PG_PORT, PG_USER, PG_DB = "127.0.0.1", 5432, "postgres", "keel_bench_sql"
POOL_SIZE = 20

SELECT = "SELECT aid, bid, abalance FROM accounts WHERE aid = :aid"
CONFIG = f"""\
[sql]
maintenance_cron = ""

[sql.queries.account]
sql = "{SELECT}"
cache_ttl = "5m"
"""
SCHEMA = [
    "DROP TABLE IF EXISTS accounts",
    "DROP TABLE IF EXISTS history",
    "CREATE TABLE accounts (aid INTEGER PRIMARY KEY, bid INTEGER, abalance INTEGER, filler TEXT)",
    "CREATE TABLE history (id INTEGER PRIMARY KEY, aid INTEGER, delta INTEGER, mtime TEXT)",
    # pgbench -i -s 1: 100,000 accounts in branch 1, balance 0, an 84-character filler.
    f"INSERT INTO accounts (aid, bid, abalance, filler) "
    f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ACCOUNTS}) "
    f"SELECT i, (i - 1) / 100000 + 1, 0, printf('%-84s', '') FROM n",
]
PG_INSERT = """\
\\set aid random(1, 100000 * :scale)
\\set delta random(-5000, 5000)
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);
"""

failures = []
commands = []


def wait_port(port, deadline=20):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def api(port, path, body=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.read().decode()


def shown(argv, workdir):
    """The command as printed: the temporary directory as $TMP, the wrk scripts relative."""
    text = shlex.join(argv).replace(workdir, "$TMP")
    return text.replace(WRK_DIR, "scripts/lib/wrk")


def run(argv, workdir, **kwargs):
    commands.append(shown(argv, workdir))
    print(f"$ {commands[-1]}", flush=True)
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


# --- wrk ---------------------------------------------------------------------------

def wrk(name, script, url, connections, workdir):
    proc = run(["wrk", "-t2", f"-c{connections}", f"-d{SECONDS}s", "--latency",
                "-s", os.path.join(WRK_DIR, script), url], workdir)
    for line in proc.stdout.splitlines():
        print(f"  {line}")
    for line in proc.stderr.splitlines():
        print(f"  {line}", file=sys.stderr)
    sys.stdout.flush()
    result = parse_wrk(proc.stdout)
    if proc.returncode != 0 or not result.get("rps"):
        failures.append(f"{name}: wrk failed")
        return None
    if result["non_2xx"] or result["socket_errors"]:
        failures.append(f"{name}: {result['non_2xx']} non-2xx responses, {result['socket_errors']} socket errors")
    return result


# --- keel --------------------------------------------------------------------------

def metric(port, name, labels):
    """The value of one counter sample in keel's /metrics, 0 when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(None, 1)[1])
    return 0.0


def leaked_readers(name, port):
    """After a wrk run keel is idle: a reader connection still counted in use was lost
    with a request that wrk cancelled by closing its connection at the end of the run."""
    time.sleep(0.5)
    in_use = metric(port, "keel_sql_readers_in_use", {})
    if in_use:
        failures.append(f"{name}: keel_sql_readers_in_use = {in_use:.0f} while idle after the run "
                        "(reader connections lost with requests cancelled when wrk closed its connections)")


def warm(port, connections=4, chunk=500):
    """Requests /v1/sql/q/account?aid=N once for every aid (pipelined keep-alive GETs on a
    few connections), so the named-query cache holds them all; returns the 200 count."""
    import threading

    ok = [0] * connections
    errors = []

    def worker(index):
        aids = range(1 + index, ACCOUNTS + 1, connections)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                reader = s.makefile("rb")
                for start in range(0, len(aids), chunk):
                    batch = aids[start:start + chunk]
                    s.sendall(b"".join(b"GET /v1/sql/q/account?aid=%d HTTP/1.1\r\nHost: b\r\n\r\n" % aid
                                       for aid in batch))
                    for _ in batch:
                        status = reader.readline()
                        length = 0
                        while True:
                            header = reader.readline()
                            if header in (b"\r\n", b""):
                                break
                            key, _, value = header.partition(b":")
                            if key.strip().lower() == b"content-length":
                                length = int(value)
                        reader.read(length)
                        if status.split()[1:2] == [b"200"]:
                            ok[index] += 1
        except (OSError, IndexError, ValueError) as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        failures.append(f"warm-up: {errors[0]}")
    return sum(ok)


def keel_side(workdir):
    config = f"{workdir}/keel.toml"
    with open(config, "w") as out:
        out.write(CONFIG)
    port = free_port()
    log = open(f"{workdir}/keel.log", "w")
    argv = [KEEL, "serve", "--config", config, "--data-dir", f"{workdir}/keel",
            "--set", f"listeners.api.bind=127.0.0.1:{port}", "--set", "listeners.resp.bind="]
    commands.append(shown(argv, workdir) + "   # keel.toml: [sql] maintenance_cron = \"\"; "
                    f"[sql.queries.account] sql = \"{SELECT}\", cache_ttl = \"5m\"")
    print(f"$ {commands[-1]}", flush=True)
    keel = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    results = {}
    try:
        deadline = time.time() + 30
        while not ready(port):
            if keel.poll() is not None or time.time() > deadline:
                raise RuntimeError("keel did not become ready")
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        for statement in SCHEMA:
            api(port, "/v1/sql/execute", {"sql": statement})
        seeded = json.loads(api(port, "/v1/sql/query", {"sql": "SELECT count(*) FROM accounts"}))["rows"][0][0]
        print(f"  seeded {seeded:,} accounts through /v1/sql/execute in {time.perf_counter() - started:.2f} s "
              "(one INSERT … WITH RECURSIVE)", flush=True)
        if seeded != ACCOUNTS:
            raise RuntimeError(f"seeded {seeded} accounts, not {ACCOUNTS}")

        results["select"] = wrk("select", "select.lua", f"{url}/v1/sql/query", READERS, workdir)
        leaked_readers("select", port)

        started = time.perf_counter()
        commands.append(f"(warm-up: GET /v1/sql/q/account?aid=N for N in 1..{ACCOUNTS:,}, pipelined on 4 connections)")
        warmed = warm(port)
        print(f"  warm-up: {warmed:,} × 200 in {time.perf_counter() - started:.1f} s", flush=True)
        if warmed != ACCOUNTS:
            failures.append(f"warm-up: {warmed:,} of {ACCOUNTS:,} requests answered 200")
        hits = metric(port, "keel_sql_named_cache_total", {"result": "hit"})
        misses = metric(port, "keel_sql_named_cache_total", {"result": "miss"})
        results["named"] = wrk("named", "named.lua", f"{url}/v1/sql/q/account", READERS, workdir)
        hits = metric(port, "keel_sql_named_cache_total", {"result": "hit"}) - hits
        misses = metric(port, "keel_sql_named_cache_total", {"result": "miss"}) - misses
        if results["named"] is not None:
            results["named"]["hit_ratio"] = hits / (hits + misses) if hits + misses else None
            print(f"  named-query cache during the run: {hits:,.0f} hits, {misses:,.0f} misses", flush=True)
        leaked_readers("named", port)

        results["insert"] = wrk("insert", "insert.lua", f"{url}/v1/sql/execute", WRITERS, workdir)
        inserted = json.loads(api(port, "/v1/sql/query", {"sql": "SELECT count(*) FROM history"}))["rows"][0][0]
        print(f"  history holds {inserted:,} rows", flush=True)
        insert = results["insert"]
        if insert is not None and inserted < insert.get("requests", 0) - insert["non_2xx"]:
            failures.append(f"insert: {inserted} rows in history, fewer than the successful requests")
        if keel.poll() is not None:
            failures.append("keel exited")
    except Exception as error:  # noqa: BLE001 — report, stop keel, go on with the peer
        failures.append(f"keel: {error}")
    finally:
        keel.terminate()
        try:
            keel.wait(timeout=60)
        except subprocess.TimeoutExpired:
            keel.kill()
            keel.wait()
            failures.append("keel did not stop within 60 s of SIGTERM")
        log.close()
        if failures:
            with open(f"{workdir}/keel.log") as output:
                lines = output.read().splitlines()
            panics = [f"{line}\n    {lines[i + 1] if i + 1 < len(lines) else ''}"
                      for i, line in enumerate(lines) if " panicked at " in line]
            if panics:
                sys.stderr.write(f"keel panicked {len(panics)} times; the first:\n" + "\n".join(panics[:3]) + "\n")
            tail = [line for line in lines
                    if not line.startswith((" ", "stack backtrace:", "note: "))][-15:]
            sys.stderr.write("keel's log (tail, backtraces left out):\n" + "\n".join(tail) + "\n")
    return results


# --- PostgreSQL + PgBouncer ----------------------------------------------------------

def psql(sql):
    return subprocess.run(["psql", "-X", "-q", "-tA", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER,
                           "-d", PG_DB, "-c", sql], check=True, capture_output=True, text=True).stdout.strip()


def start_pgbouncer(workdir):
    """A private PgBouncer in transaction pooling; returns (process, port, directory).
    PgBouncer refuses to run as root: as root its `user` setting makes it switch to the
    postgres account (nobody where there is none) after startup."""
    directory = f"{workdir}/pgbouncer"
    os.mkdir(directory)
    port = free_port()
    with open(f"{directory}/userlist.txt", "w") as out:
        out.write(f'"{PG_USER}" ""\n')
    ini = f"""\
[databases]
{PG_DB} = host={PG_HOST} port={PG_PORT} dbname={PG_DB} user={PG_USER}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/userlist.txt
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
logfile = {directory}/pgbouncer.log
"""
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            account = pwd.getpwnam("nobody")
        ini += f"user = {account.pw_name}\n"
        os.chmod(workdir, 0o711)  # mkdtemp's 0700 would keep that account out of its directory
        for name in ("", "/userlist.txt"):
            os.chown(f"{directory}{name}", account.pw_uid, account.pw_gid)
    with open(f"{directory}/pgbouncer.ini", "w") as out:
        out.write(ini)
    argv = ["pgbouncer", f"{directory}/pgbouncer.ini"]
    commands.append(shown(argv, workdir) + f"   # pool_mode = transaction, default_pool_size = {POOL_SIZE}, "
                    "max_client_conn = 200, auth_type = trust" + (", user = postgres" if os.geteuid() == 0 else ""))
    print(f"$ {commands[-1]}", flush=True)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_port(port) or proc.poll() is not None:
        stop(proc)
        with open(f"{directory}/pgbouncer.log") as output:
            sys.stderr.write(output.read()[-2000:])
        raise RuntimeError("pgbouncer did not start")
    return proc, port


def parse_pgbench(out):
    result = {}
    for line in out.splitlines():
        if line.startswith("tps = "):
            # "(without initial connection time)" (15+) or "(excluding connections establishing)"
            if "including" not in line:
                result["tps"] = float(line.split()[2])
        elif line.startswith("latency average = "):
            result["avg_ms"] = float(line.split()[3])
        elif line.startswith("number of transactions actually processed: "):
            result["transactions"] = int(line.split(": ")[1].split("/")[0])
        elif line.startswith("number of failed transactions: "):
            result["failed"] = int(line.split(": ")[1].split()[0])
    return result


def pgbench(name, args, port, workdir):
    proc = run(["pgbench", "-h", PG_HOST, "-p", str(port), "-U", PG_USER, *args, PG_DB], workdir)
    for line in proc.stdout.splitlines():
        print(f"  {line}")
    if proc.returncode != 0:
        for line in proc.stderr.splitlines()[-20:]:
            print(f"  {line}", file=sys.stderr)
    sys.stdout.flush()
    result = parse_pgbench(proc.stdout)
    if proc.returncode != 0 or "tps" not in result:
        failures.append(f"{name}: pgbench failed")
        return None
    if result.get("failed"):
        failures.append(f"{name}: {result['failed']} failed transactions")
    return result


def peer_side(workdir):
    try:
        results = {"server_version": psql("SHOW server_version").split()[0],
                   "synchronous_commit": psql("SHOW synchronous_commit"), "fsync": psql("SHOW fsync")}
    except subprocess.CalledProcessError as error:
        sys.stderr.write(error.stderr)
        failures.append(f"peer: cannot query {PG_DB} on {PG_HOST}:{PG_PORT} (scripts/bench sql creates it)")
        return {}
    init = run(["pgbench", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-i", "-s", "1", "-q", PG_DB], workdir)
    if init.returncode != 0:
        sys.stderr.write(init.stderr[-2000:])
        failures.append("pgbench -i failed")
        return results
    with open(f"{workdir}/insert.sql", "w") as out:
        out.write(PG_INSERT)
    commands.append("$TMP/insert.sql: " + " ".join(PG_INSERT.splitlines()))
    bouncer = None
    try:
        bouncer, port = start_pgbouncer(workdir)
        results["pgbouncer"] = subprocess.run(["pgbouncer", "--version"], capture_output=True,
                                              text=True).stdout.split()[1]
        results["select"] = pgbench("select-peer", ["-S", "-c", str(READERS), "-j", "2", "-T", str(SECONDS),
                                                    "-n", "-M", "simple"], port, workdir)
        results["insert"] = pgbench("insert-peer", ["-c", str(WRITERS), "-j", "2", "-T", str(SECONDS), "-n",
                                                    "-f", f"{workdir}/insert.sql"], port, workdir)
    except Exception as error:  # noqa: BLE001
        failures.append(f"peer: {error}")
    finally:
        stop(bouncer)
    return results


# --- report ------------------------------------------------------------------------

def fmt(value, digits=0):
    return "failed" if value is None else f"{value:,.{digits}f}"


def keel_cell(result):
    if result is None:
        return "failed"
    errors = result["non_2xx"] + result["socket_errors"]
    return (f"{result['rps']:,.0f} ({fmt(result.get('p50_ms'), 2)} / {fmt(result.get('p99_ms'), 2)} ms; "
            f"avg {fmt(result.get('avg_ms'), 2)}{f'; {errors:,} errors' if errors else ''})")


def peer_cell(result):
    if result is None:
        return "failed"
    return f"{result['tps']:,.0f} (avg {fmt(result.get('avg_ms'), 2)} ms)"


def ratio(ours, theirs, ours_key="rps", theirs_key="tps"):
    if not ours or not theirs or not theirs.get(theirs_key):
        return None
    return ours[ours_key] / theirs[theirs_key]


def main():
    workdir = tempfile.mkdtemp(prefix="keel-bench-sql-")
    try:
        keel = keel_side(workdir)
        peer = peer_side(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    select, named, insert = keel.get("select"), keel.get("named"), keel.get("insert")
    p_select, p_insert = peer.get("select"), peer.get("insert")
    r_select, r_named, r_insert = ratio(select, p_select), ratio(named, p_select), ratio(insert, p_insert)
    named_over_select = ratio(named, select, "rps", "rps")
    hit = None if named is None else named.get("hit_ratio")

    def verdict(value, target):
        return "n/a" if value is None else f"{value:.2f} ({'meets' if value >= target else 'below'} ≥ {target:.1f})"

    print()
    print("Commands:")
    print()
    for command in commands:
        print(f"    {command}")
    print()
    if "/debug/" in KEEL:
        print(f"**{KEEL} is a DEBUG build: its figures say nothing about keel's performance.**")
        print()
    print(f"keel {KEEL} (SQLite, sql.synchronous = full, fresh data dir, "
          f"api listener, RESP off) against PostgreSQL {peer.get('server_version', '?')} "
          f"(synchronous_commit = {peer.get('synchronous_commit', '?')}, fsync = {peer.get('fsync', '?')}) "
          f"behind PgBouncer {peer.get('pgbouncer', '?')} (pool_mode = transaction, default_pool_size = {POOL_SIZE}), "
          f"same machine, same run, one after the other; wrk `-t2 --latency`, keep-alive HTTP/1.1 with JSON "
          f"bodies; pgbench `-j 2 -n`; {SECONDS} s per run, a random aid in 1..{ACCOUNTS:,} per request.")
    print()
    print("| workload | keel req/s (p50 / p99 ms; avg) | PgBouncer + PostgreSQL TPS (latency) | keel/peer | target |")
    print("|---|---|---|---|---|")
    print(f"| (a) primary-key point select, POST /v1/sql/query, {READERS} connections; peer `pgbench -S -M simple` "
          f"| {keel_cell(select)} | {peer_cell(p_select)} | {fmt(r_select, 2)} | {verdict(r_select, 1.0)} |")
    hit_text = "" if hit is None else f", {hit:.1%} cache hits"
    print(f"| (b) the same as the cached named query GET /v1/sql/q/account?aid=N, {READERS} connections{hit_text}; "
          f"peer as (a) | {keel_cell(named)} | {peer_cell(p_select)} | {fmt(r_named, 2)} | "
          f"(b)/(a) = {verdict(named_over_select, 3.0)} |")
    print(f"| (c) single-row INSERT, POST /v1/sql/execute, {WRITERS} connections; peer `pgbench -f insert.sql` "
          f"(INSERT INTO pgbench_history) | {keel_cell(insert)} | {peer_cell(p_insert)} | {fmt(r_insert, 2)} | "
          f"{verdict(r_insert, 1.0)} |")
    summary = {
        "ok": not failures, "quick": QUICK, "seconds": SECONDS, "keel_bin": KEEL, "keel": keel, "peer": peer,
        "ratios": {"select": r_select, "named": r_named, "named_over_select": named_over_select, "insert": r_insert},
        "failures": failures,
    }
    print()
    print("RESULT " + json.dumps(summary, sort_keys=True))
    if failures:
        raise SystemExit(f"sql bench: failed: {'; '.join(failures)} (see above)")


main()
