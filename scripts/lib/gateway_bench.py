"""`scripts/bench gateway`: keel's gateway against NGINX in front of the same upstream, same run.

Usage: gateway_bench.py PATH_TO_KEEL

The upstream is a second nginx of its own (scripts/lib/gateway/upstream.nginx.conf, one
worker, access log off): GET /data.json answers 1 KiB of JSON with no Cache-Control, and
/nginx_status counts the requests that reached it. Both proxies get the same three routes
(scripts/lib/gateway/keel.toml and proxy.nginx.conf) and, one after the other, the same wrk
runs (`wrk -t1 -c50 -d10s --latency`, no script):
  (a) a cached hit, GET /cached/data.json (keel: cache = { ttl = "30s" }; NGINX:
      proxy_cache, proxy_cache_valid 200 30s), warmed first and checked to be a hit,
  (b) pass-through, GET /pass/data.json, keep-alive to the upstream on both sides,
  (c) pass-through behind a rate limit that never rejects, GET /limited/data.json,
      checked for no 429/503,
  (d) (a) over TLS on a self-signed certificate (wrk keeps its connections: steady state),
in the order (a), (d), (b), (c), so that both cached runs fit in one 30 s TTL.
keel runs once (fresh data dir, gateway listener and api listener on free loopback ports,
RESP off); NGINX runs with worker_processes 1, then with worker_processes auto. Where this
keel has no response cache (no `X-Cache: HIT` on the second request) or no gateway TLS
listener, that row reads "not available in this keel" and the run goes on. Prints the
commands, markdown tables with keel/NGINX ratios for BENCHMARKS.md and a `RESULT {json}`
line. KEEL_BENCH_QUICK=1 makes every run 3 s. KEEL_BENCH_RATELIMIT_MEMORY=1 also runs
`cargo test --lib ratelimit::tests::memory_per_key -- --ignored --nocapture` (a debug build
of the tests) and prints its figure: the rate limiter's memory per client key after 1,000,000
distinct keys. Every process it starts is a child, stopped before it exits.
"""
import grp
import http.client
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchkit import free_port, ready, wait_port, stop, duration_ms, parse_wrk

KEEL = sys.argv[1]
QUICK = os.environ.get("KEEL_BENCH_QUICK") == "1"
MEMORY = os.environ.get("KEEL_BENCH_RATELIMIT_MEMORY") == "1"
SECONDS = 3 if QUICK else 10
CONNECTIONS = 50
HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "gateway")
REPO = os.path.dirname(os.path.dirname(HERE))
MEMORY_COMMAND = ["cargo", "test", "--lib", "ratelimit::tests::memory_per_key", "--", "--ignored", "--nocapture"]
NOT_AVAILABLE = "not available in this keel"

WORKLOADS = [  # key, path, TLS, label
    ("cached", "/cached/data.json", False, "(a) cached hit, 1 KiB JSON"),
    ("pass", "/pass/data.json", False, "(b) pass-through to the upstream"),
    ("limited", "/limited/data.json", False, "(c) pass-through, rate limit that never rejects"),
    ("cached_tls", "/cached/data.json", True, "(d) cached hit over TLS"),
]
# Both cached runs first and back to back: they share one cache entry on each side (NGINX's
# default proxy_cache_key is the upstream URL, without the client's scheme), and a 30 s TTL
# outlasts warm-up + run + warm-up + run, so neither run sees the entry expire.
RUN_ORDER = [WORKLOADS[0], WORKLOADS[3], WORKLOADS[1], WORKLOADS[2]]


def body():
    """1,024 bytes of JSON with nothing nginx's `return '…'` would interpret ($, ', \\)."""
    items = [{"id": n, "name": f"item-{n:04d}", "price": n * 7 % 1000 / 10, "tags": ["a", "b"]}
             for n in range(12)]
    data = {"id": 42, "kind": "catalogue", "items": items, "pad": ""}
    text = json.dumps(data, separators=(",", ":"))
    if len(text) > 1024:
        raise SystemExit("gateway bench: the JSON body outgrew 1 KiB")
    data["pad"] = "x" * (1024 - len(text))
    text = json.dumps(data, separators=(",", ":"))
    assert len(text) == 1024 and not set(text) & set("$'\\")
    return text


BODY = body()

