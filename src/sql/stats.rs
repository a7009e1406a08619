//! Statement statistics like pg_stat_statements (which `/v1/sql/stats` reports instead
//! when PostgreSQL has it), and the slow-query log.
//!
//! Statements are grouped by their normalized text: literals and parameters become `?`,
//! comments go, whitespace collapses and keywords keep their case. The table holds at
//! most `max_statements` entries; a new statement evicts the least-called one.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Recent durations kept per statement for its p95.
const SAMPLES: usize = 128;
/// Slow queries kept for `GET /v1/sql/slow`.
const SLOW_LOG: usize = 100;

const NO_SPACE_BEFORE: &[char] = &['(', ')', ',', '=', '<', '>', '!', '.', ';'];
const NO_SPACE_AFTER: &[char] = &['(', ',', '=', '<', '>', '!', '.'];

/// Normalizes SQL text: `SELECT * FROM t WHERE id = 42 AND name = 'x'` and
/// `select * from t where id = ?1 and name = :n` differ only in keyword case.
pub fn normalize(sql: &str) -> String {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut pending_space = false;
    let push = |out: &mut String, text: &str, pending_space: &mut bool| {
        if *pending_space && !out.is_empty() && !out.ends_with(NO_SPACE_AFTER) {
            out.push(' ');
        }
        *pending_space = false;
        out.push_str(text);
    };
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                pending_space = true;
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                pending_space = true;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i = (i + 2).min(bytes.len());
                pending_space = true;
            }
            b'\'' => {
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
                push(&mut out, "?", &mut pending_space);
            }
            b'"' | b'`' | b'[' => {
                let close = if c == b'[' { b']' } else { c };
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != close {
                    i += 1;
                }
                i = (i + 1).min(bytes.len());
                push(&mut out, &sql[start..i], &mut pending_space);
            }
            b'?' | b':' | b'@' | b'$' => {
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                push(&mut out, "?", &mut pending_space);
            }
            b'0'..=b'9' => {
                let previous = out.as_bytes().last().copied();
                let in_word = !pending_space
                    && previous.is_some_and(|p| p.is_ascii_alphanumeric() || p == b'_');
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                    i += 1;
                }
                if in_word {
                    push(&mut out, &sql[start..i], &mut pending_space);
                } else {
                    push(&mut out, "?", &mut pending_space);
                }
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] >= 0x80)
                {
                    i += 1;
                }
                push(&mut out, &sql[start..i], &mut pending_space);
            }
            _ => {
                // Punctuation: spacing around it varies by author, so none is kept.
                let start = i;
                i += 1;
                while i < bytes.len() && !bytes[i].is_ascii() {
                    i += 1;
                }
                let text = &sql[start..i];
                if text.starts_with(NO_SPACE_BEFORE) {
                    trim_trailing_space(&mut out);
                    pending_space = false;
                }
                push(&mut out, text, &mut pending_space);
            }
        }
    }
    // `IN (?, ?, ?)` lists of any length are one statement.
    collapse_lists(out.trim_end_matches(';').to_owned())
}

fn trim_trailing_space(out: &mut String) {
    while out.ends_with(' ') {
        out.pop();
    }
}

fn collapse_lists(mut text: String) -> String {
    while let Some(at) = text.find("?,?") {
        text.replace_range(at..at + 3, "?");
    }
    text
}

/// One statement's figures. `errors`, `p95_ms` and `last_seen` are keel's own: null
/// when the source (pg_stat_statements) does not keep them.
#[derive(Debug, Clone, Serialize)]
pub struct StatementStats {
    pub statement: String,
    pub calls: u64,
    pub rows: u64,
    pub errors: Option<u64>,
    pub total_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub p95_ms: Option<f64>,
    /// Unix milliseconds.
    pub last_seen: Option<u64>,
}

/// `GET /v1/sql/stats`: the top statements, how many are tracked, and whose figures
/// they are (`keel`: this node's own; `pg_stat_statements`: the database server's).
#[derive(Debug, Clone, Serialize)]
pub struct StatsReport {
    pub source: &'static str,
    pub statements: Vec<StatementStats>,
    pub tracked: usize,
}

