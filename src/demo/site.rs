//! The files a demo site is made of: a configuration that uses every subsystem and the
//! migration that creates and seeds the demo tables. Written into the demo's data
//! directory, so an operator can read exactly what the demo runs (and SIGHUP it).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Rows the migration seeds.
pub(super) const USERS: u32 = 1_000;
pub(super) const POSTS: u32 = 10_000;

/// The query the analyzer is shown: `posts.author_email` is deliberately not indexed.
pub(super) const UNINDEXED_QUERY: &str = "SELECT id, title FROM posts WHERE author_email = :email";

/// Where the demo's pieces listen.
#[derive(Debug, Clone)]
pub(super) struct Addresses {
    pub(super) api: String,
    pub(super) resp: String,
    pub(super) gateway: String,
    /// The built-in upstream app, already bound (an ephemeral port).
    pub(super) app: SocketAddr,
}

/// Writes `keel.toml` and `migrations/` into `dir` and returns the config file's path.
pub(super) fn write(dir: &Path, addresses: &Addresses) -> io::Result<PathBuf> {
    let migrations = dir.join("migrations");
    std::fs::create_dir_all(&migrations)?;
    std::fs::write(migrations.join("0001_demo.sql"), MIGRATION)?;
    let config_path = dir.join("keel.toml");
    std::fs::write(&config_path, config_toml(dir, addresses))?;
    Ok(config_path)
}

fn config_toml(dir: &Path, addresses: &Addresses) -> String {
    let Addresses {
        api,
        resp,
        gateway,
        app,
    } = addresses;
    let data_dir = toml_string(&dir.display().to_string());
    let migrations = toml_string(&dir.join("migrations").display().to_string());
    format!(
        r#"# Written by `keel demo`: every subsystem, in front of the built-in demo app on {app}.
version = 1
data_dir = {data_dir}

[log]
# The dashboard shows what keel does; "info" also logs it here.
level = "error"

[listeners.api]
bind = "{api}"
[listeners.resp]
bind = "{resp}"
[listeners.gateway]
bind = "{gateway}"

[auth]
# On, as it would be on a real site: the admin token is in admin.token next to this file.
enabled = true

[cache]
l1_max_bytes = "64MiB"
[cache.namespaces.users]
loader = {{ http = "http://{app}/users/{{key}}" }}
ttl = "60s"
refresh_ahead = 0.8
negative_ttl = "5s"

[queue.queues.email]
processor = {{ webhook = {{ url = "http://{app}/hooks/email", timeout = "5s" }} }}
concurrency = 2
rate_limit = "20/s"
remove_on_complete = {{ count = 1000 }}
remove_on_fail = {{ count = 1000 }}
[queue.queues.cleanup]
processor = {{ cleanup = {{}} }}
[[queue.schedules]]
name = "cleanup-every-minute"
queue = "cleanup"
cron = "0 * * * * *"

[gateway.upstreams.demo]
servers = ["{app}"]
health = {{ path = "/healthz", interval = "2s", rise = 1, fall = 2 }}
response_timeout = "5s"

[[gateway.routes]]
name = "slow"
path_prefix = "/api/slow"
upstream = "demo"
rewrite_prefix = "/slow"
rate_limit = {{ key = "ip", rate = "5/s", burst = 5 }}

[[gateway.routes]]
name = "api"
path_prefix = "/api"
upstream = "demo"
strip_prefix = true
cache = {{ ttl = "10s", stale_while_revalidate = "30s" }}
rate_limit = {{ key = "ip", rate = "40/s", burst = 40 }}
compress = true

[sql]
migrations_dir = {migrations}
slow_query_ms = 10
maintenance_cron = ""
[sql.queries.popular_posts]
sql = "SELECT id, title, views FROM posts ORDER BY views DESC LIMIT 10"
cache_ttl = "5s"
[sql.queries.posts_by_user]
sql = "SELECT id, title FROM posts WHERE user_id = :user_id ORDER BY id DESC LIMIT 20"
"#
    )
}

/// A TOML basic string: quotes and backslashes escaped (temporary paths are plain, but a
/// `--data` directory may not be).
fn toml_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for ch in text.chars() {
        match ch {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            ch if ch.is_control() => quoted.push_str(&format!("\\u{:04X}", ch as u32)),
            ch => quoted.push(ch),
        }
    }
    quoted.push('"');
    quoted
}

/// The demo schema. Seeding is plain SQL, so the rows exist before the first request.
const MIGRATION: &str = "\
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE posts (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    author_email TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    views INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX posts_user_id ON posts(user_id);
-- posts.author_email has no index on purpose: the SQL page's analyzer proposes one.
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
INSERT INTO users (id, name, email, created_at)
SELECT i, 'User ' || i, 'user' || i || '@example.com',
       datetime('2026-01-01', '+' || i || ' hours')
FROM n;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000)
INSERT INTO posts (id, user_id, author_email, title, body, views, created_at)
SELECT i, (i % 1000) + 1, 'user' || ((i % 1000) + 1) || '@example.com',
       'Post number ' || i,
       'This is the body of post ' || i || '. ' || printf('%.*c', 200 + i % 300, 'x'),
       (i * 7919) % 5000,
       datetime('2026-01-01', '+' || i || ' minutes')
FROM n;
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_configuration_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let addresses = Addresses {
            api: "127.0.0.1:0".into(),
            resp: "127.0.0.1:0".into(),
            gateway: "127.0.0.1:0".into(),
            app: "127.0.0.1:3200".parse().unwrap(),
        };
        let path = write(dir.path(), &addresses).unwrap();
        let sources = crate::config::ConfigSources {
            explicit_file: Some(path),
            env: Vec::new(),
            sets: Vec::new(),
        };
        let config = crate::config::load(&sources).expect("the demo configuration loads");
        assert_eq!(config.gateway.routes.len(), 2);
        assert!(config.queue.queues.contains_key("email"));
    }

    #[test]
    fn the_migration_seeds_every_row() {
        let connection = rusqlite::Connection::open_in_memory().unwrap();
        connection.execute_batch(MIGRATION).unwrap();
        let count = |table: &str| -> u32 {
            connection
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                    row.get(0)
                })
                .unwrap()
        };
        assert_eq!(count("users"), USERS);
        assert_eq!(count("posts"), POSTS);
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
