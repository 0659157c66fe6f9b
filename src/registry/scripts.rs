//! The Lua scripts behind every multi-key change, so that each change is
//! atomic in Redis (and stays in one slot on Redis Cluster: every key
//! shares the namespace's hash tag).

use deadpool_redis::redis::Script;
use std::sync::LazyLock;

/// Creates or refreshes a head's lease.
///
/// KEYS: head hash, heads set, the head's worker set.
/// ARGV: head id, addr, lease ms, started ms, state.
/// Returns 1 if the lease still existed (a refresh), 0 if it was created.
pub static REFRESH_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local existed = redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], 'addr', ARGV[2], 'started_ms', ARGV[4], 'state', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return existed
"#,
    )
});

/// Removes a head at once (clean exit).
///
/// KEYS: head hash, heads set, the head's worker set. ARGV: head id.
pub static DEREGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"#,
    )
});

/// Lists live heads and prunes ids whose lease expired.
///
/// KEYS: heads set. ARGV: head key prefix, worker-set key prefix.
/// Returns a flat list: id, addr, state, assigned workers, for each head.
pub static LIVE_HEADS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HMGET', ARGV[1] .. id, 'addr', 'state')
  if h[1] then
    table.insert(out, id)
    table.insert(out, h[1])
    table.insert(out, h[2] or 'ready')
    table.insert(out, redis.call('SCARD', ARGV[2] .. id))
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"#,
    )
});

/// Assigns a worker to a head under a fresh epoch.
///
/// KEYS: head hash, worker hash, epoch counter, the head's worker set.
/// ARGV: head id, worker id, since ms, worker addr, worker-set key prefix,
/// lease ms.
/// Fails with `NOLEASE` when the head holds no lease.
pub static ASSIGN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOLEASE head holds no lease')
end
local prev = redis.call('HGET', KEYS[2], 'head')
if prev and prev ~= ARGV[1] then
  redis.call('SREM', ARGV[5] .. prev, ARGV[2])
end
local epoch = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[2], 'head', ARGV[1], 'epoch', epoch, 'since_ms', ARGV[3], 'addr', ARGV[4])
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
return epoch
"#,
    )
});

/// Drops an assignment, but only if it is still the given head's at the
/// given epoch: a late release never undoes a newer assignment.
///
/// KEYS: worker hash, the head's worker set. ARGV: head id, epoch, worker id.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local a = redis.call('HMGET', KEYS[1], 'head', 'epoch')
if a[1] == ARGV[1] and a[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[3])
  return 1
end
return 0
"#,
    )
});
