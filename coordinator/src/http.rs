//! The HTTP API and dashboard (axum). Endpoints and the JSON schema: `docs/http-api.md`.
//!
//! Every endpoint except the dashboard page itself needs the token, as `?token=T` or
//! `Authorization: Bearer T`; without it the answer is 401 with a JSON error. The page is
//! served without a token because it holds no data: it reads the token from its own URL and
//! sends it with its API calls.
//!
//! `/api/config/{policy,channels,cv}` read and replace parts of the persisted configuration
//! ([`crate::config`]). A PUT is parsed and validated first (400 naming the field), then written
//! to `config.json`, then applied to the allocator and CV router — one PUT at a time, so the
//! file and the running coordinator never disagree.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::allocator::ChannelRoute;
use crate::config::{self, Config, FieldError, PolicyConfig};
use crate::cv::CvConfig;
use crate::state::Shared;

/// The configuration in force and where it is saved. Holding its lock serialises changes.
#[derive(Debug)]
pub(crate) struct ConfigStore {
    state_dir: std::path::PathBuf,
    current: tokio::sync::Mutex<Config>,
}

impl ConfigStore {
    pub(crate) fn new(state_dir: std::path::PathBuf, cfg: Config) -> Self {
        ConfigStore {
            state_dir,
            current: tokio::sync::Mutex::new(cfg),
        }
    }
}

/// The dashboard page, embedded at build time.
pub const INDEX_HTML: &str = include_str!("../../web/index.html");

#[derive(Debug, Clone)]
pub(crate) struct App {
    pub(crate) shared: Arc<Shared>,
    token: Arc<str>,
    store: Arc<ConfigStore>,
}

pub(crate) fn router(shared: Arc<Shared>, token: Arc<str>, store: Arc<ConfigStore>) -> Router {
    let app = App {
        shared,
        token,
        store,
    };
    let api = Router::new()
        .route("/api/cluster", get(cluster))
        .route("/api/onsets", get(onsets))
        .route("/api/config", get(get_config))
        .route("/api/config/policy", get(get_policy).put(put_policy))
        .route("/api/config/channels", get(get_channels).put(put_channels))
        .route("/api/config/cv", get(get_cv).put(put_cv))
        .route("/api/config/rtpmidi", get(get_rtpmidi).put(put_rtpmidi))
        .route("/api/tempo", get(get_tempo).post(crate::tempo::post_tempo))
        .route("/api/rtpmidi", get(rtpmidi_get))
        .route("/api/rtpmidi/sessions", axum::routing::post(rtpmidi_invite))
        .route(
            "/api/rtpmidi/sessions/{id}",
            axum::routing::delete(rtpmidi_remove),
        )
        .route("/api/rtpmidi/send", axum::routing::post(rtpmidi_send))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/", get(index))
        .merge(api)
        .fallback(not_found)
        .with_state(app)
}

pub(crate) fn json_error(status: StatusCode, msg: &str) -> Response {
    let body = serde_json::json!({ "error": msg }).to_string();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Compares without an early exit, so response time does not reveal a matching prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented_token(req: &Request) -> Option<&str> {
    if let Some(h) = req.headers().get(header::AUTHORIZATION)
        && let Ok(s) = h.to_str()
        && let Some(t) = s.strip_prefix("Bearer ")
    {
        return Some(t.trim());
    }
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
}

async fn require_token(State(app): State<App>, req: Request, next: Next) -> Response {
    match presented_token(&req) {
        Some(t) if same(t.as_bytes(), app.token.as_bytes()) => next.run(req).await,
        Some(_) => json_error(StatusCode::UNAUTHORIZED, "wrong token"),
        None => json_error(
            StatusCode::UNAUTHORIZED,
            "token required: add ?token=T or the header Authorization: Bearer T (the token is printed at start-up and stored in the state directory)",
        ),
    }
}

async fn index() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        INDEX_HTML,
    )
        .into_response()
}

async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "no such endpoint; see docs/http-api.md",
    )
}

