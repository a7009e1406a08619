"""`scripts/bench queue`: keel's durable job queue over REST against PostgreSQL, same run.

Usage: queue_bench.py PATH_TO_KEEL PATH_TO_QUEUE_LOAD

Starts a release keel (default configuration, fresh data dir, api listener on a free
loopback port, RESP off), waits for /readyz, and runs the queue_load harness
(benches/queue_load.rs) against it: enqueue with 1 and with 100 jobs per request, e2e,
pickup. After each run it scrapes /metrics for the keel_queue_commit_batch_size histogram:
the average number of operations (enqueued jobs, reserves, acks) per queue commit during
that run. Then it stops keel (SIGTERM) and runs the harness's pg-e2e, the same end-to-end
workload on the PostgreSQL at 127.0.0.1:5432 (database keel_bench, table jobs recreated),
and prints a markdown table with keel/PostgreSQL ratios for BENCHMARKS.md.
KEEL_BENCH_QUICK=1 shortens every run. Never touches other databases or servers.
"""
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchkit import free_port, ready

KEEL = sys.argv[1]
HARNESS = sys.argv[2]
QUICK = os.environ.get("KEEL_BENCH_QUICK") == "1"
SECONDS = 3 if QUICK else 10
JOBS = 20_000 if QUICK else 100_000
CLIENTS = 32
WORKERS = 8
RESERVE = 32
ENQUEUERS = 8
PICKUP_RATE = 1000
PICKUP_WORKERS = 4
PG = "host=127.0.0.1 user=postgres dbname=keel_bench"
METRIC = "keel_queue_commit_batch_size"

failures = []


def harness(name, *args):
    """Runs one harness subcommand, echoing its figure lines; returns its RESULT dict or None."""
    print(f"$ queue_load {shlex.join([name, *args])}", flush=True)
    proc = subprocess.run([HARNESS, name, *args], capture_output=True, text=True)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            print(f"  {line}")
    for line in proc.stderr.splitlines():
        print(f"  {line}", file=sys.stderr)
    sys.stdout.flush()
    if proc.returncode != 0 or result is None or result.get("ok") is False:
        failures.append(name)
    return result


