//! The demo's upstream: a small "posts"/"users" JSON API over the demo tables in keel's
//! own `data.sqlite`, the kind of application keel's gateway, cache loaders and webhooks
//! sit in front of. It reads through its own read-only connections, as a separate
//! application would.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rusqlite::{Connection, OpenFlags};
use serde::Deserialize;
use serde_json::{Value, json};

/// Read-only connections kept for reuse; more are opened under load, at most this many
/// are kept.
const KEPT_CONNECTIONS: usize = 4;

#[derive(Clone)]
pub(super) struct DemoApp {
    database: PathBuf,
    idle: Arc<Mutex<Vec<Connection>>>,
}

impl DemoApp {
    pub(super) fn new(database: PathBuf) -> DemoApp {
        DemoApp {
            database,
            idle: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub(super) fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/posts", get(list_posts))
            .route("/posts/{id}", get(one_post))
            .route("/users/{id}", get(one_user))
            .route("/users/{id}/posts", get(posts_of_user))
            .route("/search", get(search_by_author))
            .route("/slow", get(slow))
            .route("/hooks/email", post(email_hook))
            .with_state(self)
    }

    /// Runs `read` on a pooled connection off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, AppFailure> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = app.idle.lock().expect("pool lock").pop();
            let connection = match pooled {
                Some(connection) => connection,
                None => Connection::open_with_flags(
                    &app.database,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?,
            };
            let outcome = read(&connection);
            let mut idle = app.idle.lock().expect("pool lock");
            if idle.len() < KEPT_CONNECTIONS {
                idle.push(connection);
            }
            outcome
        })
        .await
        .map_err(|_| AppFailure::Internal)?
        .map_err(|error| match error {
            rusqlite::Error::QueryReturnedNoRows => AppFailure::NotFound,
            _ => AppFailure::Internal,
        })
    }
}

enum AppFailure {
    NotFound,
    Internal,
}

impl IntoResponse for AppFailure {
    fn into_response(self) -> Response {
        match self {
            AppFailure::NotFound => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": "not found"})),
            )
                .into_response(),
            AppFailure::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": "database error"})),
            )
                .into_response(),
        }
    }
}

fn post_json(row: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    Ok(json!({
        "id": row.get::<_, i64>("id")?,
        "user_id": row.get::<_, i64>("user_id")?,
        "author_email": row.get::<_, String>("author_email")?,
        "title": row.get::<_, String>("title")?,
        "views": row.get::<_, i64>("views")?,
        "created_at": row.get::<_, String>("created_at")?,
    }))
}

/// Runs a one-parameter query over `posts`, each row as `post_json`.
fn select_posts(
    db: &Connection,
    sql: &str,
    param: impl rusqlite::ToSql,
) -> rusqlite::Result<Vec<Value>> {
    db.prepare_cached(sql)?
        .query_map([param], post_json)?
        .collect()
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    page: u32,
}

async fn list_posts(
    State(app): State<DemoApp>,
    Query(Page { page }): Query<Page>,
) -> Result<axum::Json<Value>, AppFailure> {
    let offset = i64::from(page.min(1000)) * 20;
    let posts = app
        .read(move |db| {
            select_posts(
                db,
                "SELECT id, user_id, author_email, title, views, created_at
                 FROM posts ORDER BY id LIMIT 20 OFFSET ?1",
                offset,
            )
        })
        .await?;
    Ok(axum::Json(json!({ "page": page, "posts": posts })))
}

async fn one_post(
    State(app): State<DemoApp>,
    Path(id): Path<i64>,
) -> Result<axum::Json<Value>, AppFailure> {
    let post = app
        .read(move |db| {
            db.prepare_cached(
                "SELECT id, user_id, author_email, title, body, views, created_at
                 FROM posts WHERE id = ?1",
            )?
            .query_row([id], |row| {
                let mut post = post_json(row)?;
                post["body"] = json!(row.get::<_, String>("body")?);
                Ok(post)
            })
        })
        .await?;
    Ok(axum::Json(post))
}

async fn one_user(
    State(app): State<DemoApp>,
    Path(id): Path<i64>,
) -> Result<axum::Json<Value>, AppFailure> {
    let user = app
        .read(move |db| {
            db.prepare_cached("SELECT id, name, email, created_at FROM users WHERE id = ?1")?
                .query_row([id], |row| {
                    Ok(json!({
                        "id": row.get::<_, i64>(0)?,
                        "name": row.get::<_, String>(1)?,
                        "email": row.get::<_, String>(2)?,
                        "created_at": row.get::<_, String>(3)?,
                    }))
                })
        })
        .await?;
    Ok(axum::Json(user))
}

async fn posts_of_user(
    State(app): State<DemoApp>,
    Path(id): Path<i64>,
) -> Result<axum::Json<Value>, AppFailure> {
    let posts = app
        .read(move |db| {
            select_posts(
                db,
                "SELECT id, user_id, author_email, title, views, created_at
                 FROM posts WHERE user_id = ?1 ORDER BY id DESC LIMIT 20",
                id,
            )
        })
        .await?;
    Ok(axum::Json(json!({ "user_id": id, "posts": posts })))
}

#[derive(Deserialize)]
struct Author {
    author_email: String,
}

/// The unindexed query: a full scan of `posts` on every call.
async fn search_by_author(
    State(app): State<DemoApp>,
    Query(Author { author_email }): Query<Author>,
) -> Result<axum::Json<Value>, AppFailure> {
    let posts = app
        .read(move |db| {
            select_posts(
                db,
                "SELECT id, user_id, author_email, title, views, created_at
                 FROM posts WHERE author_email = ?1 ORDER BY id",
                author_email,
            )
        })
        .await?;
    Ok(axum::Json(json!({ "posts": posts })))
}

/// The deliberately slow endpoint: 300-700 ms, so latency charts have a tail.
async fn slow() -> axum::Json<Value> {
    let millis = 300 + u64::from(rand_u32() % 400);
    tokio::time::sleep(Duration::from_millis(millis)).await;
    axum::Json(json!({ "slept_ms": millis }))
}

/// The `email` queue's webhook. Addresses at `bounce.example` always fail (so retries
/// and dead jobs show); a tenth of the rest fail once in a while.
async fn email_hook(axum::Json(payload): axum::Json<Value>) -> Response {
    let to = payload.get("to").and_then(Value::as_str).unwrap_or("");
    if to.ends_with("@bounce.example") {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"error": format!("mailbox {to} does not exist")})),
        )
            .into_response();
    }
    if rand_u32().is_multiple_of(10) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": "mail relay busy, try again"})),
        )
            .into_response();
    }
    axum::Json(json!({ "sent": to })).into_response()
}

pub(super) fn rand_u32() -> u32 {
    let rng = ring::rand::SystemRandom::new();
    ring::rand::generate::<[u8; 4]>(&rng).map_or(0, |bytes| u32::from_le_bytes(bytes.expose()))
}
