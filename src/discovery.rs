//! How a worker learns which heads exist, and in which order to try them.
//!
//! Two sources, tried in the order given:
//! - [`Source::Heads`]: a bootstrap list of head addresses. The worker
//!   calls `ListHeads` on a head it knows (the last list first, then the
//!   bootstrap addresses, each DNS name counting as every address it
//!   resolves to) and gets the live heads in its preference order. The
//!   worker needs no Redis address or password.
//! - [`Source::Registry`]: the Redis registry, read directly, with the
//!   order computed here (rendezvous over the ready heads, then the
//!   stale ones). Kept for deployments that give workers Redis.
//!
//! The last list is kept: when no source answers, a worker that lost its
//! head still tries the heads it knew.

use crate::attach::AttachConfig;
use crate::pb::head_service_client::HeadServiceClient;
use crate::pb::{HeadState, ListHeadsRequest};
use crate::placement;
use crate::registry::{HeadEntry, Registry};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tracing::{debug, error};

/// One place to learn the heads from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `ListHeads` on the heads: these bootstrap addresses (host:port),
    /// then any head of the last list.
    Heads(Vec<String>),
    /// The Redis registry.
    Registry(Registry),
}

/// The sources and the last list they gave.
#[derive(Debug)]
pub struct Discovery {
    sources: Vec<Source>,
    /// The last list, in preference order, and the heads version it was
    /// read at (0 when unknown: a head too old to say).
    known: Mutex<(Vec<HeadEntry>, u64)>,
    /// Set once an old head (UNIMPLEMENTED) was reported, to say it once.
    told_unimplemented: AtomicBool,
}

impl From<Registry> for Discovery {
    fn from(registry: Registry) -> Self {
        Discovery::new(vec![Source::Registry(registry)])
    }
}

impl Discovery {
    /// Discovery through `sources`, tried in order.
    pub fn new(sources: Vec<Source>) -> Self {
        Self {
            sources,
            known: Mutex::new((Vec::new(), 0)),
            told_unimplemented: AtomicBool::new(false),
        }
    }

    /// The last list read, in preference order.
    pub fn known(&self) -> Vec<HeadEntry> {
        self.lock().0.clone()
    }

    /// True when a head reports a heads version other than the one the
    /// last list was read at, so the list should be read again. Only with
    /// the heads source first: re-reading the registry in every worker
    /// whenever a head joins or leaves would cost Redis a read per worker;
    /// a registry worker whose list is out of date reads it when it moves
    /// (see [`Discovery::known_at`]).
    pub fn outdated(&self, version: u64) -> bool {
        version != 0
            && matches!(self.sources.first(), Some(Source::Heads(_)))
            && self.lock().1 != version
    }