def commit_batches(port):
    """(sum, count) of the commit batch size histogram, or None when keel has no such metric."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    total, count, seen = 0.0, 0.0, False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name == f"{METRIC}_sum":
            total += float(line.rsplit(None, 1)[1])
            seen = True
        elif name == f"{METRIC}_count":
            count += float(line.rsplit(None, 1)[1])
            seen = True
    return (total, count) if seen else None


def average_batch(before, after):
    if before is None or after is None or after[1] - before[1] <= 0:
        return "n/a"
    return f"{(after[0] - before[0]) / (after[1] - before[1]):.1f}"


def fmt(value, digits=0):
    return "failed" if value is None else f"{value:,.{digits}f}"


def figure(result, key, digits=0):
    return fmt(None if result is None else result.get(key), digits)


def ms(result, *keys):
    return " / ".join(figure(result, key, 2) for key in keys)


def run_keel(workdir):
    port = free_port()
    log = open(f"{workdir}/keel.log", "w")
    keel = subprocess.Popen([KEEL, "serve", "--config", "/dev/null", "--data-dir", f"{workdir}/keel",
                             "--set", f"listeners.api.bind=127.0.0.1:{port}", "--set", "listeners.resp.bind="],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while not ready(port):
        if keel.poll() is not None or time.time() > deadline:
            keel.kill()
            keel.wait()
            log.close()
            with open(f"{workdir}/keel.log") as output:
                sys.stderr.write(output.read()[-4000:])
            raise SystemExit("keel did not become ready")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    results, batches = {}, {}
    try:
        runs = [
            ("enqueue-1", "enqueue", "--clients", str(CLIENTS), "--per-request", "1", "--seconds", str(SECONDS)),
            ("enqueue-100", "enqueue", "--clients", str(CLIENTS), "--per-request", "100", "--seconds", str(SECONDS)),
            ("e2e", "e2e", "--jobs", str(JOBS), "--workers", str(WORKERS), "--reserve", str(RESERVE),
             "--enqueuers", str(ENQUEUERS), "--per-request", "100"),
            ("pickup", "pickup", "--rate", str(PICKUP_RATE), "--seconds", str(SECONDS),
             "--workers", str(PICKUP_WORKERS), "--reserve", str(RESERVE)),
        ]
        for key, name, *args in runs:
            before = commit_batches(port)
            results[key] = harness(name, "--url", url, *args)
            batches[key] = average_batch(before, commit_batches(port))
            if keel.poll() is not None:
                failures.append("keel exited")
                break
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
                sys.stderr.write("keel's log (tail):\n" + output.read()[-4000:])
    return results, batches


def main():
    workdir = tempfile.mkdtemp(prefix="keel-bench-queue-")
    try:
        results, batches = run_keel(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    pg = harness("pg-e2e", "--pg", PG, "--jobs", str(JOBS), "--workers", str(WORKERS), "--reserve", str(RESERVE),
                 "--enqueuers", str(ENQUEUERS), "--per-request", "100")

    one, hundred = results.get("enqueue-1"), results.get("enqueue-100")
    e2e, pickup = results.get("e2e"), results.get("pickup")
    keel_e2e = None if e2e is None or not e2e.get("ok") else e2e["jobs_per_s"]
    pg_e2e = None if pg is None or not pg.get("ok") else pg["jobs_per_s"]
    ratio = f"{keel_e2e / pg_e2e:.2f}" if keel_e2e and pg_e2e else "n/a"
    pg_version = pg["server_version"].split()[0] if pg else "?"
    pg_sync = pg["synchronous_commit"] if pg else "?"
    print()
    print(f"Harness `benches/queue_load.rs` against a release keel (default config, fresh data dir) and "
          f"PostgreSQL {pg_version} (synchronous_commit={pg_sync}; table `jobs`, multi-row INSERT, "
          f"`UPDATE … FOR UPDATE SKIP LOCKED` claim, `id = ANY($1)` ack), same machine, same run; "
          f"keep-alive HTTP/1.1, every enqueue answered only after fsync.")
    print()
    print("| figure | keel | PostgreSQL | keel/PostgreSQL |")
    print("|---|---|---|---|")
    print(f"| enqueue, {CLIENTS} clients × 1 job/request, {SECONDS} s: jobs/s | {figure(one, 'jobs_per_s')} | — | — |")
    print(f"| … request latency p50 / p99 ms | {ms(one, 'p50_ms', 'p99_ms')} | — | — |")
    print(f"| enqueue, {CLIENTS} clients × 100 jobs/request, {SECONDS} s: jobs/s (requests/s) | "
          f"{figure(hundred, 'jobs_per_s')} ({figure(hundred, 'requests_per_s')}) | — | — |")
    print(f"| … request latency p50 / p99 ms | {ms(hundred, 'p50_ms', 'p99_ms')} | — | — |")
    print(f"| end to end, {JOBS:,} jobs ({ENQUEUERS} enqueuers × 100/request, {WORKERS} workers × reserve "
          f"{RESERVE} + batch ack): jobs/s | {fmt(keel_e2e)} | {fmt(pg_e2e)} | {ratio} |")
    achieved = "" if pickup is None else f" (sent {pickup['achieved_rate']:,.0f}/s)"
    print(f"| pickup at {PICKUP_RATE:,} jobs/s ({PICKUP_WORKERS} workers long-polling, wait 5s): "
          f"reserve response − enqueue 201, p50 / p99 / max ms | {ms(pickup, 'p50_ms', 'p99_ms', 'max_ms')}"
          f"{achieved} | — | — |")
    print(f"| average operations per queue commit, one fsync (`{METRIC}`): enqueue ×1 / enqueue ×100 / e2e / pickup | "
          f"{' / '.join(batches.get(key, 'n/a') for key in ('enqueue-1', 'enqueue-100', 'e2e', 'pickup'))} "
          f"| — | — |")
    if failures:
        raise SystemExit(f"queue bench: failed: {', '.join(failures)} (see above)")


if __name__ == "__main__":
    main()
