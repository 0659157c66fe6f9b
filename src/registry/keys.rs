//! The Redis key layout. Every key starts with the same hash tag
//! (`{namespace}`), so a whole cluster's state sits in one Redis Cluster
//! slot and the Lua scripts may touch several keys atomically.
//!
//! | key                          | type   | holds                                          |
//! |------------------------------|--------|------------------------------------------------|
//! | `{ns}:heads`                 | set    | ids of heads that registered (pruned lazily)   |
//! | `{ns}:head:<head>`           | hash   | `addr`, `state`, `started_ms`; TTL = the lease |
//! | `{ns}:assigned:<head>`       | hash   | worker id -> `epoch|instance|state|addr` of the workers assigned to that head; TTL = the lease |
//! | `{ns}:fence:<head>`          | list   | `epoch:worker` of workers taken from the head; TTL = the lease |
//! | `{ns}:epoch`                 | string | counter that hands out every epoch             |
//! | `{ns}:heads-version`         | string | counter bumped when a head joins or leaves     |
//! | `{ns}:loads`                 | string | the last sweep's load digest; TTL = a lease TTL |
//!
//! A worker's assignment lives in its head's `assigned` hash, not in a key
//! of its own: it expires with the head's lease, so a head that dies
//! together with its workers (a node loss) leaves nothing behind, and no
//! key grows with the number of worker ids ever seen. Finding a worker's
//! head means reading each live head's hash (the scripts do it; there are
//! tens of heads, not thousands).
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

    /// Prefix of a head's assignment hash; the head id follows.
    pub fn assigned_prefix(&self) -> String {
        format!("{}:assigned:", self.prefix)
    }

    /// The hash of the workers assigned to a head.
    pub fn assigned(&self, head_id: &str) -> String {
        format!("{}{head_id}", self.assigned_prefix())
    }

    /// Prefix of a head's fence list; the head id follows.
    pub fn fence_prefix(&self) -> String {
        format!("{}:fence:", self.prefix)
    }

    /// The fencing notices left for a head: workers other heads took.
    pub fn fence(&self, head_id: &str) -> String {
        format!("{}{head_id}", self.fence_prefix())
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

    /// The load digest the last sweep wrote (`W R least live`), which
    /// every refresh reads back in the same `MGET` as the heads version.
    /// It lives one lease TTL: the refresh that finds it gone sweeps, so
    /// one head sweeps per lease TTL for the whole cluster.
    pub fn loads(&self) -> String {
        format!("{}:loads", self.prefix)
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
            k.assigned("h:*"),
            k.fence("h{2}"),
            k.epoch(),
            k.heads_version(),
            k.loads(),
        ] {
            assert!(key.starts_with("{tether}:"), "{key}");
        }
    }

    #[test]
    fn kinds_cannot_collide() {
        let k = Keys::new("t");
        assert_ne!(k.head("a:assigned"), k.assigned("a"));
        assert_ne!(k.assigned("x"), k.head("x"));
        assert_ne!(k.fence("x"), k.assigned("x"));
    }
}
