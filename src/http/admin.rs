//! `/v1/admin/...`: operator actions on the running keel.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState, json_body};

pub(super) fn routes() -> Router<ApiState> {
    Router::new().route("/v1/admin/backup", post(backup))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupBody {
    dir: std::path::PathBuf,
}

/// Writes a consistent backup into a directory on the server's machine.
async fn backup(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let services = state.services()?;
    let body: BackupBody = json_body(body, "bad_backup")?;
    let report = services.backup.write_to(&body.dir).await.map_err(|error| {
        use crate::app::BackupError;
        match error {
            BackupError::Destination { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_backup_dir", error.to_string())
            }
            BackupError::Copy { .. } => ApiError::internal(error),
        }
    })?;
    Ok(Json(json!(report)))
}
