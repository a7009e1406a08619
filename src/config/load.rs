//! Where configuration values come from: built-in defaults, then the TOML file, then
//! `KEEL_*` environment variables, then `--set` flags; and every mistake in all of them,
//! reported at once with the key path and, for the file, the line.
//!
//! Serde stops at the first error. To report them all, deserialization runs in a loop:
//! each failure is recorded with its path, the offending key is removed (its default
//! applies) and deserialization runs again. Unknown keys never stop it: `serde_ignored`
//! collects them in the same pass.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::{Table, Value};

use super::schema::Config;
use super::validate;

/// The default location, used when `--config` is not given. Missing is fine there.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keel/keel.toml";

/// Upper bound on reported problems: a file that is wrong everywhere is not helped by
/// a thousand lines, and the retry loop must end.
const MAX_PROBLEMS: usize = 100;

/// What the process was started with; `load` turns it into a `Config`.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// `--config PATH`: must exist. `None` means the default path, which may be missing.
    pub explicit_file: Option<PathBuf>,
    /// `KEEL_*` variables (name, value), usually `std::env::vars()`.
    pub env: Vec<(String, String)>,
    /// `--set path=value` flags, and the shorthand flags rewritten to that form.
    pub sets: Vec<(String, String)>,
}

impl ConfigSources {
    pub fn from_process(explicit_file: Option<PathBuf>, sets: Vec<(String, String)>) -> Self {
        ConfigSources {
            explicit_file,
            env: std::env::vars()
                .filter(|(name, _)| name.starts_with("KEEL_"))
                .collect(),
            sets,
        }
    }

    /// The file that will be read, if any.
    pub fn file_path(&self) -> Option<PathBuf> {
        match &self.explicit_file {
            Some(path) => Some(path.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|path| path.exists()),
        }
    }
}

/// Where a problem's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File {
        path: PathBuf,
        line: Option<usize>,
    },
    Env(String),
    Flag(String),
    /// A problem of the whole configuration (e.g. two keys that contradict).
    Config,
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, with `[i]` for array elements: `gateway.routes[0].upstream`.
    pub path: String,
    pub message: String,
    pub origin: Origin,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}: ", path.display())?,
            Origin::File { path, line: None } => write!(f, "{}: ", path.display())?,
            Origin::Env(name) => write!(f, "environment {name}: ")?,
            Origin::Flag(flag) => write!(f, "flag --set {flag}: ")?,
            Origin::Config => {}
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with a configuration, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the configuration from all sources.
pub fn load(sources: &ConfigSources) -> Result<Config, ConfigErrors> {
    let file = match sources.file_path() {
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => Some((path, text)),
            Err(error) => {
                return Err(ConfigErrors(vec![Problem {
                    path: String::new(),
                    message: format!("cannot read configuration file: {error}"),
                    origin: Origin::File { path, line: None },
                }]));
            }
        },
        None => None,
    };
    let (file_path, text) = match &file {
        Some((path, text)) => (path.as_path(), text.as_str()),
        None => (Path::new("<defaults>"), ""),
    };
    let mut config = parse_layers(file_path, text, &sources.env, &sources.sets)?;
    apply_state_directory(&mut config);
    Ok(config)
}

/// Parses a configuration text alone (no environment, no flags), as `POST
/// /v1/config/validate` and tests do.
pub fn parse_str(name: &Path, text: &str) -> Result<Config, ConfigErrors> {
    parse_layers(name, text, &[], &[])
}

/// systemd's `StateDirectory=` hands us the directory to use; it wins over the file.
fn apply_state_directory(config: &mut Config) {
    if let Ok(dirs) = std::env::var("STATE_DIRECTORY")
        && let Some(first) = dirs.split(':').find(|dir| !dir.is_empty())
    {
        config.data_dir = PathBuf::from(first);
    }
}

