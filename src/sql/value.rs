//! Values between JSON and SQLite, mapped the same way in both directions:
//! null ↔ NULL, integers ↔ INTEGER, other numbers ↔ REAL, strings ↔ TEXT and
//! `{"base64": "..."}` ↔ BLOB. Booleans bind as 0 and 1 (SQLite has no boolean).

use base64::Engine;
use rusqlite::types::{ToSqlOutput, Value as SqliteValue, ValueRef};
use serde_json::{Map, Value, json};

use super::SqlError;

/// A parameter, already checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Param(pub SqliteValue);

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::from(&self.0)))
    }
}

/// Statement parameters: positional (`?`, `?1`) or named (`:name`, `@name`, `$name`).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Params {
    #[default]
    None,
    Positional(Vec<Param>),
    /// Names without their prefix character.
    Named(Vec<(String, Param)>),
}

fn bad(detail: String) -> SqlError {
    SqlError::BadParams(detail)
}

pub fn param_from_json(value: &Value, at: &str) -> Result<Param, SqlError> {
    Ok(Param(match value {
        Value::Null => SqliteValue::Null,
        Value::Bool(flag) => SqliteValue::Integer(i64::from(*flag)),
        Value::Number(number) => match (number.as_i64(), number.as_f64()) {
            (Some(integer), _) => SqliteValue::Integer(integer),
            (None, Some(_)) if number.is_u64() => {
                return Err(bad(format!(
                    "{at}: {number} does not fit a 64-bit signed integer"
                )));
            }
            (None, Some(real)) => SqliteValue::Real(real),
            (None, None) => {
                return Err(bad(format!(
                    "{at}: {number} is not a number SQLite can hold"
                )));
            }
        },
        Value::String(text) => SqliteValue::Text(text.clone()),
        Value::Object(object) if object.len() == 1 && object.contains_key("base64") => {
            let encoded = object["base64"]
                .as_str()
                .ok_or_else(|| bad(format!("{at}: base64 must be a string")))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|error| bad(format!("{at}: not base64: {error}")))?;
            SqliteValue::Blob(bytes)
        }
        _ => {
            return Err(bad(format!(
                "{at}: parameters are null, numbers, strings, booleans or {{\"base64\": \"...\"}}"
            )));
        }
    }))
}

/// `params` of a request: an array (positional), an object (named) or absent.
pub fn params_from_json(value: Option<&Value>) -> Result<Params, SqlError> {
    match value {
        None | Some(Value::Null) => Ok(Params::None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| param_from_json(item, &format!("params[{index}]")))
            .collect::<Result<_, _>>()
            .map(Params::Positional),
        Some(Value::Object(object)) => object
            .iter()
            .map(|(name, item)| {
                let bare = name.trim_start_matches([':', '@', '$']).to_owned();
                param_from_json(item, &format!("params.{name}")).map(|param| (bare, param))
            })
            .collect::<Result<_, _>>()
            .map(Params::Named),
        Some(_) => Err(bad(
            "params is an array (positional) or an object (named)".to_owned()
        )),
    }
}

/// A URL query value for a named query: canonical integers and reals bind as numbers,
/// anything else as text (`007` stays text).
pub fn param_from_query(text: &str) -> Param {
    if let Ok(integer) = text.parse::<i64>()
        && integer.to_string() == text
    {
        return Param(SqliteValue::Integer(integer));
    }
    if text.contains('.')
        && let Ok(real) = text.parse::<f64>()
        && real.is_finite()
    {
        return Param(SqliteValue::Real(real));
    }
    Param(SqliteValue::Text(text.to_owned()))
}

/// One result cell as JSON, and roughly how many bytes it holds (for the result limit).
pub fn cell_to_json(value: ValueRef<'_>) -> (Value, usize) {
    match value {
        ValueRef::Null => (Value::Null, 4),
        ValueRef::Integer(integer) => (json!(integer), 8),
        ValueRef::Real(real) => (json!(real), 8),
        ValueRef::Text(text) => (
            Value::String(String::from_utf8_lossy(text).into_owned()),
            text.len(),
        ),
        ValueRef::Blob(bytes) => {
            let mut object = Map::new();
            object.insert(
                "base64".to_owned(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
            (Value::Object(object), bytes.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_parameters_map_predictably() {
        let params =
            params_from_json(Some(&json!([1, 1.5, "x", null, true, {"base64": "AAE="}]))).unwrap();
        let Params::Positional(values) = params else {
            panic!()
        };
        let values: Vec<_> = values.into_iter().map(|p| p.0).collect();
        assert_eq!(
            values,
            [
                SqliteValue::Integer(1),
                SqliteValue::Real(1.5),
                SqliteValue::Text("x".into()),
                SqliteValue::Null,
                SqliteValue::Integer(1),
                SqliteValue::Blob(vec![0, 1]),
            ]
        );
        assert!(params_from_json(Some(&json!([[1]]))).is_err());
        assert!(params_from_json(Some(&json!([u64::MAX]))).is_err());
        assert!(params_from_json(Some(&json!("x"))).is_err());
    }

    #[test]
    fn query_values_bind_numbers_only_when_canonical() {
        assert_eq!(param_from_query("10").0, SqliteValue::Integer(10));
        assert_eq!(param_from_query("007").0, SqliteValue::Text("007".into()));
        assert_eq!(param_from_query("2.5").0, SqliteValue::Real(2.5));
        assert_eq!(param_from_query("abc").0, SqliteValue::Text("abc".into()));
    }
}