failures = []
commands = []


def shown(argv, workdir):
    """The command as printed: the temporary directory as $TMP, the templates relative."""
    text = shlex.join(argv).replace(workdir, "$TMP")
    return text.replace(TEMPLATES, "scripts/lib/gateway")


def run(argv, workdir, **kwargs):
    commands.append(shown(argv, workdir))
    print(f"$ {commands[-1]}", flush=True)
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def fill(template, **values):
    with open(os.path.join(TEMPLATES, template)) as source:
        text = source.read()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    left = re.findall(r"@[A-Z_0-9]+@", text)
    if left:
        raise SystemExit(f"gateway bench: {template}: {', '.join(left)} left unfilled")
    return text


def log_tail(path, lines=15):
    try:
        with open(path) as output:
            return "\n".join(output.read().splitlines()[-lines:])
    except OSError:
        return ""


# --- HTTP checks -------------------------------------------------------------------

def get(port, path, tls=False):
    """(status, headers with lower-case names, body) of one GET on a fresh connection."""
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        data = response.read().decode(errors="replace")
        headers = {name.lower(): value for name, value in response.getheaders()}
        if tls:
            sock = connection.sock
            headers[":tls"] = f"{sock.version()} {sock.cipher()[0]}"
        return response.status, headers, data
    finally:
        connection.close()


def check_body(name, status, headers, data):
    if status != 200 or data != BODY or not headers.get("content-type", "").startswith("application/json"):
        failures.append(f"{name}: answered {status} {headers.get('content-type')!r} with "
                        f"{len(data)} bytes, not 200 application/json with the upstream's 1 KiB")
        return False
    return True


def warm(name, port, path, tls, cache_header):
    """Two GETs; the second must be a cache hit. Returns (None when it is, else the reason;
    the TLS version and cipher the second one negotiated, or None)."""
    status, headers, data = get(port, path, tls)
    if not check_body(f"{name} (first request)", status, headers, data):
        return "the first request failed", None
    status, headers, data = get(port, path, tls)
    if not check_body(f"{name} (second request)", status, headers, data):
        return "the second request failed", None
    state = headers.get(cache_header)
    tls_text = f", {headers[':tls']}" if tls else ""
    print(f"  warm-up {name}: second GET {path}: {cache_header}: {state}{tls_text}", flush=True)
    if (state or "").upper() != "HIT":
        return f"the second GET {path} answered {cache_header}: {state}", headers.get(":tls")
    return None, headers.get(":tls")


def upstream_requests(port):
    """Requests the upstream has handled (nginx stub_status), this one included."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/nginx_status", timeout=10) as response:
        text = response.read().decode()
    return int(text.splitlines()[2].split()[2])


# --- wrk ---------------------------------------------------------------------------

def wrk(name, url, workdir, upstream_port):
    before = upstream_requests(upstream_port)
    proc = run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency", url], workdir)
    forwarded = upstream_requests(upstream_port) - before - 1
    for line in proc.stdout.splitlines():
        print(f"  {line}")
    for line in proc.stderr.splitlines():
        print(f"  {line}", file=sys.stderr)
    result = parse_wrk(proc.stdout)
    if proc.returncode != 0 or not result.get("rps"):
        failures.append(f"{name}: wrk failed")
        return None
    result["upstream_requests"] = forwarded
    print(f"  the upstream saw {forwarded:,} requests during the run", flush=True)
    if "/cached/" in url and forwarded > result.get("requests", 0) / 100:
        failures.append(f"{name}: {forwarded:,} of {result.get('requests', 0):,} requests reached the upstream, "
                        "so this is no cached-hit figure")
    if result["non_2xx"] or result["socket_errors"]:
        failures.append(f"{name}: {result['non_2xx']} non-2xx responses, {result['socket_errors']} socket errors")
    return result


# --- the upstream ------------------------------------------------------------------

def worker_user():
    """`user nobody GROUP;` when running as root (nginx's workers would run as nobody
    anyway; naming the group keeps it from looking for a `nobody` group), else nothing."""
    if os.geteuid() != 0:
        return ""
    account = pwd.getpwnam("nobody")
    return f"user {account.pw_name} {grp.getgrgid(account.pw_gid).gr_name};"


def start_nginx(name, workdir, template, **values):
    """nginx as a child: `-g 'daemon off;'`, prefix, config, pid and error log in TMP/NAME."""
    directory = f"{workdir}/{name}"
    os.mkdir(directory)
    os.chmod(directory, 0o755)
    config = fill(template, DIR=directory, USER=worker_user(), **values)
    with open(f"{directory}/nginx.conf", "w") as out:
        out.write(config)
    argv = ["nginx", "-p", directory, "-c", f"{directory}/nginx.conf", "-e", f"{directory}/error.log",
            "-g", "daemon off;"]
    commands.append(shown(argv, workdir) + f"   # from scripts/lib/gateway/{template}")
    print(f"$ {commands[-1]}", flush=True)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, directory


def nginx_started(proc, directory, port):
    if wait_port(port, proc=proc):
        return True
    stop(proc)
    sys.stderr.write(f"{proc.stderr.read() if proc.stderr else ''}{log_tail(f'{directory}/error.log')}\n")
    return False


def nginx_version():
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    match = re.search(r"nginx/([\d.]+)", out)
    return match[1] if match else "?"


# --- keel --------------------------------------------------------------------------

def metric_sum(port, name):
    """The sum of every sample of one counter in keel's /metrics, 0 when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] == name:
            total += float(line.rsplit(None, 1)[1])
    return total


