//! The one place that chooses between embedded and external implementations of the
//! subsystems' storage seams, from the configuration. Every option is listed even where
//! this build cannot provide it yet, so the error can say what to use instead.

use std::path::Path;
use std::sync::Arc;

use crate::cache::{CacheStore, RedbCacheStore};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cache.l2: {0}")]
    CacheStore(String),
    #[error("{key} = {value:?} is not available yet in this keel; use {instead}")]
    Unsupported {
        key: &'static str,
        value: String,
        instead: &'static str,
    },
}

/// The cache's L2: none, redb in the data directory, or Redis.
pub fn open_cache_store(
    config: &Config,
    data_dir: &Path,
) -> Result<Option<Arc<dyn CacheStore>>, BackendError> {
    match config.cache.l2.as_str() {
        "none" => Ok(None),
        "redb" => {
            let path = data_dir.join("cache.redb");
            let store = RedbCacheStore::open(&path, config.cache.l2_page_cache_bytes.0 as usize)
                .map_err(|error| BackendError::CacheStore(error.to_string()))?;
            Ok(Some(Arc::new(store)))
        }
        other => Err(BackendError::Unsupported {
            key: "cache.l2",
            value: other.to_owned(),
            instead: "\"redb\" or \"none\"",
        }),
    }
}
