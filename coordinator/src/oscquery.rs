//! The OSCQuery server: the OSC address space as an HTTP JSON tree, so controllers find every
//! address, its argument types, ranges and current values without a manual.
//!
//! The tree is generated on each request from the same table the dispatcher checks messages
//! against ([`crate::osc::table`]): a path in the tree is a path the dispatcher serves, with the
//! same types and ranges. `GET /` returns the whole tree, `GET /voicemesh/note` one node,
//! `GET /voicemesh/param/cutoff?VALUE` one attribute, `GET /?HOST_INFO` the host information
//! (name, OSC port and transport, supported extensions). Unknown paths are 404, unknown
//! attributes 400. The server needs no token: it only describes, it changes nothing. It runs on
//! its own port (default 9001) because OSCQuery clients ask for `/`, and is advertised as
//! `_oscjson._tcp` (see [`crate::advertise`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::osc::{Access, AddressInfo, Kind, table};
use crate::state::Shared;

/// Attributes a query string may ask for.
const ATTRIBUTES: [&str; 7] = [
    "FULL_PATH",
    "CONTENTS",
    "TYPE",
    "ACCESS",
    "VALUE",
    "RANGE",
    "DESCRIPTION",
];

/// What `HOST_INFO` reports.
#[derive(Clone, Debug)]
pub(crate) struct HostInfo {
    pub name: String,
    pub osc_udp: SocketAddr,
}

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    host: Arc<HostInfo>,
}

pub(crate) fn router(shared: Arc<Shared>, host: HostInfo) -> Router {
    Router::new().fallback(handle).with_state(App {
        shared,
        host: Arc::new(host),
    })
}

/// The current value of an address that has one.
fn value(app: &App, info: &AddressInfo) -> Option<Vec<Value>> {
    match info.access {
        Access::None => None,
        Access::ReadWrite => {
            let g = app.shared.lock();
            Some(match info.kind {
                Kind::Param(id) => {
                    let v = g
                        .osc
                        .params
                        .get(&id)
                        .map(|&v| f64::from(v))
                        .unwrap_or(info.args[0].neutral);
                    vec![json!(v)]
                }
                Kind::Tempo => vec![json!(crate::tempo::bpm_of(&g.tempo.timeline))],
                Kind::Transport => vec![json!(i32::from(g.tempo.playing))],
                _ => info.args.iter().map(|a| json!(a.neutral)).collect(),
            })
        }
        // Write-only: neutral arguments, because clients such as python-oscquery refuse a
        // method without VALUE (see docs/osc.md).
        Access::Write => Some(
            info.args
                .iter()
                .map(|a| match a.tag {
                    's' => json!(""),
                    'i' => json!(a.neutral as i64),
                    _ => json!(a.neutral),
                })
                .collect(),
        ),
    }
}

fn method(app: &App, info: &AddressInfo) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("FULL_PATH".into(), json!(info.path));
    m.insert("ACCESS".into(), json!(info.access as u8));
    m.insert("DESCRIPTION".into(), json!(info.description));
    if !info.args.is_empty() {
        m.insert("TYPE".into(), json!(info.type_tags()));
        let range: Vec<Value> = info
            .args
            .iter()
            .map(|a| {
                if a.tag == 's' {
                    json!({})
                } else if a.tag == 'i' {
                    json!({"MIN": a.min as i64, "MAX": a.max as i64})
                } else {
                    json!({"MIN": a.min, "MAX": a.max})
                }
            })
            .collect();
        m.insert("RANGE".into(), Value::Array(range));
    }
    if let Some(v) = value(app, info) {
        m.insert("VALUE".into(), Value::Array(v));
    }
    m
}

/// The node at `path` ("/" is the root): a method, or a container of everything below it.
fn node(app: &App, path: &str) -> Option<Map<String, Value>> {
    let t = table();
    if let Some(info) = t.get(path) {
        return Some(method(app, info));
    }
    let prefix = if path == "/" {
        "/".to_owned()
    } else {
        format!("{}/", path.trim_end_matches('/'))
    };
    let below: Vec<&AddressInfo> = t
        .entries()
        .iter()
        .filter(|e| e.path.starts_with(&prefix))
        .collect();
    if below.is_empty() {
        return None;
    }
    let mut contents = Map::new();
    for e in below {
        let name = e.path[prefix.len()..].split('/').next().unwrap_or_default();
        if contents.contains_key(name) {
            continue;
        }
        let child = format!("{prefix}{name}");
        if let Some(n) = node(app, &child) {
            contents.insert(name.to_owned(), Value::Object(n));
        }
    }
    let mut m = Map::new();
    let full = if path == "/" {
        "/"
    } else {
        path.trim_end_matches('/')
    };
    m.insert("FULL_PATH".into(), json!(full));
    m.insert("ACCESS".into(), json!(0));
    m.insert("CONTENTS".into(), Value::Object(contents));
    Some(m)
}

fn host_info(app: &App) -> Value {
    let mut m = Map::new();
    m.insert("NAME".into(), json!(app.host.name));
    m.insert(
        "EXTENSIONS".into(),
        json!({
            "ACCESS": true, "VALUE": true, "RANGE": true, "DESCRIPTION": true,
            "TAGS": false, "CLIPMODE": false, "UNIT": false, "CRITICAL": false,
            "LISTEN": false, "PATH_CHANGED": false, "HTML": false,
        }),
    );
    let ip = app.host.osc_udp.ip();
    if !ip.is_unspecified() {
        m.insert("OSC_IP".into(), json!(ip.to_string()));
    }
    m.insert("OSC_PORT".into(), json!(app.host.osc_udp.port()));
    m.insert("OSC_TRANSPORT".into(), json!("UDP"));
    Value::Object(m)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn handle(State(app): State<App>, uri: Uri) -> Response {
    let path = uri.path();
    match uri.query() {
        Some("HOST_INFO") => json_response(StatusCode::OK, &host_info(&app)),
        query => {
            let Some(n) = node(&app, path) else {
                return json_response(StatusCode::NOT_FOUND, &json!({"error": "no such path"}));
            };
            match query {
                None | Some("") => json_response(StatusCode::OK, &Value::Object(n)),
                Some(attr) if ATTRIBUTES.contains(&attr) => match n.get(attr) {
                    Some(v) => json_response(StatusCode::OK, &json!({ attr: v })),
                    None => StatusCode::NO_CONTENT.into_response(),
                },
                Some(_) => json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "unknown attribute"}),
                ),
            }
        }
    }
}
