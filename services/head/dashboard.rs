//! The head's live cluster view in the browser, served next to `/metrics`
//! on `--metrics-listen`: operators like to look rather than read, and
//! `tetherctl status` is a snapshot.
//!
//! `GET /` is one self-contained page (`dashboard.html`, compiled in: no
//! build step, nothing fetched from elsewhere). It reads three endpoints:
//!
//! - `GET /api/cluster`: the heads as this head last read the registry
//!   (the `ListHeads` snapshot, so a page costs Redis nothing more), with
//!   the bounded-load limit;
//! - `GET /api/workers?head=ID&after=W&limit=N`: one page of a head's
//!   workers; this head's own from its stream table, another head's by
//!   one `ListWorkers` call to it, so that the page talks to one origin;
//! - `GET /api/events`: server-sent events: the cluster's membership
//!   events (the head subscribes to them while someone watches, as for
//!   `WatchEvents`) and a heads snapshot every beat interval.
//!
//! With `--auth-token-file`, the endpoints (not the page, which holds no
//! data) want the token as `Authorization: Bearer` or, for `EventSource`,
//! which cannot send headers, as the `token` query parameter; compared in
//! constant time like the gRPC token. Everything is bounded: pages of
//! workers, open event streams, concurrent `ListWorkers` calls.

use super::attached::Attached;
use super::heads_view::HeadsView;
use super::lease::LeaseState;
use crate::events::Events;
use crate::pb::head_service_client::HeadServiceClient;
use crate::pb::{ClusterEvent, EventKind, ListWorkersRequest, WorkerInfo};
use crate::placement;
use crate::registry::now_ms;
use crate::security::{ClientSecurity, Token};
use crate::shutdown::Shutdown;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

/// The page: HTML, CSS and JavaScript in one file.
const PAGE: &str = include_str!("dashboard.html");

/// Event streams open at once; a page holds one.
const MAX_WATCHERS: usize = 16;

/// `ListWorkers` calls to other heads in flight at once.
const MAX_PROXIED: usize = 4;

/// Workers per page when the page does not say; and the most it may ask.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 500;

/// Bound on one `ListWorkers` call to another head, connecting included.
const PROXY_TIMEOUT: Duration = Duration::from_secs(3);

/// Server-sent events queued for one page before the event flow waits
/// (and the broadcast behind it lags, which the page is told of).
const SSE_QUEUE: usize = 64;

/// What the dashboard reads. Built once by `run`.
pub struct Dashboard {
    /// This head's id.
    pub head_id: String,
    /// Where this head serves the dashboard, as written into its lease.
    pub metrics_addr: String,
    /// ε of the load bound, in thousandths.
    pub slack_permille: u32,
    /// This head's `--capacity`, known first-hand.
    pub capacity: u64,
    /// How often a page gets a fresh heads snapshot.
    pub snapshot_every: Duration,
    /// The heads, as `ListHeads` reads them.
    pub heads: Arc<HeadsView>,
    /// This head's open streams.
    pub attached: Arc<Attached>,
    /// The cluster's membership events.
    pub events: Events,
    /// Whether this head drains.
    pub lease: Arc<LeaseState>,
    /// The shared token, when one is configured.
    pub token: Option<Token>,
    /// How to dial other heads for their workers.
    pub client: ClientSecurity,
    /// Bounds the open event streams.
    pub watchers: Arc<Semaphore>,
    /// Bounds the calls to other heads.
    pub proxied: Arc<Semaphore>,
    /// Ends the event streams when the head closes.
    pub closing: Shutdown,
}

impl Dashboard {
    /// The semaphores at their bounds.
    pub fn limits() -> (Arc<Semaphore>, Arc<Semaphore>) {
        (
            Arc::new(Semaphore::new(MAX_WATCHERS)),
            Arc::new(Semaphore::new(MAX_PROXIED)),
        )
    }
}

/// The dashboard's routes, to merge with `/metrics`. The token is
/// checked by a layer in front of the data, as the gRPC port's is; the
/// page itself holds none and stays open, so that it can ask for it.
pub fn routes(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/api/cluster", get(cluster))
        .route("/api/workers", get(workers))
        .route("/api/events", get(events))
        .route_layer(middleware::from_fn_with_state(
            dashboard.clone(),
            require_token,
        ))
        .route("/", get(page))
        .with_state(dashboard)
}