def start_keel(workdir, upstream_port, tls, threads):
    """keel with keel.toml; returns (process, gateway port, TLS port or None, api port, log path)
    or raises RuntimeError when it does not become ready."""
    port, tls_port, api_port = free_port(), free_port(), free_port()
    tls_text = ""
    if tls:
        tls_text = (f'tls_bind = "127.0.0.1:{tls_port}"\n'
                    f'certificates = [{{ cert = "{workdir}/cert.pem", key = "{workdir}/key.pem" }}]')
    name = f"keel-{threads}" + ("-tls" if tls else "")
    config = f"{workdir}/{name}.toml"
    with open(config, "w") as out:
        out.write(fill("keel.toml", PORT=port, UPSTREAM_PORT=upstream_port, TLS=tls_text))
    log_path = f"{workdir}/{name}.log"
    log = open(log_path, "w")
    argv = [KEEL, "serve", "--config", config, "--data-dir", f"{workdir}/{name}-data",
            "--set", f"listeners.api.bind=127.0.0.1:{api_port}", "--set", "listeners.resp.bind="]
    if threads != "auto":
        argv += ["--set", f"runtime.worker_threads={threads}"]
    commands.append(shown(argv, workdir) + "   # from scripts/lib/gateway/keel.toml"
                    + (", with tls_bind and certificates" if tls else ""))
    print(f"$ {commands[-1]}", flush=True)
    keel = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.time() + 30
    while not ready(api_port):
        if keel.poll() is not None or time.time() > deadline:
            stop(keel)
            raise RuntimeError(f"keel did not become ready; its log:\n{log_tail(log_path)}")
        time.sleep(0.02)
    if not wait_port(port, deadline=5, proc=keel):
        stop(keel)
        raise RuntimeError(f"keel's gateway listener did not come up; its log:\n{log_tail(log_path)}")
    return keel, port, tls_port if tls else None, api_port, log_path


