"""`scripts/bench cache`: keel's RESP listener against redis-server, same commands, same run.

Starts a private redis-server (no persistence) and a release keel (default config: L1
256MiB, L2 redb) on free loopback ports, runs redis-benchmark against both, and prints
markdown tables with keel/Redis ratios for BENCHMARKS.md. Never touches other servers.
"""
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchkit import free_port

KEEL = sys.argv[1]
QUICK = os.environ.get("KEEL_BENCH_QUICK") == "1"
REQUESTS = 50_000 if QUICK else 200_000


def wait_port(port, deadline=20):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def rss_bytes(pid):
    return status_kib(pid, "VmRSS") * 1024


def benchmark(port, tests, pipeline, size, requests=REQUESTS):
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-c", "50", "-n", str(requests),
         "-r", "100000", "-t", tests, "-P", str(pipeline), "-d", str(size), "--csv"],
        check=True, capture_output=True, text=True).stdout
    rows = {}
    for row in csv.DictReader(io.StringIO(out)):
        name = row["test"].split()[0]
        rows[name] = (float(row["rps"]), float(row["p99_latency_ms"]))
    return rows


def cli(port, *args):
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def load_distinct(port, count, size):
    """count distinct keys with size-byte values through redis-cli --pipe."""
    value = "x" * size
    lines = []
    for index in range(count):
        key = f"mem:{index}"
        lines.append(f"*3\r\n$3\r\nSET\r\n${len(key)}\r\n{key}\r\n${size}\r\n{value}\r\n")
    data = "".join(lines).encode()
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "--pipe"], input=data, check=True,
                   capture_output=True)


def api(api_port, path, body=None):
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}{path}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def memory_row(count, l1, page_cache, redis_rss):
    resp, api_port = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="keel-bench-mem-")
    keel = subprocess.Popen([KEEL, "serve", "--config", "/dev/null", "--data-dir", data,
                             "--set", f"listeners.api.bind=127.0.0.1:{api_port}",
                             "--set", f"listeners.resp.bind=127.0.0.1:{resp}",
                             "--set", f"cache.l1_max_bytes={l1}",
                             "--set", f"cache.l2_page_cache_bytes={page_cache}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(resp)
        load_distinct(resp, count, 100)
        cli(resp, "DBSIZE")  # a barrier: every queued write is in L2 when it answers
        stats = api(api_port, "/v1/cache/stats")
        keel_rss = rss_bytes(keel.pid)
        # The write queue and the allocator's free pages shrink once the load is over.
        time.sleep(3)
        settled = rss_bytes(keel.pid)
        peak = status_kib(keel.pid, "VmHWM") * 1024
        print(f"| l1_max_bytes = {l1}, l2 = redb, l2_page_cache_bytes = {page_cache} | {keel_rss / 2**20:.0f} MiB | "
              f"{keel_rss / redis_rss:.2f} | {settled / 2**20:.0f} MiB ({settled / redis_rss:.2f}) | "
              f"{peak / 2**20:.0f} MiB ({peak / redis_rss:.2f}) | {stats['l1']['entries']:,} | "
              f"{stats['l1']['bytes'] / 2**20:.0f} MiB | "
              f"{stats['l2']['entries']:,} | {os.path.getsize(f'{data}/cache.redb') / 2**20:.0f} MiB |")
        sys.stdout.flush()
    finally:
        keel.terminate()
        keel.wait(timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def main():
    redis_port, keel_resp, keel_api = free_port(), free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="keel-bench-cache-")
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    keel = subprocess.Popen([KEEL, "serve", "--config", "/dev/null", "--data-dir", f"{workdir}/keel",
                             "--set", f"listeners.api.bind=127.0.0.1:{keel_api}",
                             "--set", f"listeners.resp.bind=127.0.0.1:{keel_resp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(redis_port)
        wait_port(keel_resp)
        print(f"redis-benchmark -q -c 50 -n {REQUESTS} -r 100000 -t set,get,incr,mset -P P -d D --csv, "
              f"against redis-server {cli(redis_port, 'INFO', 'server').split('redis_version:')[1].split()[0]} "
              "(no persistence) and keel (L1 256MiB + L2 redb), same machine, same run")
        print()
        print("| -P | -d | test | Redis ops/s | keel ops/s | keel/Redis | Redis p99 ms | keel p99 ms | p99 keel/Redis |")
        print("|---|---|---|---|---|---|---|---|---|")
        for pipeline in (1, 16):
            for size in (3, 100, 1024):
                ours = benchmark(keel_resp, "set,get,incr,mset", pipeline, size)
                theirs = benchmark(redis_port, "set,get,incr,mset", pipeline, size)
                for test in ("SET", "GET", "INCR", "MSET"):
                    (r_ops, r_p99), (k_ops, k_p99) = theirs[test], ours[test]
                    print(f"| {pipeline} | {size} | {test} | {r_ops:,.0f} | {k_ops:,.0f} | {k_ops / r_ops:.2f} | "
                          f"{r_p99:.3f} | {k_p99:.3f} | {k_p99 / max(r_p99, 0.001):.2f} |")
                sys.stdout.flush()

        count = 200_000 if QUICK else 1_000_000
        cli(redis_port, "FLUSHALL")
        load_distinct(redis_port, count, 100)
        redis_rss = int(cli(redis_port, "INFO", "memory").split("used_memory_rss:")[1].split()[0])
        print()
        print(f"Memory after {count:,} distinct SETs of 100-byte values (redis-cli --pipe), keel in a fresh process "
              f"per configuration; Redis used_memory_rss {redis_rss / 2**20:.0f} MiB:")
        print()
        print("| keel configuration | keel RSS | keel/Redis | RSS 3 s later (/Redis) | peak RSS (/Redis) | L1 entries | "
              "L1 weighted | L2 entries | cache.redb file |")
        print("|---|---|---|---|---|---|---|---|---|")
        # The defaults, then leaner L1s and page caches: every key is still served, from
        # L2 once L1 has evicted it.
        for l1, page_cache in (("256MiB", "64MiB"), ("128MiB", "64MiB"), ("32MiB", "16MiB"), ("16MiB", "8MiB")):
            memory_row(count, l1, page_cache, redis_rss)
        cli(redis_port, "FLUSHALL")

        cli(keel_resp, "FLUSHALL")
        load_distinct(keel_resp, 100_000, 10)
        cli(keel_resp, "DBSIZE")  # barrier: time the invalidation, not the queued loads
        took = api(keel_api, "/v1/cache/invalidate", {"pattern": "mem:*"})
        print(f"Invalidate 100,000 keys by pattern `mem:*` (prefix range scan, both layers): "
              f"{took['elapsed_ms']:.0f} ms for {took['invalidated']:,} keys.")
        items = [{"key": f"tag:{i}", "value": "v", "tags": ["bulk"]} for i in range(100_000)]
        for start in range(0, len(items), 10_000):
            api(keel_api, "/v1/cache/mset", {"items": items[start:start + 10_000]})
        cli(keel_resp, "DBSIZE")
        took = api(keel_api, "/v1/cache/invalidate", {"tags": ["bulk"]})
        print(f"Invalidate 100,000 keys by tag `bulk` (tag index, both layers): "
              f"{took['elapsed_ms']:.0f} ms for {took['invalidated']:,} keys.")
    finally:
        keel.terminate()
        redis.terminate()
        keel.wait(timeout=30)
        redis.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


main()
