"""Helpers the whole-process benchmarks share: ports, readiness, child processes, wrk."""

import re
import socket
import subprocess
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def wait_port(port, deadline=20, proc=None):
    end = time.time() + deadline
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def duration_ms(text):
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        return None
    return float(match[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[match[2]]


def parse_wrk(out):
    result = {"non_2xx": 0, "socket_errors": 0}
    section = None
    for line in out.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "Latency" and len(words) >= 2 and words[1] != "Distribution":
            result["avg_ms"] = duration_ms(words[1])
        elif line.strip() == "Latency Distribution":
            section = "latency"
        elif section == "latency" and words[0] in ("50%", "99%") and len(words) == 2:
            result[f"p{words[0][:-1]}_ms"] = duration_ms(words[1])
        elif words[0] == "Requests/sec:":
            result["rps"] = float(words[1])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            result["non_2xx"] = int(words[-1])
        elif words[0] == "Socket" and words[1] == "errors:":
            result["socket_errors"] = sum(int(n.rstrip(",")) for n in words[3::2])
        elif len(words) >= 3 and words[1] == "requests" and words[2] == "in":
            result["requests"] = int(words[0])
    return result