def keel_side(workdir, upstream_port, threads):
    results = {}
    try:
        keel, port, tls_port, api_port, log_path = start_keel(workdir, upstream_port, True, threads)
    except RuntimeError as error:
        print(f"  keel with a TLS listener: {error}", file=sys.stderr)
        print("  trying again without tls_bind", flush=True)
        try:
            keel, port, tls_port, api_port, log_path = start_keel(workdir, upstream_port, False, threads)
        except RuntimeError as error:
            failures.append(f"keel: {error}")
            return results
        results["cached_tls"] = {"available": False, "reason": "keel refused the TLS listener configuration"}
    try:
        if tls_port is not None and not wait_port(tls_port, deadline=5, proc=keel):
            results["cached_tls"] = {"available": False, "reason": "the TLS listener (tls_bind) did not come up"}
            tls_port = None
        for key, path, tls, label in RUN_ORDER:
            if key in results:
                print(f"  keel {label}: {NOT_AVAILABLE}: {results[key]['reason']}", flush=True)
                continue
            negotiated = None
            if path.startswith("/cached/"):
                reason, negotiated = warm(f"keel {key}", tls_port if tls else port, path, tls, "x-cache")
                if reason is not None:
                    print(f"  keel {label}: {NOT_AVAILABLE}: {reason}", flush=True)
                    results[key] = {"available": False, "reason": reason}
                    continue
            elif not check_body(f"keel {key}", *get(port, path)):
                continue
            rejected = metric_sum(api_port, "keel_ratelimit_rejected_total")
            scheme, target_port = ("https", tls_port) if tls else ("http", port)
            results[key] = wrk(f"keel {key}", f"{scheme}://127.0.0.1:{target_port}{path}", workdir, upstream_port)
            if results[key] is not None:
                results[key]["tls"] = negotiated
                results[key]["rate_limited"] = int(metric_sum(api_port, "keel_ratelimit_rejected_total") - rejected)
                if results[key]["rate_limited"]:
                    failures.append(f"keel {key}: {results[key]['rate_limited']} requests rejected by the rate limiter")
            if keel.poll() is not None:
                failures.append("keel exited")
                break
    except Exception as error:  # noqa: BLE001 — report, stop keel, go on with NGINX
        failures.append(f"keel: {error!r}")
    finally:
        stop(keel)
        if keel.returncode not in (0, -15):
            failures.append(f"keel exited with {keel.returncode}")
        if failures:
            sys.stderr.write(f"keel's log (tail):\n{log_tail(log_path)}\n")
    return results


# --- NGINX -------------------------------------------------------------------------

def nginx_side(workdir, upstream_port, workers, version):
    name = f"nginx-{workers}"
    port, tls_port = free_port(), free_port()
    # `http2 off` exists from 1.25.1 on; before, a listener without `http2` speaks HTTP/1.1 only.
    newer = re.fullmatch(r"[\d.]+", version) and tuple(map(int, version.split("."))) >= (1, 25, 1)
    http2_off = "http2 off;" if newer else ""
    proc, directory = start_nginx(name, workdir, "proxy.nginx.conf", WORKERS=workers, PORT=port, TLS_PORT=tls_port,
                                  UPSTREAM_PORT=upstream_port, HTTP2_OFF=http2_off,
                                  CERT=f"{workdir}/cert.pem", KEY=f"{workdir}/key.pem")
    results = {}
    try:
        if not nginx_started(proc, directory, port) or not wait_port(tls_port, proc=proc):
            failures.append(f"{name}: nginx did not start")
            return results
        for key, path, tls, label in RUN_ORDER:
            target_port = tls_port if tls else port
            negotiated = None
            if path.startswith("/cached/"):
                reason, negotiated = warm(f"{name} {key}", target_port, path, tls, "x-cache-status")
                if reason is not None:
                    failures.append(f"{name} {key}: {reason}")
                    results[key] = None
                    continue
            elif not check_body(f"{name} {key}", *get(port, path)):
                continue
            errors_before = log_tail(f"{directory}/error.log", 10**9).count("limiting requests")
            scheme = "https" if tls else "http"
            results[key] = wrk(f"{name} {key}", f"{scheme}://127.0.0.1:{target_port}{path}", workdir, upstream_port)
            if results[key] is not None:
                results[key]["tls"] = negotiated
                limited = log_tail(f"{directory}/error.log", 10**9).count("limiting requests") - errors_before
                results[key]["rate_limited"] = limited
                if limited:
                    failures.append(f"{name} {key}: {limited} requests rejected by limit_req")
            if proc.poll() is not None:
                failures.append(f"{name}: nginx exited")
                break
    except Exception as error:  # noqa: BLE001
        failures.append(f"{name}: {error!r}")
    finally:
        stop(proc)
    return results


# --- the rate limiter's memory ---------------------------------------------------

def ratelimit_memory():
    commands.append(shlex.join(MEMORY_COMMAND))
    print(f"$ {commands[-1]}   # a debug build of the tests", flush=True)
    proc = subprocess.run(MEMORY_COMMAND, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if "bytes per key" in line]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:] + proc.stdout[-2000:])
        failures.append("ratelimit memory_per_key failed")
        return None
    print(f"  {lines[-1]}", flush=True)
    return lines[-1]


# --- report ------------------------------------------------------------------------

