//! The analyzer behind `POST /v1/sql/analyze`: the `EXPLAIN QUERY PLAN` tree, findings
//! (full scans of large tables, temporary B-trees for ORDER BY / GROUP BY), and for a
//! scanned table the index that would serve the query: equality columns first, then
//! one range column, then the ORDER BY columns. The proposal is proved by planning the
//! query again with the index created inside a transaction that is rolled back.
//!
//! SQLite does the planning; the only text reading here is finding the WHERE and ORDER
//! BY terms of the scanned table, and every column proposed is checked against that
//! table's real columns.

use serde::Serialize;

use super::sqlite::{Conn, SqliteBackend};
use super::{Params, SqlError, Statement};

/// A scan of a table with at least this many rows is a finding.
const LARGE_TABLE_ROWS: i64 = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct PlanNode {
    pub id: i64,
    pub detail: String,
    pub children: Vec<PlanNode>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    pub table: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Proposal {
    pub table: String,
    pub columns: Vec<String>,
    pub create_index: String,
    pub plan_before: Vec<PlanNode>,
    pub plan_after: Vec<PlanNode>,
    /// True when the new plan no longer scans the table.
    pub improves: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub plan: Vec<PlanNode>,
    pub findings: Vec<Finding>,
    pub proposal: Option<Proposal>,
}

type PlanRow = (i64, i64, String);

fn plan_rows(conn: &mut Conn, sql: &str) -> Result<Vec<PlanRow>, SqlError> {
    let statement = Statement {
        sql: format!("EXPLAIN QUERY PLAN {sql}"),
        params: Params::None,
    };
    // Parameters stay unbound (NULL): the plan does not depend on their values.
    let info = conn.info(&statement.sql)?;
    if !info.readonly {
        return Err(SqlError::NotReadOnly);
    }
    let raw = conn.raw();
    let mut prepared = raw.prepare(&statement.sql)?;
    let mut cursor = prepared.raw_query();
    let mut rows = Vec::new();
    while let Some(row) = cursor.next()? {
        rows.push((row.get(0)?, row.get(1)?, row.get(3)?));
    }
    Ok(rows)
}

fn tree(rows: &[PlanRow], parent: i64) -> Vec<PlanNode> {
    rows.iter()
        .filter(|(_, row_parent, _)| *row_parent == parent)
        .map(|(id, _, detail)| PlanNode {
            id: *id,
            detail: detail.clone(),
            children: tree(rows, *id),
        })
        .collect()
}

/// `SCAN t` or `SCAN t AS a` (not `SCAN t USING INDEX`): the table and its alias.
fn scanned(detail: &str) -> Option<(String, Option<String>)> {
    let rest = detail.strip_prefix("SCAN ")?;
    if rest.contains(" USING ") || rest.starts_with("CONSTANT") || rest.starts_with('(') {
        return None;
    }
    let mut words = rest.split_whitespace();
    let table = words.next()?.trim_matches('"').to_owned();
    let alias = match (words.next(), words.next()) {
        (Some("AS"), Some(alias)) => Some(alias.to_owned()),
        _ => None,
    };
    Some((table, alias))
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

impl SqliteBackend {
    pub async fn analyze_plan(&self, sql: String) -> Result<Analysis, SqlError> {
        let text = sql.clone();
        let (rows, findings, candidate) = self
            .with_reader(move |conn| -> Result<_, SqlError> {
                let rows = plan_rows(conn, &text)?;
                let mut findings = Vec::new();
                let mut candidate = None;
                for (_, _, detail) in &rows {
                    if detail.starts_with("USE TEMP B-TREE") {
                        findings.push(Finding {
                            kind: "temp_btree",
                            table: None,
                            detail: detail.clone(),
                        });
                    }
                    let Some((table, alias)) = scanned(detail) else {
                        continue;
                    };
                    let count: i64 = conn.trusted(|c| {
                        c.query_row(
                            &format!(
                                "SELECT count(*) FROM (SELECT 1 FROM {} LIMIT {})",
                                quote(&table),
                                LARGE_TABLE_ROWS
                            ),
                            [],
                            |row| row.get(0),
                        )
                    })?;
                    if count < LARGE_TABLE_ROWS {
                        continue;
                    }
                    findings.push(Finding {
                        kind: "full_scan",
                        table: Some(table.clone()),
                        detail: format!("{detail} (at least {count} rows)"),
                    });
                    if candidate.is_none() {
                        let columns: Vec<String> = conn.trusted(|c| -> rusqlite::Result<_> {
                            let mut pragma =
                                c.prepare(&format!("PRAGMA table_info({})", quote(&table)))?;
                            pragma
                                .query_map([], |row| row.get::<_, String>(1))?
                                .collect()
                        })?;
                        candidate = Some((table, alias, columns));
                    }
                }
                Ok((rows, findings, candidate))
            })
            .await??;
        let plan = tree(&rows, 0);
        let proposal = match candidate {
            Some((table, alias, table_columns)) => {
                let columns = index_columns(&sql, &table, alias.as_deref(), &table_columns);
                if columns.is_empty() {
                    None
                } else {
                    Some(self.prove(sql, table, columns, plan.clone()).await?)
                }
            }
            None => None,
        };
        Ok(Analysis {
            plan,
            findings,
            proposal,
        })
    }

    async fn prove(
        &self,
        sql: String,
        table: String,
        columns: Vec<String>,
        plan_before: Vec<PlanNode>,
    ) -> Result<Proposal, SqlError> {
        let name = format!(
            "idx_{}_{}",
            table.to_ascii_lowercase(),
            columns.join("_").to_ascii_lowercase()
        )
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect::<String>();
        let create_index = format!(
            "CREATE INDEX {} ON {} ({})",
            quote(&name),
            quote(&table),
            columns
                .iter()
                .map(|c| quote(c))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let trial = create_index.clone();
        let rows = self
            .alone(move |conn| -> Result<Vec<PlanRow>, SqlError> {
                conn.trusted(|c| c.execute_batch(&format!("BEGIN; {trial};")))?;
                conn.forget_statements();
                let planned = plan_rows(conn, &sql);
                conn.trusted(|c| c.execute_batch("ROLLBACK"))?;
                conn.forget_statements();
                planned
            })
            .await??;
        let improves = !rows.iter().any(|(_, _, detail)| {
            scanned(detail).is_some_and(|(t, _)| t.eq_ignore_ascii_case(&table))
        });
        Ok(Proposal {
            table,
            columns,
            create_index,
            plan_before,
            plan_after: tree(&rows, 0),
            improves,
        })
    }
}

/// PostgreSQL's plan (`EXPLAIN (FORMAT JSON)`) in the same shape: each node's detail is
/// its type, relation and filter; a `Seq Scan` of a table with at least
/// [`LARGE_TABLE_ROWS`] rows is a `full_scan`, a `Sort` is a `sort`. Parameters stay
/// parameters: the statement is prepared and explained as a generic plan
/// (`plan_cache_mode = force_generic_plan`), so no value is guessed.
pub(crate) async fn analyze_postgres(
    client: &mut deadpool_postgres::Object,
    sql: String,
) -> Result<Analysis, SqlError> {
    use super::postgres::pg;
    let txn = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(pg)?;
    let raw = pg_plan(&txn, &sql).await?;
    // The planner says what writes, as on SQLite: a plan that modifies a table is not
    // analyzed on the read path.
    if raw.to_string().contains("\"ModifyTable\"") {
        return Err(SqlError::NotReadOnly);
    }
    let mut findings = Vec::new();
    let mut candidate = None;
    let mut scans = Vec::new();
    pg_scans(&raw, &mut scans, &mut findings);
    for (schema, table, alias) in scans {
        let relation = format!("{}.{}", quote(&schema), quote(&table));
        let count: i64 = txn
            .query_one(
                &format!(
                    "SELECT count(*) FROM (SELECT 1 FROM {relation} LIMIT {LARGE_TABLE_ROWS}) t"
                ),
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        if count < LARGE_TABLE_ROWS {
            continue;
        }
        findings.push(Finding {
            kind: "full_scan",
            table: Some(table.clone()),
            detail: format!("Seq Scan on {table} (at least {count} rows)"),
        });
        if candidate.is_none() {
            let columns: Vec<String> = txn
                .query(
                    "SELECT column_name::text FROM information_schema.columns                      WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                    &[&schema, &table],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(|row| row.get(0))
                .collect();
            candidate = Some((schema, table, alias, columns));
        }
    }
    txn.rollback().await.map_err(pg)?;
    let plan = pg_tree(&raw);
    let Some((schema, table, alias, table_columns)) = candidate else {
        return Ok(Analysis {
            plan,
            findings,
            proposal: None,
        });
    };
    let columns = index_columns(&sql, &table, alias.as_deref(), &table_columns);
    if columns.is_empty() {
        return Ok(Analysis {
            plan,
            findings,
            proposal: None,
        });
    }
    let name = index_name(&table, &columns);
    let create_index = format!(
        "CREATE INDEX {} ON {} ({})",
        quote(&name),
        quote(&table),
        columns
            .iter()
            .map(|c| quote(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The proof: the index exists only inside this transaction, which is rolled back.
    let txn = client.transaction().await.map_err(pg)?;
    txn.batch_execute(&format!(
        "SET LOCAL lock_timeout = '2s'; CREATE INDEX {} ON {}.{} ({})",
        quote(&name),
        quote(&schema),
        quote(&table),
        columns
            .iter()
            .map(|c| quote(c))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .await
    .map_err(pg)?;
    let after = pg_plan(&txn, &sql).await?;
    txn.rollback().await.map_err(pg)?;
    let mut still = Vec::new();
    pg_scans(&after, &mut still, &mut Vec::new());
    let improves = !still.iter().any(|(s, t, _)| *s == schema && *t == table);
    Ok(Analysis {
        plan: plan.clone(),
        findings,
        proposal: Some(Proposal {
            table,
            columns,
            create_index,
            plan_before: plan,
            plan_after: pg_tree(&after),
            improves,
        }),
    })
}

fn index_name(table: &str, columns: &[String]) -> String {
    format!(
        "idx_{}_{}",
        table.to_ascii_lowercase(),
        columns.join("_").to_ascii_lowercase()
    )
    .chars()
    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
    .collect()
}

/// The generic plan of `sql` (its `:name`, `?` and `$n` unbound) as PostgreSQL's JSON.
async fn pg_plan(
    txn: &deadpool_postgres::Transaction<'_>,
    sql: &str,
) -> Result<serde_json::Value, SqlError> {
    use super::postgres::pg;
    let (text, _) = super::postgres::placeholders(sql, true);
    let prepared = txn.prepare(&text).await.map_err(pg)?;
    let nulls = vec!["NULL"; prepared.params().len()].join(", ");
    // A prepared statement outlives the transaction: its name is this call's own (a
    // failed EXPLAIN that leaves it behind never blocks the next analysis on this
    // pooled connection), and it is deallocated below.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "keel_analyze_{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    txn.batch_execute(&format!(
        "SET LOCAL plan_cache_mode = force_generic_plan; PREPARE {name} AS {text}"
    ))
    .await
    .map_err(pg)?;
    let execute = if nulls.is_empty() {
        format!("EXECUTE {name}")
    } else {
        format!("EXECUTE {name}({nulls})")
    };
    let plan = txn
        .query_one(&format!("EXPLAIN (VERBOSE, FORMAT JSON) {execute}"), &[])
        .await;
    let deallocated = txn.batch_execute(&format!("DEALLOCATE {name}")).await;
    let plan = plan
        .map_err(pg)?
        .try_get::<_, serde_json::Value>(0)
        .map_err(pg)?;
    deallocated.map_err(pg)?;
    Ok(plan)
}

/// `Seq Scan` relations (schema, table, alias) and `Sort` findings, in plan order (the plan is VERBOSE: it names schemas).
fn pg_scans(
    plan: &serde_json::Value,
    scans: &mut Vec<(String, String, Option<String>)>,
    findings: &mut Vec<Finding>,
) {
    use serde_json::Value;
    match plan {
        Value::Object(node) => {
            let kind = node.get("Node Type").and_then(Value::as_str).unwrap_or("");
            if kind == "Seq Scan"
                && let Some(table) = node.get("Relation Name").and_then(Value::as_str)
            {
                let schema = node.get("Schema").and_then(Value::as_str);
                let alias = node
                    .get("Alias")
                    .and_then(Value::as_str)
                    .filter(|alias| *alias != table)
                    .map(str::to_owned);
                scans.push((
                    schema.unwrap_or("public").to_owned(),
                    table.to_owned(),
                    alias,
                ));
            }
            if kind == "Sort" {
                let keys = node
                    .get("Sort Key")
                    .map(|keys| keys.to_string())
                    .unwrap_or_default();
                findings.push(Finding {
                    kind: "sort",
                    table: None,
                    detail: format!("Sort {keys}"),
                });
            }
            for child in node.values() {
                pg_scans(child, scans, findings);
            }
        }
        Value::Array(items) => {
            for item in items {
                pg_scans(item, scans, findings);
            }
        }
        _ => {}
    }
}

/// PostgreSQL's JSON plan as `PlanNode`s: ids in plan order, details like
/// `Seq Scan on posts (Filter: (author_email = $1))`.
fn pg_tree(plan: &serde_json::Value) -> Vec<PlanNode> {
    fn node(plan: &serde_json::Value, next: &mut i64) -> Option<PlanNode> {
        use serde_json::Value;
        let object = plan.as_object()?;
        let text = |key: &str| object.get(key).and_then(Value::as_str);
        let mut detail = text("Node Type").unwrap_or("?").to_owned();
        if let Some(index) = text("Index Name") {
            detail.push_str(&format!(" using {index}"));
        }
        if let Some(table) = text("Relation Name") {
            detail.push_str(&format!(" on {table}"));
            if let Some(alias) = text("Alias").filter(|alias| *alias != table) {
                detail.push_str(&format!(" {alias}"));
            }
        }
        for key in [
            "Index Cond",
            "Recheck Cond",
            "Filter",
            "Hash Cond",
            "Join Filter",
        ] {
            if let Some(condition) = text(key) {
                detail.push_str(&format!(" ({key}: {condition})"));
            }
        }
        *next += 1;
        let id = *next;
        let children = object
            .get("Plans")
            .and_then(Value::as_array)
            .map(|plans| plans.iter().filter_map(|p| node(p, next)).collect())
            .unwrap_or_default();
        Some(PlanNode {
            id,
            detail,
            children,
        })
    }
    let mut next = 0;
    plan.as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.get("Plan"))
        .filter_map(|root| node(root, &mut next))
        .collect()
}

/// Tokens of SQL text, enough to find terms: words, strings, numbers, punctuation.
fn tokens(sql: &str) -> Vec<String> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'\'' {
            let start = i;
            i += 1;
            while i < bytes.len() && bytes[i] != b'\'' {
                i += 1;
            }
            i = (i + 1).min(bytes.len());
            out.push(sql[start..i].to_owned());
        } else if c == b'"' || c == b'`' {
            let start = i + 1;
            i += 1;
            while i < bytes.len() && bytes[i] != c {
                i += 1;
            }
            out.push(sql[start..i.min(bytes.len())].to_owned());
            i = (i + 1).min(bytes.len());
        } else if c.is_ascii_alphanumeric()
            || c == b'_'
            || c == b'.'
            || c == b':'
            || c == b'?'
            || c == b'@'
            || c == b'$'
        {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric()
                    || matches!(bytes[i], b'_' | b'.' | b':' | b'?' | b'@' | b'$'))
            {
                i += 1;
            }
            out.push(sql[start..i].to_owned());
        } else if (c == b'<' || c == b'>' || c == b'!') && bytes.get(i + 1) == Some(&b'=') {
            out.push(sql[i..i + 2].to_owned());
            i += 2;
        } else {
            out.push((c as char).to_string());
            i += 1;
        }
    }
    out
}

/// Equality columns, then one range column, then ORDER BY columns, of `table`.
fn index_columns(sql: &str, table: &str, alias: Option<&str>, columns: &[String]) -> Vec<String> {
    let tokens = tokens(sql);
    let upper: Vec<String> = tokens.iter().map(|t| t.to_ascii_uppercase()).collect();
    let column_of = |token: &str| -> Option<String> {
        let (qualifier, name) = match token.rsplit_once('.') {
            Some((qualifier, name)) => (Some(qualifier), name),
            None => (None, token),
        };
        if let Some(qualifier) = qualifier
            && !qualifier.eq_ignore_ascii_case(table)
            && alias.is_none_or(|alias| !qualifier.eq_ignore_ascii_case(alias))
        {
            return None;
        }
        columns
            .iter()
            .find(|column| column.eq_ignore_ascii_case(name))
            .cloned()
    };
    let mut equality = Vec::new();
    let mut range = Vec::new();
    let mut order = Vec::new();
    let mut depth = 0i32;
    let mut section = "";
    let mut index = 0;
    while index < tokens.len() {
        let word = upper[index].as_str();
        match word {
            "(" => depth += 1,
            ")" => depth -= 1,
            "WHERE" | "ON" if depth == 0 => section = "where",
            "GROUP" | "HAVING" | "LIMIT" | "WINDOW" | "UNION" if depth == 0 => section = "",
            "ORDER" if depth == 0 => section = "order",
            _ => {}
        }
        if depth == 0 && section == "where" {
            if let (Some(column), Some(operator)) =
                (column_of(&tokens[index]), upper.get(index + 1))
            {
                match operator.as_str() {
                    "=" | "==" | "IN" | "IS" => equality.push(column),
                    "<" | ">" | "<=" | ">=" | "BETWEEN" | "LIKE" | "GLOB" => range.push(column),
                    _ => {}
                }
            }
        } else if depth == 0
            && section == "order"
            && let Some(column) = column_of(&tokens[index])
        {
            order.push(column);
        }
        index += 1;
    }
    let mut chosen: Vec<String> = Vec::new();
    for column in equality
        .into_iter()
        .chain(range.into_iter().take(1))
        .chain(order)
    {
        if !chosen.contains(&column) {
            chosen.push(column);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> Vec<String> {
        ["id", "user_id", "status", "created_at", "total"]
            .map(str::to_owned)
            .to_vec()
    }

    #[test]
    fn equality_then_range_then_order() {
        let sql = "SELECT * FROM orders WHERE created_at > ?1 AND user_id = ?2 AND status = 'paid' ORDER BY total DESC";
        assert_eq!(
            index_columns(sql, "orders", None, &columns()),
            ["user_id", "status", "created_at", "total"]
        );
    }

    #[test]
    fn other_tables_and_unknown_columns_are_ignored() {
        let sql = "SELECT * FROM orders o JOIN users u ON u.id = o.user_id WHERE u.name = 'x' AND o.status = :s";
        assert_eq!(
            index_columns(sql, "orders", Some("o"), &columns()),
            ["status"]
        );
        assert!(index_columns("SELECT * FROM orders", "orders", None, &columns()).is_empty());
    }

    #[test]
    fn scan_details_parse() {
        assert_eq!(scanned("SCAN orders"), Some(("orders".to_owned(), None)));
        assert_eq!(
            scanned("SCAN orders AS o"),
            Some(("orders".to_owned(), Some("o".to_owned())))
        );
        assert_eq!(scanned("SCAN orders USING INDEX idx"), None);
        assert_eq!(scanned("SEARCH orders USING INDEX idx (user_id=?)"), None);
    }
}