fn parse_layers(
    file_path: &Path,
    text: &str,
    env: &[(String, String)],
    sets: &[(String, String)],
) -> Result<Config, ConfigErrors> {
    let spans = match DeTable::parse(text) {
        Ok(spans) => spans,
        Err(error) => {
            let line = error.span().map(|span| line_of(text, span.start));
            return Err(ConfigErrors(vec![Problem {
                path: String::new(),
                message: format!("TOML syntax error: {}", error.message().trim()),
                origin: Origin::File {
                    path: file_path.to_owned(),
                    line,
                },
            }]));
        }
    };
    let mut table: Table = text.parse().expect("text already parsed as TOML above");
    let locator = Locator {
        file_path,
        text,
        spans: spans.get_ref(),
    };

    // Overrides remember where they came from so problems can name the variable or flag.
    let mut overrides: BTreeMap<String, (Origin, String)> = BTreeMap::new();
    let mut problems = Vec::new();
    let known_sections: BTreeSet<String> = default_top_level_keys();
    for (name, value) in env {
        let Some(path) = env_path(name) else { continue };
        // Variables such as KEEL_REQUIRE_EXTERNAL belong to tools, not to the config.
        if !known_sections.contains(path[0].as_str()) {
            continue;
        }
        apply_override(
            &mut table,
            &path,
            value,
            Origin::Env(name.clone()),
            &mut overrides,
            &mut problems,
        );
    }
    for (key, value) in sets {
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        let flag = format!("{key}={value}");
        apply_override(
            &mut table,
            &path,
            value,
            Origin::Flag(flag),
            &mut overrides,
            &mut problems,
        );
    }

    let mut unknown: BTreeSet<String> = BTreeSet::new();
    let mut config = None;
    for _ in 0..MAX_PROBLEMS {
        let mut ignored = Vec::new();
        let attempt: Result<Config, _> =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
                Value::Table(table.clone()),
                &mut |path: serde_ignored::Path<'_>| ignored.push(ignored_path(&path)),
            ));
        unknown.extend(ignored);
        match attempt {
            Ok(parsed) => {
                config = Some(parsed);
                break;
            }
            Err(error) => {
                let segments = segments_of(error.path());
                let dotted = dotted(&segments);
                // An override that looked like a number or a boolean may be meant as text.
                if let Some((_, raw)) = overrides.get(&dotted) {
                    if let Some(Value::String(_)) = lookup(&table, &segments) {
                    } else if set_path(&mut table, &segments, Value::String(raw.clone())) {
                        continue;
                    }
                }
                problems.push(Problem {
                    origin: origin_of(&locator, &overrides, &segments),
                    path: dotted,
                    message: error.inner().message().trim().to_owned(),
                });
                if !remove_key(&mut table, &segments) {
                    break;
                }
            }
        }
    }

    for path in unknown {
        let segments = parse_dotted(&path);
        problems.push(Problem {
            origin: origin_of(&locator, &overrides, &segments),
            path,
            message: "unknown key".to_owned(),
        });
    }

    let config = match config {
        Some(config) => config,
        None => {
            problems.sort_by_key(sort_key);
            return Err(ConfigErrors(problems));
        }
    };
    for (path, message) in validate::check(&config) {
        let segments = parse_dotted(&path);
        problems.push(Problem {
            origin: origin_of(&locator, &overrides, &segments),
            path,
            message,
        });
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        problems.sort_by_key(sort_key);
        problems.dedup();
        Err(ConfigErrors(problems))
    }
}

fn sort_key(problem: &Problem) -> (u8, usize, String) {
    match &problem.origin {
        Origin::File { line, .. } => (0, line.unwrap_or(0), problem.path.clone()),
        Origin::Env(_) => (1, 0, problem.path.clone()),
        Origin::Flag(_) => (2, 0, problem.path.clone()),
        Origin::Config => (3, 0, problem.path.clone()),
    }
}