    /// The last list, if it was read at heads version `version` (0 is
    /// never a match): as current as a new read as far as heads joining
    /// and leaving go, since every registration, deregistration and sweep
    /// bumps the version, and `version` is what the worker's head beat
    /// last (at most about one interval old). A worker that lost its head
    /// moves on this list without asking anyone: no `ListHeads` call (a
    /// connection and a round trip) or registry read per move. What the
    /// list may not show is a state change that keeps the version (a head
    /// that began draining, or went stale): such a head refuses or does
    /// not answer, and the worker tries the next one, as it would with a
    /// fresh list that was read just before the change.
    pub fn known_at(&self, version: u64) -> Option<Vec<HeadEntry>> {
        let known = self.lock();
        (version != 0 && known.1 == version && !known.0.is_empty()).then(|| known.0.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<HeadEntry>, u64)> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the heads from the first source that answers, asking
    /// `ask_first` (the current head) first and never `avoid` (a head just
    /// lost). When no source answers, returns the last list if there is
    /// one: the heads it names may still be alive.
    pub async fn list(
        &self,
        cfg: &AttachConfig,
        ask_first: Option<&HeadEntry>,
        avoid: Option<&str>,
    ) -> Result<Vec<HeadEntry>, String> {
        let mut failures = Vec::new();
        for source in &self.sources {
            let read = match source {
                Source::Registry(registry) => registry
                    .live_heads_versioned()
                    .await
                    .map(|(heads, version)| (order_locally(&cfg.worker_id, heads), Some(version)))
                    .map_err(|e| format!("cannot read the registry: {e}")),
                Source::Heads(bootstrap) => self
                    .ask_heads(cfg, bootstrap, ask_first, avoid)
                    .await
                    .map(|(heads, version)| (heads, Some(version))),
            };
            match read {
                Ok((heads, version)) => {
                    let mut known = self.lock();
                    known.0 = heads.clone();
                    known.1 = version.unwrap_or(0);
                    return Ok(heads);
                }
                Err(e) => failures.push(e),
            }
        }
        let known: Vec<HeadEntry> = self
            .known()
            .into_iter()
            .filter(|h| Some(h.id.as_str()) != avoid)
            .collect();
        if known.is_empty() {
            return Err(failures.join("; "));
        }
        debug!(worker = %cfg.worker_id, errors = %failures.join("; "), "no head listed the heads; trying the last list");
        Ok(known)
    }

    /// `ListHeads` on the first head that answers: `ask_first`, the last
    /// list, then the bootstrap addresses.
    async fn ask_heads(
        &self,
        cfg: &AttachConfig,
        bootstrap: &[String],
        ask_first: Option<&HeadEntry>,
        avoid: Option<&str>,
    ) -> Result<(Vec<HeadEntry>, u64), String> {
        let mut addrs: Vec<String> = Vec::new();
        let mut push = |a: String| {
            if !a.is_empty() && !addrs.contains(&a) {
                addrs.push(a);
            }
        };
        if let Some(h) = ask_first {
            push(h.addr.clone());
        }
        for h in self.known() {
            if Some(h.id.as_str()) != avoid {
                push(h.addr);
            }
        }
        for entry in bootstrap {
            // With TLS the name must stay (the certificate names it); in
            // clear, every address a name resolves to is a head.
            if cfg.security.tls.is_some() {
                push(entry.clone());
                continue;
            }
            match tokio::time::timeout(cfg.connect_timeout, tokio::net::lookup_host(entry)).await {
                Ok(Ok(resolved)) => resolved.for_each(|a| push(a.to_string())),
                _ => push(entry.clone()),
            }
        }
        let mut failures = Vec::new();
        for addr in addrs {
            match self.list_at(cfg, &addr).await {
                Ok(found) => return Ok(found),
                Err(e) => failures.push(format!("{addr}: {e}")),
            }
        }
        Err(format!(
            "no head answered ListHeads (bootstrap {}): {}",
            bootstrap.join(","),
            failures.join("; ")
        ))
    }

    /// `ListHeads` on the head at `addr`.
    async fn list_at(
        &self,
        cfg: &AttachConfig,
        addr: &str,
    ) -> Result<(Vec<HeadEntry>, u64), String> {
        let channel = cfg
            .security
            .endpoint(addr)?
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.connect_timeout * 2)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut request = tonic::Request::new(ListHeadsRequest {
            worker_id: cfg.worker_id.clone(),
        });
        request.set_timeout(cfg.connect_timeout * 2);
        cfg.security.authorize(&mut request);
        let answer = HeadServiceClient::new(channel)
            .list_heads(request)
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::Unimplemented {
                    let why = format!("the head at {addr} does not implement ListHeads: it runs a tether-head older than this worker; upgrade it, or give this worker --redis-url");
                    if !self.told_unimplemented.swap(true, Ordering::Relaxed) {
                        error!(worker = %cfg.worker_id, "{why}");
                    }
                    why
                } else {
                    format!("{:?}: {}", s.code(), s.message())
                }
            })?
            .into_inner();
        let heads = answer
            .heads
            .into_iter()
            .map(|h| HeadEntry {
                state: match h.state() {
                    s @ (HeadState::Draining | HeadState::Stale) => s,
                    _ => HeadState::Ready,
                },
                id: h.head_id,
                addr: h.addr,
                assigned: h.load,
                started_ms: 0,
                capacity: h.capacity,
                metrics_addr: h.metrics_addr,
            })
            .collect();
        Ok((heads, answer.version))
    }
}

/// The order of a list read from Redis: ready heads in rendezvous order,
/// then stale ones (probably dead, but the registry may just be slow),
/// then draining ones.
fn order_locally(worker: &str, heads: Vec<HeadEntry>) -> Vec<HeadEntry> {
    let mut ordered = Vec::with_capacity(heads.len());
    for state in [HeadState::Ready, HeadState::Stale, HeadState::Draining] {
        let group: Vec<HeadEntry> = heads.iter().filter(|h| h.state == state).cloned().collect();
        ordered.extend(
            placement::rendezvous_order(worker, &group, |h| h.id.as_str())
                .into_iter()
                .cloned(),
        );
    }
    ordered
}