/// Refuses a request to the data without the token, when one is
/// configured.
async fn require_token(State(d): State<Arc<Dashboard>>, request: Request, next: Next) -> Response {
    match check_token(&d, request.headers(), request.uri()) {
        Ok(()) => next.run(request).await,
        Err(why) => refusal(why),
    }
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // The page loads nothing from anywhere and talks to its own
            // origin only; links to other heads are navigations.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

/// The value of `name` in the query of `uri`, percent-decoded.
fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Decodes `%XX`; leaves a `+` as it is (tokens may hold one, and have
/// no spaces to encode).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a request carries the token, when one is configured; if not,
/// why not.
fn check_token(d: &Dashboard, headers: &HeaderMap, uri: &Uri) -> Result<(), &'static str> {
    let Some(token) = &d.token else {
        return Ok(());
    };
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(<[u8]>::to_vec);
    let presented = from_header.or_else(|| query_param(uri, "token").map(String::into_bytes));
    match presented {
        Some(p) if token.matches(&p) => Ok(()),
        Some(_) => Err("the token is wrong"),
        None => Err(
            "this head requires its --auth-token-file token: send `Authorization: Bearer TOKEN` or ?token=TOKEN",
        ),
    }
}

fn refusal(why: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({ "error": why })),
    )
        .into_response()
}

fn unavailable(why: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": why })),
    )
        .into_response()
}

/// The heads and the load bound, as JSON.
async fn cluster_json(d: &Dashboard) -> Result<Value, String> {
    let snapshot = d
        .heads
        .snapshot()
        .await
        .map_err(|e| format!("head {} cannot read the heads: {e}", d.head_id))?;
    let heads = &snapshot.heads;
    let ready = heads
        .iter()
        .filter(|h| h.state == crate::pb::HeadState::Ready)
        .count() as u64;
    let total: u64 = heads.iter().map(|h| h.assigned).sum();
    let bound = placement::load_bound(total, ready, d.slack_permille);
    let list: Vec<Value> = heads
        .iter()
        .map(|h| {
            let own = h.id == d.head_id;
            json!({
                "id": h.id,
                "addr": h.addr,
                "metrics_addr": h.metrics_addr,
                "state": crate::registry::head_state_name(h.state),
                "load": h.assigned,
                "capacity": if own { d.capacity } else { h.capacity },
                "started_ms": h.started_ms,
                "self": own,
            })
        })
        .collect();
    Ok(json!({
        "head_id": d.head_id,
        "metrics_addr": d.metrics_addr,
        "draining": d.lease.draining(),
        "streams": d.attached.len(),
        "now_ms": now_ms(),
        "age_ms": u64::try_from(snapshot.read_at.elapsed().as_millis()).unwrap_or(u64::MAX),
        "total": total,
        "ready": ready,
        "bound": bound,
        "slack": f64::from(d.slack_permille) / 1000.0,
        "heads": list,
    }))
}

async fn cluster(State(d): State<Arc<Dashboard>>) -> Response {
    match cluster_json(&d).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => unavailable(e),
    }
}

fn worker_json(w: &WorkerInfo) -> Value {
    json!({
        "id": w.worker_id,
        "epoch": w.epoch.to_string(),
        "since_ms": w.attached_since_ms,
        "last_beat_ms": w.last_beat_ms,
        "addr": w.worker_addr,
        "load": w.load,
    })
}

