"""Drives keel's RESP listener with Python's redis package, both protocol versions.

redis-py 8 sends HELLO 3 on connect and has no fallback to RESP2. Run by the Rust
integration test `resp::python_redis_8_speaks_resp3_to_keel` with the port as argument.
"""
import sys

import redis

port = int(sys.argv[1])
for protocol in (3, 2):
    r = redis.Redis(host="127.0.0.1", port=port, protocol=protocol)
    assert r.ping() is True
    assert r.set(f"py:{protocol}", "v", ex=100) is True
    assert r.get(f"py:{protocol}") == b"v"
    assert r.get("py:missing") is None
    assert 99 <= r.ttl(f"py:{protocol}") <= 100
    assert r.ttl("py:missing") == -2
    assert r.incr(f"py:n:{protocol}") == 1
    assert r.incrbyfloat(f"py:n:{protocol}", 0.5) == 1.5
    assert r.mget([f"py:{protocol}", "py:missing"]) == [b"v", None]
    assert r.exists(f"py:{protocol}", "py:missing") == 1
    assert r.delete(f"py:{protocol}") == 1
    assert r.config_get("save") == {"save": ""}
    assert set(r.scan_iter(match=f"py:n:{protocol}")) == {f"py:n:{protocol}".encode()}
    try:
        r.incr("py:missing-but-text") if r.set("py:missing-but-text", "x") else None
        raise AssertionError("INCR on text must fail")
    except redis.ResponseError as error:
        assert "not an integer" in str(error)
    binary = b"\x00\r\n\xffbin"
    r.set("py:bin", binary)
    assert r.get("py:bin") == binary
    with r.pipeline(transaction=False) as pipe:
        for index in range(500):
            pipe.set(f"py:pipe:{index}", index)
        assert all(pipe.execute())
    assert r.get("py:pipe:499") == b"499"
print("python redis ok", redis.__version__)