def fmt(value, digits=0):
    return "failed" if value is None else f"{value:,.{digits}f}"


def available(result):
    return not (isinstance(result, dict) and result.get("available") is False)


def cells(result):
    """req/s and p50 / p99 ms cells of one run."""
    if not available(result):
        return NOT_AVAILABLE, "—"
    if result is None:
        return "failed", "failed"
    errors = result["non_2xx"] + result["socket_errors"]
    return (f"{result['rps']:,.0f}{f' ({errors:,} errors)' if errors else ''}",
            f"{fmt(result.get('p50_ms'), 2)} / {fmt(result.get('p99_ms'), 2)}")


def ratio(ours, theirs, key):
    if not available(ours) or not ours or not theirs or not ours.get(key) or not theirs.get(key):
        return None
    return ours[key] / theirs[key]


def stale(binary):
    """True when a file under src/ or the Cargo manifests is newer than the binary."""
    try:
        built = os.path.getmtime(binary)
    except OSError:
        return False
    newest = 0.0
    for root, _, files in os.walk(os.path.join(REPO, "src")):
        for name in files:
            newest = max(newest, os.path.getmtime(os.path.join(root, name)))
    for name in ("Cargo.toml", "Cargo.lock"):
        path = os.path.join(REPO, name)
        if os.path.exists(path):
            newest = max(newest, os.path.getmtime(path))
    return newest > built


def table(keel, nginx, workers):
    threads = "0 (auto)" if workers == "auto" else workers
    print(f"| workload, {CONNECTIONS} connections | keel (worker_threads {threads}) req/s | keel p50 / p99 ms | "
          f"NGINX (worker_processes {workers}) req/s | NGINX p50 / p99 ms | keel/NGINX req/s | p99 keel/NGINX |")
    print("|---|---|---|---|---|---|---|")
    ratios = {}
    for key, path, _, label in WORKLOADS:
        ours, theirs = keel.get(key), nginx.get(key)
        throughput, p99 = ratio(ours, theirs, "rps"), ratio(ours, theirs, "p99_ms")
        ratios[key] = {"rps": throughput, "p99": p99}
        keel_rps, keel_ms = cells(ours)
        nginx_rps, nginx_ms = cells(theirs)
        na = "n/a" if not available(ours) else None
        print(f"| {label}, GET {path} | {keel_rps} | {keel_ms} | {nginx_rps} | {nginx_ms} | "
              f"{na or fmt(throughput, 2)} | {na or fmt(p99, 2)} |")
    return ratios