/// One page of a head's workers.
async fn workers(State(d): State<Arc<Dashboard>>, uri: Uri) -> Response {
    let head = query_param(&uri, "head").unwrap_or_else(|| d.head_id.clone());
    let after = query_param(&uri, "after").unwrap_or_default();
    let limit = query_param(&uri, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(DEFAULT_PAGE)
        .clamp(1, MAX_PAGE);
    if head == d.head_id {
        let page = d.attached.list(&after, limit);
        let next = if page.len() == limit {
            page.last().map(|w| w.worker_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        return Json(json!({
            "head_id": head,
            "total": d.attached.len(),
            "now_ms": now_ms(),
            "workers": page.iter().map(worker_json).collect::<Vec<_>>(),
            "next": next,
        }))
        .into_response();
    }
    // Another head: ask it, once, bounded in time and in calls at once.
    let Ok(_permit) = d.proxied.clone().try_acquire_owned() else {
        return unavailable("too many worker listings in flight; try again".into());
    };
    let snapshot = match d.heads.snapshot().await {
        Ok(s) => s,
        Err(e) => return unavailable(format!("cannot read the heads: {e}")),
    };
    let Some(entry) = snapshot.heads.iter().find(|h| h.id == head) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no live head {head:?}") })),
        )
            .into_response();
    };
    let call = async {
        let endpoint = d
            .client
            .endpoint(&entry.addr)?
            .connect_timeout(PROXY_TIMEOUT)
            .timeout(PROXY_TIMEOUT);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot reach head {head} at {}: {e}", entry.addr))?;
        let mut request = tonic::Request::new(ListWorkersRequest {
            page_size: u32::try_from(limit).unwrap_or(500),
            page_token: after.clone(),
        });
        d.client.authorize(&mut request);
        HeadServiceClient::new(channel)
            .list_workers(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("head {head} answered {:?}: {}", s.code(), s.message()))
    };
    match tokio::time::timeout(PROXY_TIMEOUT * 2, call).await {
        Ok(Ok(answer)) => Json(json!({
            "head_id": answer.head_id,
            "total": entry.assigned,
            "now_ms": now_ms(),
            "workers": answer.workers.iter().map(worker_json).collect::<Vec<_>>(),
            "next": answer.next_page_token,
        }))
        .into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(_) => unavailable(format!("head {head} did not answer in time")),
    }
}

/// A membership event as the page reads it.
fn event_json(e: &ClusterEvent) -> Value {
    let kind = match EventKind::try_from(e.kind).unwrap_or(EventKind::Unspecified) {
        EventKind::WorkerAttached => "attached",
        EventKind::WorkerLeft => "left",
        EventKind::WorkerMoved => "moved",
        EventKind::HeadJoined => "head_joined",
        EventKind::HeadDraining => "head_draining",
        EventKind::HeadGone => "head_gone",
        EventKind::Unspecified => "unknown",
    };
    json!({
        "at_ms": e.at_ms,
        "kind": kind,
        "head": e.head_id,
        "worker": e.worker_id,
        "epoch": e.epoch.to_string(),
        "previous": e.previous_head_id,
        "detail": e.detail,
    })
}

/// The live stream: `cluster` snapshots and membership `event`s.
async fn events(State(d): State<Arc<Dashboard>>) -> Response {
    let Ok(permit) = d.watchers.clone().try_acquire_owned() else {
        return unavailable(format!(
            "{MAX_WATCHERS} dashboards already watch this head; close one or open another head's"
        ));
    };
    // Subscribed before the response starts, as `WatchEvents` does.
    let mut feed = d.events.watch(Duration::from_secs(2)).await;
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(SSE_QUEUE);
    let mut closing = d.closing.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut snapshots = tokio::time::interval(d.snapshot_every);
        snapshots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                _ = closing.wait() => return,
                _ = tx.closed() => return,
                _ = snapshots.tick() => match cluster_json(&d).await {
                    Ok(v) => Event::default().event("cluster").data(v.to_string()),
                    Err(e) => Event::default().event("trouble").data(json!({ "error": e }).to_string()),
                },
                e = feed.recv() => match e {
                    Ok(e) => Event::default().event("event").data(event_json(&e).to_string()),
                    // Too far behind (a failover of thousands): say how
                    // many were skipped and go on from the newest.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        Event::default().event("lagged").data(n.to_string())
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(Ok(event)).await.is_err() {
                debug!("dashboard: a page went away");
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let uri: Uri = "/api/workers?head=head%2D1&after=&token=a%2Bb%25c+d"
            .parse()
            .unwrap();
        assert_eq!(query_param(&uri, "head").as_deref(), Some("head-1"));
        assert_eq!(query_param(&uri, "after").as_deref(), Some(""));
        assert_eq!(query_param(&uri, "token").as_deref(), Some("a+b%c+d"));
        assert_eq!(query_param(&uri, "limit"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
