//! The RTP-MIDI part of the HTTP API (routes in `crate::http`, schema in docs/http-api.md).

use axum::http::StatusCode;
use axum::response::Response;

use super::Target;
use crate::http::{json_error, json_ok};
use crate::state::Shared;

fn handle(shared: &Shared) -> Result<&super::Handle, Box<Response>> {
    shared.rtpmidi.get().map(|h| &**h).ok_or_else(|| {
        Box::new(json_error(
            StatusCode::CONFLICT,
            "RTP-MIDI is off (start the coordinator with --rtpmidi-port)",
        ))
    })
}

/// `GET /api/rtpmidi`: the same section `/api/cluster` has.
pub(crate) fn get(shared: &Shared) -> Response {
    match handle(shared) {
        Ok(h) => json_ok(&h.snapshot()),
        Err(r) => *r,
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Invite {
    invite: String,
}

/// `POST /api/rtpmidi/sessions {"invite": "ip:port" | "ip" | "mDNS name"}`.
pub(crate) fn invite(shared: &Shared, body: &[u8]) -> Response {
    let h = match handle(shared) {
        Ok(h) => h,
        Err(r) => return *r,
    };
    let target = match serde_json::from_slice::<Invite>(body)
        .map_err(|e| format!("expected {{\"invite\": \"ip:port or name\"}}: {e}"))
        .and_then(|i| Target::parse(&i.invite))
    {
        Ok(t) => t,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    let by_name = matches!(target, Target::Name(_));
    let id = h.invite(target);
    json_ok(&serde_json::json!({ "id": id, "waiting_for_mdns": by_name && id.is_none() }))
}

/// `DELETE /api/rtpmidi/sessions/{id}`: ends the session (BY) or stops inviting a name.
pub(crate) fn remove(shared: &Shared, id: &str) -> Response {
    let h = match handle(shared) {
        Ok(h) => h,
        Err(r) => return *r,
    };
    let done = match id.parse::<u64>() {
        Ok(n) => h.remove(n),
        Err(_) => h.forget_name(id),
    };
    if done {
        json_ok(&serde_json::json!({ "removed": id }))
    } else {
        json_error(StatusCode::NOT_FOUND, "no such RTP-MIDI session or name")
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Send {
    midi: Vec<u8>,
}

/// `POST /api/rtpmidi/send {"midi": [144, 60, 100]}`: sends MIDI to every connected session.
pub(crate) fn send(shared: &Shared, body: &[u8]) -> Response {
    let h = match handle(shared) {
        Ok(h) => h,
        Err(r) => return *r,
    };
    let bytes = match serde_json::from_slice::<Send>(body) {
        Ok(s) => s.midi,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"midi\": [bytes]}}: {e}"),
            );
        }
    };
    match h.send_midi(&bytes) {
        Ok(n) => json_ok(&serde_json::json!({ "sessions": n })),
        Err(e) => json_error(StatusCode::BAD_REQUEST, &e),
    }
}
