//! The `cache.warm` processor: a queue job that runs a namespace's loader for listed
//! keys (`{"keys": ["42", "43"]}`), so a schedule can keep hot keys loaded.

use async_trait::async_trait;
use serde_json::{Value, json};

use super::loader::Namespaces;
use crate::queue::{Job, Processor};

pub struct CacheWarm {
    pub namespaces: Namespaces,
    pub namespace: String,
}

/// Most keys one job warms; larger lists belong in several jobs.
const MAX_KEYS: usize = 10_000;

#[async_trait]
impl Processor for CacheWarm {
    async fn process(&self, job: &Job) -> Result<Value, String> {
        let keys = job
            .payload
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("the payload needs \"keys\": an array of strings")?;
        if keys.len() > MAX_KEYS {
            return Err(format!("at most {MAX_KEYS} keys per job"));
        }
        let mut failed = Vec::new();
        for key in keys {
            let key = key.as_str().ok_or("every key must be a string")?;
            if let Err(error) = self.namespaces.warm(&self.namespace, key).await {
                failed.push(format!("{key}: {error}"));
            }
        }
        if failed.is_empty() {
            Ok(json!({ "warmed": keys.len() }))
        } else {
            Err(format!(
                "{} of {} keys failed: {}",
                failed.len(),
                keys.len(),
                failed.join("; ")
            ))
        }
    }
}
