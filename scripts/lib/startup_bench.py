"""Start-up figures for BENCHMARKS.md: binary size, idle RSS, exec -> /readyz 200.

Usage: startup_bench.py PATH_TO_KEEL RUNS
Each run gets a fresh data directory (the first-start path: directory created, lock
taken, migrations applied, redb files created), so the figure is the worst ordinary start.
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchkit import free_port, ready


def one_start(keel, measure_rss):
    data = tempfile.mkdtemp(prefix="keel-bench-")
    port = free_port()
    args = [keel, "serve", "--config", "/dev/null", "--data-dir", data,
            "--set", f"listeners.api.bind=127.0.0.1:{port}", "--set", "listeners.resp.bind="]
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = started + 10
    while not ready(port):
        if time.perf_counter() > deadline or proc.poll() is not None:
            raise SystemExit("keel did not become ready")
        time.sleep(0.0005)
    elapsed = time.perf_counter() - started
    rss = None
    if measure_rss:
        time.sleep(1)  # let start-up allocations settle: this is the idle figure
        with open(f"/proc/{proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(data, ignore_errors=True)
    return elapsed, rss


def main():
    keel, runs = sys.argv[1], int(sys.argv[2])
    size = os.path.getsize(keel)
    times = []
    rss = None
    for index in range(runs):
        elapsed, measured = one_start(keel, measure_rss=(index == 0))
        times.append(elapsed)
        rss = rss or measured
    print(f"binary size:        {size / 2**20:.1f} MiB ({keel})")
    print(f"idle RSS:           {rss / 2**20:.1f} MiB (1 s after ready, empty data dir)")
    print(f"exec -> /readyz 200: median {statistics.median(times) * 1000:.1f} ms, "
          f"min {min(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms over {runs} starts")


main()