fn default_top_level_keys() -> BTreeSet<String> {
    match Value::try_from(Config::default()) {
        Ok(Value::Table(table)) => table.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

/// `KEEL_LISTENERS__API__BIND` → `["listeners", "api", "bind"]`.
fn env_path(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix("KEEL_")?;
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    (!path.iter().any(String::is_empty)).then_some(path)
}

/// Environment and flag values are text; read them as TOML when they parse as a TOML
/// value (`4`, `true`, `["a"]`), and as a plain string otherwise.
fn override_value(raw: &str) -> Value {
    match format!("value = {raw}").parse::<Table>() {
        Ok(mut table) => table
            .remove("value")
            .unwrap_or_else(|| Value::String(raw.to_owned())),
        Err(_) => Value::String(raw.to_owned()),
    }
}

fn apply_override(
    table: &mut Table,
    path: &[String],
    raw: &str,
    origin: Origin,
    overrides: &mut BTreeMap<String, (Origin, String)>,
    problems: &mut Vec<Problem>,
) {
    let segments: Vec<Segment> = path.iter().map(|key| Segment::Key(key.clone())).collect();
    if path.iter().any(String::is_empty) || !set_path(table, &segments, override_value(raw)) {
        problems.push(Problem {
            path: path.join("."),
            message: "cannot set this key here (a parent key is not a table)".to_owned(),
            origin,
        });
        return;
    }
    overrides.insert(path.join("."), (origin, raw.to_owned()));
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn segments_of(path: &serde_path_to_error::Path) -> Vec<Segment> {
    use serde_path_to_error::Segment as S;
    path.iter()
        .filter_map(|segment| match segment {
            S::Map { key } => Some(Segment::Key(key.clone())),
            S::Seq { index } => Some(Segment::Index(*index)),
            S::Enum { variant } => Some(Segment::Key(variant.clone())),
            S::Unknown => None,
        })
        .collect()
}

fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    fn collect(path: &serde_ignored::Path<'_>, out: &mut Vec<Segment>) {
        use serde_ignored::Path as P;
        match path {
            P::Root => {}
            P::Seq { parent, index } => {
                collect(parent, out);
                out.push(Segment::Index(*index));
            }
            P::Map { parent, key } => {
                collect(parent, out);
                out.push(Segment::Key(key.clone()));
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                collect(parent, out)
            }
        }
    }
    let mut segments = Vec::new();
    collect(path, &mut segments);
    dotted(&segments)
}

fn dotted(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

fn parse_dotted(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, mut indexes) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_owned()));
        }
        while let Some(rest) = indexes.strip_prefix('[') {
            let Some((number, after)) = rest.split_once(']') else {
                break;
            };
            if let Ok(index) = number.parse() {
                segments.push(Segment::Index(index));
            }
            indexes = after;
        }
    }
    segments
}

