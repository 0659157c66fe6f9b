//! Membership events (worker attached, left, moved; head joined, draining,
//! gone), carried between heads by Redis pub/sub so that watching any one
//! head shows the whole cluster.
//!
//! Publishing never blocks the caller: events go through a bounded queue
//! and are dropped (and counted in the log) if Redis cannot keep up.
//! Watchers read from a bounded broadcast; one that falls behind is cut
//! off rather than buffered without bound.

use crate::backoff::Backoff;
use crate::pb::{ClusterEvent, EventKind};
use crate::registry::{now_ms, Registry};
use crate::shutdown::Shutdown;
use prost::Message;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tracing::{debug, warn};

/// Events waiting to be published; beyond this they are dropped.
const PUBLISH_QUEUE: usize = 4096;

/// Events a slow watcher may lag behind before it is cut off.
pub const WATCH_BUFFER: usize = 1024;

/// A head's handle on the event flow. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Events {
    publish: mpsc::Sender<ClusterEvent>,
    hub: broadcast::Sender<ClusterEvent>,
}

impl Events {
    /// Starts the publisher and the subscriber; both stop at `shutdown`.
    pub fn start(registry: Registry, shutdown: Shutdown) -> Self {
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        let (hub, _) = broadcast::channel(WATCH_BUFFER);
        tokio::spawn(publish_loop(registry.clone(), queue, shutdown.clone()));
        tokio::spawn(subscribe_loop(registry, hub.clone(), shutdown));
        Self { publish, hub }
    }

    /// Publishes an event; never waits.
    pub fn emit(
        &self,
        kind: EventKind,
        head_id: &str,
        worker_id: &str,
        epoch: u64,
        previous_head_id: &str,
        detail: &str,
    ) {
        let event = ClusterEvent {
            at_ms: now_ms(),
            kind: kind as i32,
            head_id: head_id.to_owned(),
            worker_id: worker_id.to_owned(),
            epoch,
            previous_head_id: previous_head_id.to_owned(),
            detail: detail.to_owned(),
        };
        if self.publish.try_send(event).is_err() {
            debug!("event queue full; dropping an event");
        }
    }

    /// A receiver of every event published from now on.
    pub fn watch(&self) -> broadcast::Receiver<ClusterEvent> {
        self.hub.subscribe()
    }
}

async fn publish_loop(
    registry: Registry,
    mut queue: mpsc::Receiver<ClusterEvent>,
    mut shutdown: Shutdown,
) {
    loop {
        let event = tokio::select! {
            e = queue.recv() => match e { Some(e) => e, None => return },
            // Drain what is queued (the final "head gone") before leaving.
            _ = shutdown.wait() => {
                while let Ok(e) = queue.try_recv() {
                    let _ = registry.publish_event(e.encode_to_vec()).await;
                }
                return;
            }
        };
        if let Err(e) = registry.publish_event(event.encode_to_vec()).await {
            debug!(error = %e, "cannot publish an event");
        }
    }
}

async fn subscribe_loop(
    registry: Registry,
    hub: broadcast::Sender<ClusterEvent>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 17);
    let mut failures = 0u64;
    loop {
        let stream = tokio::select! {
            s = registry.subscribe_events() => s,
            _ = shutdown.wait() => return,
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                let delay = backoff.next_delay();
                failures += 1;
                if failures % 10 == 3 {
                    warn!(error = %e, failures, "cannot subscribe to membership events; WatchEvents is silent until this works; retrying");
                } else {
                    debug!(error = %e, retry_in = ?delay, "cannot subscribe to events");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.wait() => return,
                }
            }
        };
        backoff.reset();
        failures = 0;
        let mut moved = registry.topology_changes();
        moved.borrow_and_update();
        loop {
            let message = tokio::select! {
                m = stream.next() => m,
                _ = moved.changed() => {
                    warn!("the Redis master moved; resubscribing to events there");
                    break;
                }
                _ = shutdown.wait() => return,
            };
            let Some(message) = message else {
                warn!("event subscription closed; resubscribing");
                break;
            };
            match ClusterEvent::decode(message.get_payload_bytes()) {
                // No watcher is not an error.
                Ok(event) => drop(hub.send(event)),
                Err(e) => debug!(error = %e, "ignoring an undecodable event"),
            }
        }
    }
}