async fn cluster(State(app): State<App>) -> Response {
    match serde_json::to_string(&app.shared.snapshot()) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `/api/onsets`: the spread of every recent chord and its summary (docs/http-api.md).
async fn onsets(State(app): State<App>) -> Response {
    let g = app.shared.lock();
    let body = serde_json::json!({
        "summary": g.onsets.summary(),
        "chords": g.onsets.chords(),
    });
    drop(g);
    json_ok(&body)
}

async fn metrics(State(app): State<App>) -> Response {
    let s = app.shared.snapshot();
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, lines: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let online = s.nodes.iter().filter(|n| n.online).count() as u64;
    metric(
        "voicemesh_nodes",
        "Known nodes.",
        "gauge",
        &[(String::new(), s.nodes.len() as u64)],
    );
    metric(
        "voicemesh_nodes_online",
        "Nodes with a live session.",
        "gauge",
        &[(String::new(), online)],
    );
    metric(
        "voicemesh_voices",
        "Voice slots across online nodes.",
        "gauge",
        &[(String::new(), s.voices.capacity)],
    );
    metric(
        "voicemesh_voices_active",
        "Voices assigned right now.",
        "gauge",
        &[(String::new(), s.voices.active)],
    );
    metric(
        "voicemesh_voices_stolen_total",
        "Voices stolen because all were busy.",
        "counter",
        &[(String::new(), s.voices.stolen)],
    );
    metric(
        "voicemesh_osc_received_total",
        "OSC datagrams received.",
        "counter",
        &[(String::new(), s.osc.received)],
    );
    let dropped: Vec<(String, u64)> = s
        .osc
        .dropped
        .iter()
        .map(|(r, v)| (format!("{{reason=\"{r}\"}}"), *v))
        .collect();
    metric(
        "voicemesh_osc_dropped_total",
        "OSC messages or datagrams dropped, by reason.",
        "counter",
        &dropped,
    );
    metric(
        "voicemesh_session_decode_errors_total",
        "Control-session frames that failed to decode.",
        "counter",
        &[(String::new(), s.voices.decode_errors)],
    );
    metric(
        "voicemesh_mcu_datagrams_dropped_total",
        "Datagrams from MCU nodes dropped, by node and reason.",
        "counter",
        &crate::mcu::dropped_metric(&s.nodes),
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        out,
    )
        .into_response()
}

// RTP-MIDI endpoints: the logic is in crate::rtpmidi::api.
async fn rtpmidi_get(State(app): State<App>) -> Response {
    crate::rtpmidi::api::get(&app.shared)
}

async fn rtpmidi_invite(State(app): State<App>, body: Bytes) -> Response {
    crate::rtpmidi::api::invite(&app.shared, &body)
}

async fn rtpmidi_remove(
    State(app): State<App>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    crate::rtpmidi::api::remove(&app.shared, &id)
}

async fn rtpmidi_send(State(app): State<App>, body: Bytes) -> Response {
    crate::rtpmidi::api::send(&app.shared, &body)
}

pub(crate) fn json_ok<T: Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn bad_request(e: &FieldError) -> Response {
    let body = serde_json::json!({
        "error": if e.field.is_empty() { e.message.clone() } else { e.to_string() },
        "field": e.field,
    })
    .to_string();
    (
        StatusCode::BAD_REQUEST,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

async fn get_tempo(State(app): State<App>) -> Response {
    json_ok(&crate::tempo::TempoHandle::new(app.shared.clone()).snapshot())
}

async fn get_config(State(app): State<App>) -> Response {
    json_ok(&*app.store.current.lock().await)
}

async fn get_policy(State(app): State<App>) -> Response {
    json_ok(&app.store.current.lock().await.policy)
}

async fn get_channels(State(app): State<App>) -> Response {
    json_ok(&app.store.current.lock().await.channels)
}

async fn get_rtpmidi(State(app): State<App>) -> Response {
    json_ok(&app.store.current.lock().await.rtpmidi)
}

async fn put_rtpmidi(State(app): State<App>, body: Bytes) -> Response {
    put_part::<crate::rtpmidi::RtpMidiSettings>(
        &app,
        &body,
        config::parse_json,
        |v| v.validate(),
        |c, v| c.rtpmidi = v,
        |c| json_ok(&c.rtpmidi),
    )
    .await
}

async fn get_cv(State(app): State<App>) -> Response {
    json_ok(&app.store.current.lock().await.cv)
}

/// Parses and checks a PUT body, stores it in a copy of the configuration, saves the copy and
/// applies it; answers with the part as now in force.
async fn put_part<T>(
    app: &App,
    body: &[u8],
    parse: impl FnOnce(&[u8]) -> Result<T, FieldError>,
    check: impl FnOnce(&T) -> Result<(), FieldError>,
    store: impl FnOnce(&mut Config, T),
    part: impl FnOnce(&Config) -> Response,
) -> Response
where
    T: DeserializeOwned,
{
    let value: T = match parse(body) {
        Ok(v) => v,
        Err(e) => return bad_request(&e),
    };
    if let Err(e) = check(&value) {
        return bad_request(&e);
    }
    let mut current = app.store.current.lock().await;
    let mut next = current.clone();
    store(&mut next, value);
    let dir = app.store.state_dir.clone();
    let saved = next.clone();
    match tokio::task::spawn_blocking(move || config::save(&dir, &saved)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
    {
        let mut g = app.shared.lock();
        g.alloc.set_policy(next.policy.policy);
        g.alloc.set_steal(next.policy.steal);
        g.alloc.set_routes(next.channels.clone());
        if let Err(e) = g.cv.set_config(next.cv.clone()) {
            // Validated above; a failure here would be a bug, reported rather than hidden.
            tracing::error!("CV configuration saved but not applied: {e}");
        }
    }
    if let Some(h) = app.shared.rtpmidi.get() {
        h.set_configured(&next.rtpmidi.invite);
    }
    *current = next;
    part(&current)
}

async fn put_policy(State(app): State<App>, body: Bytes) -> Response {
    put_part::<PolicyConfig>(
        &app,
        &body,
        config::parse_json,
        |_| Ok(()),
        |c, v| c.policy = v,
        |c| json_ok(&c.policy),
    )
    .await
}

async fn put_channels(State(app): State<App>, body: Bytes) -> Response {
    put_part::<Vec<ChannelRoute>>(
        &app,
        &body,
        config::parse_channels,
        |v| config::validate_channels(v),
        |c, v| c.channels = v,
        |c| json_ok(&c.channels),
    )
    .await
}

async fn put_cv(State(app): State<App>, body: Bytes) -> Response {
    put_part::<CvConfig>(
        &app,
        &body,
        config::parse_json,
        |v| v.validate().map_err(FieldError::from),
        |c, v| c.cv = v,
        |c| json_ok(&c.cv),
    )
    .await
}