fn lookup<'t>(table: &'t Table, segments: &[Segment]) -> Option<&'t Value> {
    let (first, rest) = segments.split_first()?;
    let Segment::Key(key) = first else {
        return None;
    };
    let mut value = table.get(key)?;
    for segment in rest {
        value = match (segment, value) {
            (Segment::Key(key), Value::Table(table)) => table.get(key)?,
            (Segment::Index(index), Value::Array(array)) => array.get(*index)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Sets a value, creating tables on the way. False when the path runs through a value
/// that is not a table.
fn set_path(table: &mut Table, segments: &[Segment], value: Value) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut current = table;
    for segment in parents {
        let next = match segment {
            Segment::Key(key) => current
                .entry(key.clone())
                .or_insert_with(|| Value::Table(Table::new())),
            Segment::Index(_) => return false,
        };
        current = match next {
            Value::Table(table) => table,
            _ => return false,
        };
    }
    match last {
        Segment::Key(key) => {
            current.insert(key.clone(), value);
            true
        }
        Segment::Index(_) => false,
    }
}

/// Removes the deepest table key on the path, so an error inside an array removes the
/// whole array rather than shifting the indexes of later elements.
fn remove_key(table: &mut Table, segments: &[Segment]) -> bool {
    let Some(last_key) = segments
        .iter()
        .rposition(|segment| matches!(segment, Segment::Key(_)))
    else {
        return false;
    };
    let (parents, key) = (&segments[..last_key], &segments[last_key]);
    let parent = if parents.is_empty() {
        Some(table)
    } else {
        match lookup_mut(table, parents) {
            Some(Value::Table(parent)) => Some(parent),
            _ => None,
        }
    };
    match (parent, key) {
        (Some(parent), Segment::Key(key)) => parent.remove(key).is_some(),
        _ => false,
    }
}

fn lookup_mut<'t>(table: &'t mut Table, segments: &[Segment]) -> Option<&'t mut Value> {
    let (first, rest) = segments.split_first()?;
    let Segment::Key(key) = first else {
        return None;
    };
    let mut value = table.get_mut(key)?;
    for segment in rest {
        value = match (segment, value) {
            (Segment::Key(key), Value::Table(table)) => table.get_mut(key)?,
            (Segment::Index(index), Value::Array(array)) => array.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Finds lines in the original text for key paths.
struct Locator<'a> {
    file_path: &'a Path,
    text: &'a str,
    spans: &'a DeTable<'a>,
}

impl Locator<'_> {
    /// The line of the deepest part of the path that exists in the file.
    fn line(&self, segments: &[Segment]) -> Option<usize> {
        let mut current: Option<&DeValue<'_>> = None;
        let mut best = None;
        for segment in segments {
            let (offset, value) = match (segment, current) {
                (Segment::Key(key), None) => key_in(self.spans, key)?,
                (Segment::Key(key), Some(DeValue::Table(table))) => match key_in(table, key) {
                    Some(found) => found,
                    None => break,
                },
                (Segment::Index(index), Some(DeValue::Array(items))) => match items.get(*index) {
                    Some(item) => (item.span().start, item.get_ref()),
                    None => break,
                },
                _ => break,
            };
            best = Some(offset);
            current = Some(value);
        }
        best.map(|offset| line_of(self.text, offset))
    }
}

fn key_in<'t, 'i>(table: &'t DeTable<'i>, key: &str) -> Option<(usize, &'t DeValue<'i>)> {
    table
        .iter()
        .find(|(name, _)| name.get_ref().as_ref() == key)
        .map(|(name, value)| (name.span().start, value.get_ref()))
}

