//! `/v1/queues`, `/v1/jobs`, `/v1/schedules`: the job queue over REST. Workers pull
//! with reserve (a long poll), then ack, fail, heartbeat or report progress with the
//! lease token they were given.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState, json_body};
use crate::queue::{Ack, DurationValue, JobSpec, JobState, Queue, ReserveRequest, ScheduleSpec};

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/queues", get(stats))
        .route("/v1/queues/{queue}/jobs", post(enqueue).get(list))
        .route("/v1/queues/{queue}/reserve", post(reserve))
        .route("/v1/queues/{queue}/pause", post(pause))
        .route("/v1/queues/{queue}/resume", post(resume))
        .route("/v1/queues/{queue}/drain", post(drain))
        .route("/v1/queues/{queue}/dead/retry", post(retry_dead))
        .route("/v1/jobs/ack", post(ack_many))
        .route("/v1/jobs/{id}", get(get_job).delete(delete_job))
        .route("/v1/jobs/{id}/ack", post(ack))
        .route("/v1/jobs/{id}/fail", post(fail))
        .route("/v1/jobs/{id}/heartbeat", post(heartbeat))
        .route("/v1/jobs/{id}/progress", post(progress))
        .route("/v1/schedules", get(schedules).post(put_schedule))
        .route("/v1/schedules/{name}", delete(delete_schedule))
}

fn queue_of(state: &ApiState) -> Result<&Queue, ApiError> {
    Ok(&state.services()?.queue)
}

/// What every call on one job starts with: the queue, the job id from the path and
/// the JSON body (malformed: `bad_json`; wrong shape: `data_code`).
fn job_call<'a, T: serde::de::DeserializeOwned>(
    state: &'a ApiState,
    id: &str,
    body: Result<Bytes, BytesRejection>,
    data_code: &'static str,
) -> Result<(&'a Queue, u64, T), ApiError> {
    Ok((queue_of(state)?, job_id(id)?, json_body(body, data_code)?))
}

fn job_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request("bad_job_id", format!("{raw:?} is not a job id")))
}

