//! Configuration: the typed contract (`schema`), the units it is written in (`units`),
//! how sources are layered and errors collected (`load`), and checks of meaning
//! (`validate`). Nothing here opens sockets or files other than the config file itself.

mod load;
mod schema;
mod units;
mod validate;

pub use load::{
    ConfigErrors, ConfigSources, DEFAULT_CONFIG_PATH, Origin, Problem, load, parse_str,
};
pub use schema::*;
pub use units::{ByteSize, Rate, Span};
pub use validate::{parse_cron, parse_server, valid_queue_name};

impl Config {
    /// The effective configuration as TOML, with secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|error| format!("# cannot print configuration: {error}\n"))
    }
}

/// Leaf key paths whose values differ between two configurations (secrets compared in
/// their redacted form, which is enough to notice a changed URL host).
pub fn changed_paths(before: &Config, after: &Config) -> Vec<String> {
    fn walk(
        prefix: &str,
        before: Option<&toml::Value>,
        after: Option<&toml::Value>,
        out: &mut Vec<String>,
    ) {
        match (before, after) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, a.get(key), b.get(key), out);
                }
            }
            (a, b) if a != b => out.push(prefix.to_owned()),
            _ => {}
        }
    }
    let before = toml::Value::try_from(before).ok();
    let after = toml::Value::try_from(after).ok();
    let mut out = Vec::new();
    walk("", before.as_ref(), after.as_ref(), &mut out);
    out
}
