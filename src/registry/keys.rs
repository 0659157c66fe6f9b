//! The Redis key layout. Every key starts with the same hash tag
//! (`{namespace}`), so a whole cluster's state sits in one Redis Cluster
//! slot and the Lua scripts may touch several keys atomically.
//!
//! | key                          | type   | holds                                          |
//! |------------------------------|--------|------------------------------------------------|
//! | `{ns}:heads`                 | set    | ids of heads that registered (pruned lazily)   |
//! | `{ns}:head:<head>`           | hash   | `addr`, `state`, `started_ms`; TTL = the lease |
//! | `{ns}:workers-of:<head>`     | set    | worker ids assigned to that head; TTL = lease  |
//! | `{ns}:fence:<head>`          | list   | `epoch:worker` of workers taken from the head  |
//! | `{ns}:worker:<worker>`       | hash   | `head`, `epoch`, `since_ms`, `addr`            |
//! | `{ns}:epoch`                 | string | counter that hands out every epoch             |
//!
//! Each kind of key has its own second segment, so no id (whatever
//! `:`, `*` or `{` it holds) can make one kind of key collide with another.

/// Builds key names for one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `{namespace}`.
    pub fn new(namespace: &str) -> Self {
        Self {
            prefix: format!("{{{namespace}}}"),
        }
    }

    /// The set of registered head ids.
    pub fn heads(&self) -> String {
        format!("{}:heads", self.prefix)
    }

    /// Prefix of a head's lease key; the id follows.
    pub fn head_prefix(&self) -> String {
        format!("{}:head:", self.prefix)
    }

    /// A head's lease hash.
    pub fn head(&self, head_id: &str) -> String {
        format!("{}{head_id}", self.head_prefix())
    }

    /// Prefix of a head's worker set; the head id follows.
    pub fn workers_of_prefix(&self) -> String {
        format!("{}:workers-of:", self.prefix)
    }

    /// The set of workers assigned to a head.
    pub fn workers_of(&self, head_id: &str) -> String {
        format!("{}{head_id}", self.workers_of_prefix())
    }

    /// Prefix of a head's fence list; the head id follows.
    pub fn fence_prefix(&self) -> String {
        format!("{}:fence:", self.prefix)
    }

    /// The fencing notices left for a head: workers other heads took.
    pub fn fence(&self, head_id: &str) -> String {
        format!("{}{head_id}", self.fence_prefix())
    }

    /// Prefix of a worker's assignment hash; the worker id follows.
    pub fn worker_prefix(&self) -> String {
        format!("{}:worker:", self.prefix)
    }

    /// A worker's assignment hash.
    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}{worker_id}", self.worker_prefix())
    }

    /// The pub/sub channel of membership events.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// The epoch counter.
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    /// A counter bumped whenever a head registers (its lease is created)
    /// or deregisters, so heads learn of a new head without reading the
    /// registry every interval.
    pub fn heads_version(&self) -> String {
        format!("{}:heads-version", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_shares_the_hash_tag() {
        let k = Keys::new("tether");
        for key in [
            k.heads(),
            k.head("h{1}"),
            k.workers_of("h:*"),
            k.worker("w{x}"),
            k.epoch(),
            k.heads_version(),
        ] {
            assert!(key.starts_with("{tether}:"), "{key}");
        }
    }

    #[test]
    fn kinds_cannot_collide() {
        let k = Keys::new("t");
        assert_ne!(k.head("a:workers"), k.workers_of("a"));
        assert_ne!(k.worker("x"), k.head("x"));
    }
}
