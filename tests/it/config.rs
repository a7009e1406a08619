//! `keel check-config` and `keel serve` on good and bad configuration.

use crate::support::{keel_output, scratch};

/// Each case: a file, and the key path (with line) the error must name.
const BAD: &[(&str, &str, &str)] = &[
    (
        "unknown top-level key",
        "colour = \"blue\"\n",
        ":1: colour: unknown key",
    ),
    (
        "unknown nested key",
        "[listeners.api]\nbnd = \"127.0.0.1:1\"\n",
        ":2: listeners.api.bnd: unknown key",
    ),
    (
        "size that is not a size",
        "[cache]\nl1_max_bytes = \"lots\"\n",
        ":2: cache.l1_max_bytes: invalid size",
    ),
    (
        "socket address",
        "[listeners.api]\nbind = \"localhost:99999\"\n",
        ":2: listeners.api.bind: invalid socket address",
    ),
    (
        "rate period",
        "[queue.queues.email]\nrate_limit = \"100/fortnight\"\n",
        ":2: queue.queues.email.rate_limit: unknown rate period \"fortnight\"",
    ),
    (
        "negative duration",
        "[cache.namespaces.users]\nloader = { http = \"http://127.0.0.1:1/{key}\" }\nttl = \"-5s\"\n",
        ":3: cache.namespaces.users.ttl: negative duration",
    ),
    (
        "wrong type",
        "data_dir = 5\n",
        ":1: data_dir: invalid type: integer",
    ),
    (
        "enum value",
        "[log]\nformat = \"xml\"\n",
        ":2: log.format: unknown variant `xml`",
    ),
    (
        "version",
        "version = 2\n",
        ":1: version: unsupported configuration version 2",
    ),
    (
        "reference to a missing upstream",
        "[[gateway.routes]]\npath_prefix = \"/api\"\nupstream = \"app\"\n",
        ":3: gateway.routes[0].upstream: no [gateway.upstreams.app]",
    ),
    (
        "cron expression",
        "[[queue.schedules]]\nname = \"n\"\nqueue = \"q\"\ncron = \"every night\"\n",
        ":4: queue.schedules[0].cron:",
    ),
    (
        "fraction out of range",
        "[cache.namespaces.n]\nloader = { http = \"http://h/{key}\" }\nttl = \"1m\"\nrefresh_ahead = 1.5\n",
        ":4: cache.namespaces.n.refresh_ahead: 1.5 must be between 0 and 1",
    ),
    (
        "api beyond loopback with auth turned off",
        "[listeners.api]\nbind = \"0.0.0.0:3100\"\n[auth]\nenabled = false\n",
        ":2: listeners.api.bind: 0.0.0.0:3100 is reachable beyond this machine and auth.enabled = false",
    ),
    (
        "TOML syntax",
        "[log\nlevel = \"info\"\n",
        ":1: TOML syntax error",
    ),
    (
        "Redis over TLS",
        "[cache]\nl2 = \"rediss://cache.internal:6379/0\"\n",
        ":2: cache.l2: rediss:// (TLS) is not supported by this keel; use redis://",
    ),
    (
        "unusable Redis URL",
        "[ratelimit]\nshared = \"redis://cache.internal:99999/0\"\n",
        ":2: ratelimit.shared: not a usable Redis URL",
    ),
    (
        "zero L1 max age",
        "[cache]\nl1_max_age = \"0s\"\n",
        ":2: cache.l1_max_age: must be above 0",
    ),
    (
        "readers out of range",
        "[sql]\nreaders = 0\n",
        ":2: sql.readers: 0 must be between 1 and 256",
    ),
    (
        "too many runtime threads",
        "[runtime]\nworker_threads = 5000\n",
        ":2: runtime.worker_threads: must be at most 1024",
    ),
];

#[test]
fn every_kind_of_bad_configuration_exits_2_naming_the_key() {
    let dir = scratch();
    for (what, text, expected) in BAD {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let output = keel_output(&["check-config", "--config", path.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{what}: exit code; stderr: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{what}: expected {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn all_problems_of_a_file_are_reported_at_once() {
    let dir = scratch();
    let path = dir.path().join("bad.toml");
    let text = "colour = \"blue\"\n[listeners.api]\nbnd = \"x\"\n[cache]\nl1_max_bytes = \"lots\"\n\
                [queue.queues.email]\nrate_limit = \"100/fortnight\"\n";
    std::fs::write(&path, text).unwrap();
    let output = keel_output(&["check-config", "--config", path.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for needle in [
        "colour: unknown key",
        "listeners.api.bnd",
        "cache.l1_max_bytes",
        "queue.queues.email.rate_limit",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn serve_refuses_a_bad_configuration_with_exit_2() {
    let dir = scratch();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[listeners.resp]\nbind = \"0.0.0.0:6380\"\n[auth]\nenabled = false\n",
    )
    .unwrap();
    let output = keel_output(&["serve", "--config", path.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listeners.resp.bind"), "{stderr}");
    assert!(
        stderr.contains("auth.enabled"),
        "the message says what to configure: {stderr}"
    );
}

#[test]
fn a_missing_explicit_file_is_an_error_but_the_shipped_examples_are_valid() {
    let output = keel_output(&["check-config", "--config", "/nonexistent/keel.toml"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read configuration file"));

    let dir = scratch();
    for (name, text) in [
        (
            "appendix-a.toml",
            include_str!("../fixtures/appendix-a.toml"),
        ),
        ("keel.toml", include_str!("../../packaging/keel.toml")),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let output = keel_output(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn environment_beats_the_file_and_flags_beat_the_environment() {
    let dir = scratch();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, "[listeners.api]\nbind = \"127.0.0.1:1111\"\n[sql]\nreaders = 2\n[auth]\npassword = \"hunter2\"\n").unwrap();
    let output = keel_output(
        &[
            "check-config",
            "--config",
            path.to_str().unwrap(),
            "--set",
            "sql.readers=9",
        ],
        &[
            ("KEEL_LISTENERS__API__BIND", "127.0.0.1:3999"),
            ("KEEL_SQL__READERS", "5"),
            ("KEEL_REQUIRE_EXTERNAL", "1"),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("bind = \"127.0.0.1:3999\""), "{stdout}");
    assert!(stdout.contains("readers = 9"), "{stdout}");
    assert!(
        !stdout.contains("hunter2"),
        "secrets are redacted: {stdout}"
    );

    let output = keel_output(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("KEEL_LOG__LEVLE", "debug")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("environment KEEL_LOG__LEVLE: log.levle: unknown key"),
        "{stderr}"
    );
}