async fn enqueue(
    State(state): State<ApiState>,
    Path(queue_name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let queue = queue_of(&state)?;
    // Untagged enums hide the field at fault; parse by the first byte instead.
    let body = body?;
    let is_array = body
        .iter()
        .find(|byte| !byte.is_ascii_whitespace())
        .is_some_and(|&byte| byte == b'[');
    let (specs, many) = if is_array {
        (json_body::<Vec<JobSpec>>(Ok(body), "bad_job")?, true)
    } else {
        (vec![json_body::<JobSpec>(Ok(body), "bad_job")?], false)
    };
    let answers = queue.enqueue(&queue_name, specs).await?;
    let body = if many {
        json!({ "jobs": answers })
    } else {
        json!(answers[0])
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    max: Option<usize>,
    lease: Option<DurationValue>,
    wait: Option<DurationValue>,
}

async fn reserve(
    State(state): State<ApiState>,
    Path(queue_name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let queue = queue_of(&state)?;
    let body = body?;
    let request: ReserveBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReserveBody::default()
    } else {
        json_body(Ok(body), "bad_reserve")?
    };
    let jobs = queue
        .reserve(
            &queue_name,
            ReserveRequest {
                max: request.max.unwrap_or(1),
                lease_ms: request.lease.map(|d| d.0.as_millis() as u64),
                wait: request.wait.map_or(std::time::Duration::ZERO, |d| d.0),
            },
        )
        .await?;
    Ok(Json(json!({ "jobs": jobs })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    lease_token: String,
    #[serde(default)]
    result: Option<Value>,
}

async fn ack(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let (queue, id, body): (_, _, AckBody) = job_call(&state, &id, body, "bad_ack")?;
    let mut results = queue
        .ack(vec![Ack {
            id,
            lease_token: body.lease_token,
            result: body.result,
        }])
        .await?;
    let job = results.pop().expect("one ack, one result")?;
    Ok(Json(json!({ "id": job.id, "state": job.state })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckManyBody {
    jobs: Vec<Ack>,
}

/// Acks many jobs with one commit; each is answered on its own.
async fn ack_many(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let queue = queue_of(&state)?;
    let body: AckManyBody = json_body(body, "bad_ack")?;
    let ids: Vec<u64> = body.jobs.iter().map(|ack| ack.id).collect();
    let results = queue.ack(body.jobs).await?;
    let results: Vec<Value> = ids
        .into_iter()
        .zip(results)
        .map(|(id, result)| match result {
            Ok(_) => json!({ "id": id, "ok": true }),
            Err(error) => {
                let error = ApiError::from(error);
                json!({ "id": id, "ok": false, "code": error.code, "detail": error.detail })
            }
        })
        .collect();
    Ok(Json(json!({ "results": results })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailBody {
    lease_token: String,
    #[serde(default)]
    error: Option<String>,
}

async fn fail(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let (queue, id, body): (_, _, FailBody) = job_call(&state, &id, body, "bad_fail")?;
    let error = body.error.unwrap_or_else(|| "failed".to_owned());
    let failed = queue.fail(id, &body.lease_token, &error).await?;
    let job = failed.job;
    Ok(Json(json!({
        "id": job.id,
        "state": job.state,
        "attempts_made": job.attempts_made,
        "run_at": (!failed.dead).then_some(job.run_at),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatBody {
    lease_token: String,
    lease: Option<DurationValue>,
}

async fn heartbeat(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let (queue, id, body): (_, _, HeartbeatBody) = job_call(&state, &id, body, "bad_heartbeat")?;
    let job = queue
        .heartbeat(
            id,
            &body.lease_token,
            body.lease.map(|d| d.0.as_millis() as u64),
        )
        .await?;
    Ok(Json(
        json!({ "id": job.id, "lease_deadline": job.lease_deadline }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressBody {
    lease_token: String,
    progress: Value,
}

async fn progress(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let (queue, id, body): (_, _, ProgressBody) = job_call(&state, &id, body, "bad_progress")?;
    queue.progress(id, &body.lease_token, body.progress).await?;
    Ok(Json(json!({ "id": id })))
}

async fn get_job(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let queue = queue_of(&state)?;
    let job = queue.get(job_id(&id)?).await?;
    Ok(Json(json!(job)))
}

async fn delete_job(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let queue = queue_of(&state)?;
    queue.delete(job_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stats(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let queue = queue_of(&state)?;
    Ok(Json(json!({ "queues": queue.stats().await? })))
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(state): State<ApiState>,
    Path(queue_name): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let queue = queue_of(&state)?;
    let wanted = query.state.as_deref().unwrap_or("waiting");
    let job_state = JobState::parse(wanted).ok_or_else(|| {
        ApiError::bad_request(
            "bad_state",
            format!(
                "{wanted:?} is not a state: waiting, delayed, active, completed, failed or dead"
            ),
        )
    })?;
    let page = queue
        .list(
            &queue_name,
            job_state,
            query.cursor.as_deref(),
            query.limit.unwrap_or(100),
        )
        .await?;
    Ok(Json(json!({ "jobs": page.jobs, "cursor": page.next })))
}

async fn pause(
    State(state): State<ApiState>,
    Path(queue_name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    queue_of(&state)?.set_paused(&queue_name, true).await?;
    Ok(Json(json!({ "queue": queue_name, "paused": true })))
}

async fn resume(
    State(state): State<ApiState>,
    Path(queue_name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    queue_of(&state)?.set_paused(&queue_name, false).await?;
    Ok(Json(json!({ "queue": queue_name, "paused": false })))
}

async fn drain(
    State(state): State<ApiState>,
    Path(queue_name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let removed = queue_of(&state)?.drain(&queue_name).await?;
    Ok(Json(json!({ "queue": queue_name, "removed": removed })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetryBody {
    ids: Option<Vec<u64>>,
}

async fn retry_dead(
    State(state): State<ApiState>,
    Path(queue_name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let queue = queue_of(&state)?;
    let body = body?;
    let request: RetryBody = if body.iter().all(u8::is_ascii_whitespace) {
        RetryBody::default()
    } else {
        json_body(Ok(body), "bad_retry")?
    };
    let retried = queue.retry_dead(&queue_name, request.ids).await?;
    Ok(Json(json!({ "queue": queue_name, "retried": retried })))
}

/// Every schedule, each with `next_run_at` (Unix ms of its next tick, or null).
async fn schedules(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let queue = queue_of(&state)?;
    let now = queue.now_ms();
    let schedules: Vec<Value> = queue
        .schedules()
        .await?
        .into_iter()
        .map(|schedule| {
            let next_run_at = schedule.next_run(now);
            let mut value = json!(schedule);
            value["next_run_at"] = json!(next_run_at);
            value
        })
        .collect();
    Ok(Json(json!({ "schedules": schedules })))
}

async fn put_schedule(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let queue = queue_of(&state)?;
    let spec: ScheduleSpec = json_body(body, "bad_schedule")?;
    let schedule = queue.put_schedule(spec).await?;
    Ok((StatusCode::CREATED, Json(json!(schedule))).into_response())
}

async fn delete_schedule(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    queue_of(&state)?.delete_schedule(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