fn origin_of(
    locator: &Locator<'_>,
    overrides: &BTreeMap<String, (Origin, String)>,
    segments: &[Segment],
) -> Origin {
    // The longest overridden prefix of the path is where the value came from.
    for length in (1..=segments.len()).rev() {
        if let Some((origin, _)) = overrides.get(&dotted(&segments[..length])) {
            return origin.clone();
        }
    }
    Origin::File {
        path: locator.file_path.to_owned(),
        line: locator.line(segments),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&byte| byte == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        parse_str(Path::new("keel.toml"), text)
            .unwrap_err()
            .0
            .into_iter()
            .map(|problem| problem.to_string())
            .collect()
    }

    #[test]
    fn a_redis_l2_is_shown_without_its_password() {
        let config = parse_str(
            Path::new("keel.toml"),
            "[cache]\nl2 = \"redis://:hunter2@cache.internal:6379/0\"\n",
        )
        .unwrap();
        let shown = config.to_redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis://<redacted>@cache.internal:6379/0"),
            "{shown}"
        );
        let plain = parse_str(Path::new("keel.toml"), "")
            .unwrap()
            .to_redacted_toml();
        assert!(plain.contains("l2 = \"redb\""), "{plain}");
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let config = parse_str(Path::new("keel.toml"), "").unwrap();
        assert_eq!(config.listeners.api.bind.0.unwrap().port(), 3100);
    }

    #[test]
    fn every_error_is_reported_with_path_and_line() {
        let text =
            "version = 1\n[log]\nlevel = \"loud\"\n[cache]\nl1_max_bytes = \"lots\"\nbogus = 1\n";
        let found = errors(text);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("keel.toml:3: log.level:"), "{found:?}");
        assert!(
            found[1].starts_with("keel.toml:5: cache.l1_max_bytes:"),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("keel.toml:6: cache.bogus: unknown key"),
            "{found:?}"
        );
    }

    #[test]
    fn a_postgres_queue_needs_a_url_and_may_share_the_sql_one() {
        let found = errors("[queue]\nbackend = \"postgres\"\nschema = \"Keel\"\n");
        assert!(
            found
                .iter()
                .any(|e| e.contains("queue.url: queue.backend = \"postgres\" needs")),
            "{found:?}"
        );
        assert!(
            found.iter().any(|e| e.contains("queue.schema")),
            "{found:?}"
        );

        let shared = "[sql]\nurl = \"postgres://db/keel\"\n[queue]\nbackend = \"postgres\"\n";
        let config = parse_str(Path::new("keel.toml"), shared).unwrap();
        let (key, url) = config.queue_postgres_url().unwrap();
        assert_eq!((key, url.expose()), ("sql.url", "postgres://db/keel"));

        let own = format!("{shared}url = \"postgres://queue-db/jobs\"\n");
        let config = parse_str(Path::new("keel.toml"), &own).unwrap();
        let (key, url) = config.queue_postgres_url().unwrap();
        assert_eq!(
            (key, url.expose()),
            ("queue.url", "postgres://queue-db/jobs")
        );
    }

    #[test]
    fn sql_on_postgresql_takes_pool_keys_and_a_replica_only_there() {
        let config = parse_str(
            Path::new("keel.toml"),
            "[sql]\nurl = \"postgres://db/keel\"\nreplica = \"postgres://replica/keel\"\n\
             pool_size = 8\npool_timeout = \"2s\"\nread_your_writes = \"500ms\"\n",
        )
        .unwrap();
        assert_eq!(config.sql.pool_size, 8);
        assert_eq!(
            config.sql.read_your_writes.0,
            std::time::Duration::from_millis(500)
        );
        let found = errors(
            "[sql]\nreplica = \"postgres://replica/keel\"\npool_size = 0\npool_timeout = \"0s\"\n",
        );
        for key in ["sql.replica", "sql.pool_size", "sql.pool_timeout"] {
            assert!(found.iter().any(|e| e.contains(key)), "{key}: {found:?}");
        }
    }

    #[test]
    fn errors_inside_arrays_of_tables_name_the_index() {
        let text = "[[gateway.routes]]\nupstream = \"a\"\n[[gateway.routes]]\nupstream = 5\n";
        let found = errors(text);
        assert!(
            found
                .iter()
                .any(|e| e.starts_with("keel.toml:4: gateway.routes[1].upstream:")),
            "{found:?}"
        );
    }

    #[test]
    fn env_overrides_beat_the_file_and_name_the_variable() {
        let env = vec![
            (
                "KEEL_LISTENERS__API__BIND".to_owned(),
                "127.0.0.1:3999".to_owned(),
            ),
            ("KEEL_REQUIRE_EXTERNAL".to_owned(), "1".to_owned()),
            ("KEEL_SQL__READERS".to_owned(), "7".to_owned()),
            ("KEEL_AUTH__PASSWORD".to_owned(), "1234".to_owned()),
        ];
        let text = "[listeners.api]\nbind = \"127.0.0.1:1\"\n";
        let config = parse_layers(Path::new("k.toml"), text, &env, &[]).unwrap();
        assert_eq!(config.listeners.api.bind.0.unwrap().port(), 3999);
        assert_eq!(config.sql.readers, 7);
        assert_eq!(config.auth.password.unwrap().expose(), "1234");

        let env = vec![("KEEL_CACHE__L1_MAX_BYTES".to_owned(), "lots".to_owned())];
        let found = parse_layers(Path::new("k.toml"), "", &env, &[])
            .unwrap_err()
            .to_string();
        assert!(
            found.starts_with("environment KEEL_CACHE__L1_MAX_BYTES: cache.l1_max_bytes:"),
            "{found}"
        );
    }
}
