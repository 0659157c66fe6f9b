//! Membership events (worker attached, left, moved; head joined, draining,
//! gone), carried between heads by Redis pub/sub so that watching any one
//! head shows the whole cluster.
//!
//! Publishing never blocks the caller: events go through a bounded queue
//! and are dropped (and counted in the log) if Redis cannot keep up; what
//! is queued goes out in one pipelined round trip. Watchers read from a
//! bounded broadcast; one that falls behind is cut off rather than
//! buffered without bound.
//!
//! A head subscribes only while someone watches it. Every head used to
//! receive and decode every event of the cluster, two per worker move, for
//! no reader at all.

use crate::backoff::Backoff;
use crate::pb::{ClusterEvent, EventKind};
use crate::registry::{now_ms, Registry};
use crate::shutdown::Shutdown;
use prost::Message;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::StreamExt;
use tracing::{debug, warn};

/// Events waiting to be published; beyond this they are dropped.
const PUBLISH_QUEUE: usize = 4096;

/// Events a slow watcher may lag behind before it is cut off.
pub const WATCH_BUFFER: usize = 1024;

/// Events published in one round trip, at most.
const PUBLISH_BATCH: usize = 256;

/// How often a subscribed head checks whether anyone still watches.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// A head's handle on the event flow. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Events {
    publish: mpsc::Sender<ClusterEvent>,
    hub: broadcast::Sender<ClusterEvent>,
    /// Whether the subscription is up; `watch` wakes the subscriber.
    subscribed: watch::Sender<bool>,
}

impl Events {
    /// Starts the publisher and the subscriber; both stop at `shutdown`.
    pub fn start(registry: Registry, shutdown: Shutdown) -> Self {
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        let (hub, _) = broadcast::channel(WATCH_BUFFER);
        let subscribed = watch::Sender::new(false);
        tokio::spawn(publish_loop(registry.clone(), queue, shutdown.clone()));
        tokio::spawn(subscribe_loop(
            registry,
            hub.clone(),
            subscribed.clone(),
            shutdown,
        ));
        Self {
            publish,
            hub,
            subscribed,
        }
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

    /// A receiver of every event published from now on. Subscribes to
    /// the cluster's events first if this head is not yet, waiting up to
    /// `within` for that (Redis may be away; events then start once it is
    /// back).
    pub async fn watch(&self, within: Duration) -> broadcast::Receiver<ClusterEvent> {
        let receiver = self.hub.subscribe();
        // The subscriber waits for a receiver; tell it one is here.
        self.subscribed.send_modify(|_| {});
        let mut up = self.subscribed.subscribe();
        let _ = tokio::time::timeout(within, up.wait_for(|s| *s)).await;
        receiver
    }
}

async fn publish_loop(
    registry: Registry,
    mut queue: mpsc::Receiver<ClusterEvent>,
    mut shutdown: Shutdown,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        let stopping = tokio::select! {
            n = queue.recv_many(&mut batch, PUBLISH_BATCH) => {
                if n == 0 {
                    return;
                }
                false
            }
            // Send what is queued (the final "head gone") before leaving.
            _ = shutdown.wait() => {
                while let Ok(e) = queue.try_recv() {
                    batch.push(e);
                }
                true
            }
        };
        if !batch.is_empty() {
            let payloads = batch.drain(..).map(|e| e.encode_to_vec()).collect();
            if let Err(e) = registry.publish_events(payloads).await {
                debug!(error = %e, "cannot publish events");
            }
        }
        if stopping {
            return;
        }
    }
}

async fn subscribe_loop(
    registry: Registry,
    hub: broadcast::Sender<ClusterEvent>,
    subscribed: watch::Sender<bool>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 17);
    let mut failures = 0u64;
    let mut wanted = subscribed.subscribe();
    loop {
        subscribed.send_replace(false);
        // Nobody watches: stay unsubscribed until someone does.
        while hub.receiver_count() == 0 {
            tokio::select! {
                changed = wanted.changed() => if changed.is_err() { return },
                _ = shutdown.wait() => return,
            }
        }
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
        subscribed.send_replace(true);
        wanted.borrow_and_update();
        let mut moved = registry.topology_changes();
        moved.borrow_and_update();
        let mut idle = tokio::time::interval(IDLE_CHECK);
        idle.tick().await;
        loop {
            let message = tokio::select! {
                m = stream.next() => m,
                _ = moved.changed() => {
                    warn!("the Redis master moved; resubscribing to events there");
                    break;
                }
                _ = idle.tick() => {
                    if hub.receiver_count() == 0 {
                        debug!("nobody watches events any more; unsubscribing");
                        break;
                    }
                    continue;
                }
                _ = shutdown.wait() => return,
            };
            let Some(message) = message else {
                warn!("event subscription closed; resubscribing");
                break;
            };
            match ClusterEvent::decode(message.get_payload_bytes()) {
                // A watcher that left meanwhile is not an error.
                Ok(event) => drop(hub.send(event)),
                Err(e) => debug!(error = %e, "ignoring an undecodable event"),
            }
        }
    }
}