struct Entry {
    calls: u64,
    rows: u64,
    errors: u64,
    total: Duration,
    min: Duration,
    max: Duration,
    samples: VecDeque<Duration>,
    last_seen: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlowQuery {
    pub statement: String,
    pub ms: f64,
    pub rows: u64,
    pub at: u64,
}

pub(super) struct Stats {
    max_statements: usize,
    slow_threshold: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    entries: HashMap<String, Entry>,
    slow: VecDeque<SlowQuery>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Total,
    Mean,
    Calls,
}

impl Stats {
    pub(super) fn new(max_statements: usize, slow_threshold: Duration) -> Stats {
        Stats {
            max_statements: max_statements.max(1),
            slow_threshold,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                slow: VecDeque::new(),
            }),
        }
    }

    /// Records one execution; returns true when it was slow (the caller logs it).
    pub(super) fn record(
        &self,
        sql: &str,
        elapsed: Duration,
        rows: u64,
        failed: bool,
        now: u64,
    ) -> bool {
        let statement = normalize(sql);
        let slow = elapsed >= self.slow_threshold;
        let mut inner = self.inner.lock().expect("stats lock");
        if !inner.entries.contains_key(&statement) && inner.entries.len() >= self.max_statements {
            let least_used = inner
                .entries
                .iter()
                .min_by_key(|(_, entry)| (entry.calls, entry.last_seen))
                .map(|(key, _)| key.clone());
            if let Some(key) = least_used {
                inner.entries.remove(&key);
            }
        }
        let entry = inner.entries.entry(statement.clone()).or_insert(Entry {
            calls: 0,
            rows: 0,
            errors: 0,
            total: Duration::ZERO,
            min: Duration::MAX,
            max: Duration::ZERO,
            samples: VecDeque::with_capacity(SAMPLES),
            last_seen: now,
        });
        entry.calls += 1;
        entry.rows += rows;
        entry.errors += u64::from(failed);
        entry.total += elapsed;
        entry.min = entry.min.min(elapsed);
        entry.max = entry.max.max(elapsed);
        entry.last_seen = now;
        if entry.samples.len() == SAMPLES {
            entry.samples.pop_front();
        }
        entry.samples.push_back(elapsed);
        if slow {
            if inner.slow.len() == SLOW_LOG {
                inner.slow.pop_front();
            }
            inner.slow.push_back(SlowQuery {
                statement,
                ms: millis(elapsed),
                rows,
                at: now,
            });
        }
        slow
    }

    pub(super) fn top(&self, sort: SortBy, limit: usize) -> Vec<StatementStats> {
        let inner = self.inner.lock().expect("stats lock");
        let mut all: Vec<StatementStats> = inner
            .entries
            .iter()
            .map(|(statement, entry)| {
                let mut samples: Vec<Duration> = entry.samples.iter().copied().collect();
                samples.sort();
                let p95 = samples
                    .get(((samples.len() as f64 * 0.95).ceil() as usize).saturating_sub(1))
                    .copied()
                    .unwrap_or_default();
                StatementStats {
                    statement: statement.clone(),
                    calls: entry.calls,
                    rows: entry.rows,
                    errors: Some(entry.errors),
                    total_ms: millis(entry.total),
                    mean_ms: millis(entry.total) / entry.calls.max(1) as f64,
                    min_ms: millis(entry.min),
                    max_ms: millis(entry.max),
                    p95_ms: Some(millis(p95)),
                    last_seen: Some(entry.last_seen),
                }
            })
            .collect();
        let key = |stats: &StatementStats| match sort {
            SortBy::Total => stats.total_ms,
            SortBy::Mean => stats.mean_ms,
            SortBy::Calls => stats.calls as f64,
        };
        all.sort_by(|a, b| key(b).total_cmp(&key(a)));
        all.truncate(limit);
        all
    }

    pub(super) fn slow(&self) -> Vec<SlowQuery> {
        let inner = self.inner.lock().expect("stats lock");
        inner.slow.iter().rev().cloned().collect()
    }

    pub(super) fn tracked(&self) -> usize {
        self.inner.lock().expect("stats lock").entries.len()
    }

    pub(super) fn reset(&self) {
        let mut inner = self.inner.lock().expect("stats lock");
        inner.entries.clear();
        inner.slow.clear();
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_parameters_and_whitespace_fold() {
        let a = normalize("SELECT *  FROM t WHERE id = 42 AND name = 'it''s' -- note\n");
        let b = normalize("SELECT * FROM t\n WHERE id=?1 AND name = :name");
        assert_eq!(a, "SELECT * FROM t WHERE id=? AND name=?");
        assert_eq!(a, b);
        assert_eq!(
            normalize("select x from t2 where a in (1, 2, 3)"),
            normalize("select x from t2 where a in (4,5)")
        );
        assert_eq!(
            normalize("SELECT \"col 1\" FROM t1"),
            "SELECT \"col 1\" FROM t1"
        );
    }

    #[test]
    fn least_used_statement_is_evicted() {
        let stats = Stats::new(2, Duration::from_secs(1));
        for _ in 0..3 {
            stats.record("SELECT 1 FROM a", Duration::from_millis(1), 1, false, 1);
        }
        stats.record("SELECT 1 FROM b", Duration::from_millis(1), 1, false, 2);
        stats.record("SELECT 1 FROM c", Duration::from_millis(1), 1, false, 3);
        let names: Vec<String> = stats
            .top(SortBy::Calls, 10)
            .into_iter()
            .map(|s| s.statement)
            .collect();
        assert_eq!(names, ["SELECT ? FROM a", "SELECT ? FROM c"]);
    }

    #[test]
    fn figures_after_a_known_workload() {
        let stats = Stats::new(10, Duration::from_millis(50));
        for ms in 1..=20u64 {
            stats.record(
                "SELECT v FROM t WHERE k = ?",
                Duration::from_millis(ms),
                2,
                false,
                ms,
            );
        }
        assert!(stats.record(
            "SELECT v FROM t WHERE k = 7",
            Duration::from_millis(60),
            1,
            false,
            99
        ));
        let top = &stats.top(SortBy::Total, 1)[0];
        assert_eq!(top.calls, 21);
        assert_eq!(top.rows, 41);
        assert_eq!(top.min_ms, 1.0);
        assert_eq!(top.max_ms, 60.0);
        assert_eq!(top.total_ms, 270.0);
        assert_eq!(top.p95_ms, Some(20.0));
        assert_eq!(stats.slow().len(), 1);
        stats.reset();
        assert_eq!(stats.tracked(), 0);
    }
}