def main():
    version = nginx_version()
    workdir = tempfile.mkdtemp(prefix="keel-bench-gateway-")
    if os.geteuid() == 0:
        os.chmod(workdir, 0o711)  # mkdtemp's 0700 would keep nginx's workers (nobody) out
    keel, nginx = {}, {}
    upstream = None
    baseline = None
    memory = None
    try:
        openssl = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                       "-days", "2", "-keyout", f"{workdir}/key.pem", "-out", f"{workdir}/cert.pem"], workdir)
        if openssl.returncode != 0:
            raise SystemExit(f"gateway bench: openssl failed:\n{openssl.stderr}")
        os.chmod(f"{workdir}/key.pem", 0o644)  # read by nginx's master (root) and keel; a throwaway key

        upstream_port = free_port()
        upstream, directory = start_nginx("upstream", workdir, "upstream.nginx.conf", PORT=upstream_port,
                                          BODY=BODY)
        if not nginx_started(upstream, directory, upstream_port):
            raise SystemExit("gateway bench: the upstream nginx did not start")
        check_body("upstream", *get(upstream_port, "/data.json"))
        print("  the upstream alone, for scale:", flush=True)
        baseline = wrk("upstream", f"http://127.0.0.1:{upstream_port}/data.json", workdir, upstream_port)

        # Each keel beside the NGINX with as many workers: runtime.worker_threads is
        # keel's worker_processes.
        for workers in ("1", "auto"):
            print(f"keel, runtime.worker_threads = {'0 (auto)' if workers == 'auto' else workers}:", flush=True)
            keel[workers] = keel_side(workdir, upstream_port, workers)
            print(f"NGINX {version}, worker_processes {workers}:", flush=True)
            nginx[workers] = nginx_side(workdir, upstream_port, workers, version)
        stop(upstream)
        upstream = None
        if MEMORY:
            memory = ratelimit_memory()
    finally:
        stop(upstream)
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("Commands:")
    print()
    for command in commands:
        print(f"    {command}")
    print()
    debug = "/debug/" in KEEL
    if debug:
        print(f"**{KEEL} is a DEBUG build: its figures say nothing about keel's performance.**")
        print()
    is_stale = stale(KEEL)
    if is_stale:
        print(f"**{KEEL} is older than files under src/ or the Cargo manifests: it may not be the code "
              f"in this tree (`cargo build --release`, or KEEL_BIN=PATH).**")
        print()
    cores = os.cpu_count()
    print(f"keel {KEEL} (fresh data dir, RESP off) with `runtime.worker_threads = 1`, then 0 (a thread per core: "
          f"{cores} cores), each against NGINX {version} from the distribution with as many workers "
          f"(worker_processes 1, then auto = {cores}), both in front "
          f"of the same upstream: a second nginx (one worker, `return 200` of 1 KiB JSON, access log off); "
          f"same machine ({cores} cores shared by wrk, the proxy and the upstream), same run, one after the "
          f"other. `wrk -t1 -c{CONNECTIONS} -d{SECONDS}s --latency`, keep-alive HTTP/1.1 both to the proxy "
          f"and from the proxy to the upstream; TLS: a self-signed RSA 2048 certificate, the connections "
          f"kept for the whole run (steady state, no handshakes). NGINX: access log off, "
          f"keepalive_requests 1000000, `proxy_cache_valid 200 30s` / `limit_req … rate=1000000r/s "
          f"burst=1000000 nodelay`; keel: `cache = {{ ttl = \"30s\" }}` / "
          f"`rate_limit = {{ key = \"ip\", rate = \"1000000/s\", burst = 1000000 }}`.")
    if baseline:
        print(f"The upstream alone under the same wrk: {baseline['rps']:,.0f} req/s "
              f"(p50 / p99 {fmt(baseline.get('p50_ms'), 2)} / {fmt(baseline.get('p99_ms'), 2)} ms).")
    print()
    ratios = {}
    for workers in ("1", "auto"):
        ratios[workers] = table(keel.get(workers, {}), nginx.get(workers, {}), workers)
        print()
    notes = []
    for key, _, _, label in WORKLOADS:
        ours = keel.get("1", {}).get(key)
        if not available(ours):
            notes.append(f"{label}: {NOT_AVAILABLE} ({ours['reason']})")
    for note in notes:
        print(f"- {note}")
    limited = [side.get(w, {}).get("limited") for side in (keel, nginx) for w in ("1", "auto")]
    if all(r is not None for r in limited) and not any(r["non_2xx"] or r["rate_limited"] for r in limited):
        print("- (c): no request was refused (no 429 from keel, no 503 from NGINX's limit_req).")
    sides = [(f"keel worker_threads {w}", keel.get(w, {})) for w in ("1", "auto")]
    sides += [(f"NGINX worker_processes {w}", nginx.get(w, {})) for w in ("1", "auto")]
    for name, results in sides:
        for key in ("cached", "cached_tls"):
            result = results.get(key)
            if available(result) and result and result.get("requests"):
                tls = f" ({result['tls']})" if result.get("tls") else ""
                print(f"- {name} {key}{tls}: {result['upstream_requests']:,} of {result['requests']:,} requests "
                      f"reached the upstream during the run.")
    if memory:
        print(f"- keel's rate limiter, 1,000,000 distinct keys (`{shlex.join(MEMORY_COMMAND)}`, debug build): "
              f"{memory}")
    summary = {
        "ok": not failures, "quick": QUICK, "seconds": SECONDS, "connections": CONNECTIONS, "keel_bin": KEEL,
        "debug_build": debug, "stale_binary": is_stale, "nginx_version": version, "cores": cores,
        "upstream": baseline, "keel": keel, "nginx": nginx, "ratios": ratios,
        "ratelimit_memory": memory, "failures": failures,
    }
    print()
    print("RESULT " + json.dumps(summary, sort_keys=True))
    if failures:
        raise SystemExit(f"gateway bench: failed: {'; '.join(failures)} (see above)")


main()
