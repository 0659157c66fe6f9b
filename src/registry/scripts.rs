//! The Lua scripts behind every multi-key change, so that each change is
//! atomic in Redis (and stays in one slot on Redis Cluster: every key
//! shares the namespace's hash tag).
//!
//! Epochs never pass through a Lua number: Redis runs Lua 5.1, whose
//! numbers are doubles printed with `%.14g`, so an epoch seeded from the
//! clock (about 1.8e15) would print as `1.795931484307e+15` and anything
//! above 2^53 would not even be exact. The counter is read back with `GET`
//! after `INCR`, kept as a decimal string, compared with [`LIB`]'s
//! `newer`, and returned to Rust as a string.
//!
//! An assignment is one field of the head's `assigned` hash: the worker
//! id, and `epoch|instance|state|addr`, where `instance` names the worker
//! process (so a second process under the same id is told apart), `state`
//! is `p` (adopted, stream not open yet) or `s` (streaming), and `addr` is
//! where the worker serves `WorkerService`.

use deadpool_redis::redis::Script;
use std::sync::LazyLock;

/// Helpers every assignment script starts with.
const LIB: &str = r#"
-- Decimal strings of digits, compared as the integers they are.
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
-- An assignment's value: epoch, instance, state, addr.
local function parse(v)
  if not v then return nil end
  local e, i, s, a = string.match(v, '^(%d+)|([^|]*)|(%a)|(.*)$')
  if not e then return nil end
  return {epoch = e, instance = i, state = s, addr = a}
end
local function value(epoch, instance, state, addr)
  return epoch .. '|' .. instance .. '|' .. state .. '|' .. addr
end
-- A lease whose TTL ran down past half belongs to a head that is probably
-- gone (crashed, hung, cut off): "stale", tried last and not counted.
local function head_state(key)
  local h = redis.call('HMGET', key, 'state', 'ttl_ms', 'addr', 'started_ms', 'capacity', 'metrics_addr')
  if not h[1] then return nil, nil, nil, nil, nil end
  local state = h[1]
  local ttl = tonumber(h[2] or '0')
  local pttl = redis.call('PTTL', key)
  if state == 'ready' and ttl > 0 and pttl >= 0 and pttl < ttl / 2 then
    state = 'stale'
  end
  return state, h[3], h[4], h[5], h[6]
end
-- The epoch counter as a string, seeded from `seed` when Redis lost it
-- (fresh, restarted or flushed), far above any epoch handed out before.
local function ensure_counter(key, seed)
  if redis.call('EXISTS', key) == 0 then redis.call('SET', key, seed) end
end
"#;

fn with_lib(body: &str) -> Script {
    Script::new(&format!("{LIB}\n{body}"))
}

/// Creates or refreshes a head's lease, hands the head the fencing
/// notices other heads left for it (see [`ASSIGN`]), and, when it is the
/// head's turn, sweeps the registry for expired heads.
///
/// The sweep is what keeps a head's Redis cost independent of the number
/// of heads. The load digest `{ns}:loads` lives one lease TTL; the refresh
/// that finds it gone (it reads it in the same `MGET` as the heads
/// version, so looking costs nothing) sweeps: it reads every lease,
/// removes the ids whose lease expired from the heads set (bumping the
/// heads version, so that every head notices at its next refresh) and
/// writes the digest again. Scripts run one at a time, so one head sweeps
/// per lease TTL for the whole cluster.
///
/// KEYS: 1 head hash, 2 heads set, 3 the head's assignment hash, 4 the
/// head's fence list, 5 the heads version counter, 6 the load digest.
/// ARGV: 1 head id, 2 addr, 3 lease ms, 4 started ms, 5 state, 6 write
/// (`1`: write the lease's fields even though it exists: the process's
/// first refresh, or a new state), 7 instance (a random token naming the
/// head process), 8 head key prefix, 9 assignment-hash key prefix,
/// 10 capacity (0: none; written with the other fields, for `ListHeads`),
/// 11 metrics address (host:port of `--metrics-listen`, where the head
/// serves `/metrics` and the dashboard; empty when it serves neither).
/// Returns `{existed, heads version, assigned, digest, {gone...},
/// fence...}`: existed is 1 if the lease still existed (a refresh), 0 if
/// it was created; assigned is how many workers the registry counts for
/// the head; digest is `W R least live` (workers assigned to live heads,
/// ready heads, the least load of a ready head, live heads); gone are the
/// expired heads this call removed (this head announces them); each fence
/// entry is `epoch:worker`.
///
/// Fails with `FOREIGN pttl addr`, touching nothing, when the lease names
/// another instance: a second process under this head id, or one that
/// took the id while this process's lease had lapsed. The head decides
/// (see `services/head/lease.rs`): wait for a crashed predecessor's lease
/// to run out, or refuse to start.
pub static REFRESH_LEASE: LazyLock<Script> = LazyLock::new(|| {
    with_lib(
        r#"
-- Runs once an interval per head: a quiet refresh is HGET, PEXPIRE,
-- MGET, PEXPIRE, HLEN and LRANGE. PEXPIRE answers 0 when the lease is
-- gone.
local holder = redis.call('HGET', KEYS[1], 'instance')
if holder and holder ~= '' and holder ~= ARGV[7] then
  local addr = redis.call('HGET', KEYS[1], 'addr') or ''
  return redis.error_reply(string.format('FOREIGN %d ', redis.call('PTTL', KEYS[1])) .. addr)
end
local existed, version, digest = 1, nil, nil
local function write()
  redis.call('HSET', KEYS[1], 'addr', ARGV[2], 'started_ms', ARGV[4], 'state', ARGV[5], 'ttl_ms', ARGV[3], 'instance', ARGV[7], 'capacity', ARGV[10], 'metrics_addr', ARGV[11] or '')
end
if redis.call('PEXPIRE', KEYS[1], ARGV[3]) == 0 then
  existed = 0
  write()
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  -- The id leaves the heads set only once a sweep found its lease
  -- expired, or at deregistration.
  redis.call('SADD', KEYS[2], ARGV[1])
  version = redis.call('INCR', KEYS[5])
else
  local restarted = false
  if ARGV[6] == '1' then
    -- A head restarted under the same id within its old lease is new.
    restarted = redis.call('HGET', KEYS[1], 'started_ms') ~= ARGV[4]
    write()
  end
  if restarted then
    version = redis.call('INCR', KEYS[5])
  else
    local both = redis.call('MGET', KEYS[5], KEYS[6])
    version = tonumber(both[1] or '0')
    digest = both[2] or ''
  end
end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
local assigned = redis.call('HLEN', KEYS[3])
if not digest then digest = redis.call('GET', KEYS[6]) or '' end
local gone = {}
if digest == '' then
  -- The digest expired: this head's turn to sweep, once per lease TTL
  -- for the whole cluster. W and the ready heads are counted as ASSIGN
  -- counts them.
  local total, ready, live, least = 0, 0, 0, -1
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local state = head_state(ARGV[8] .. id)
    if state then
      local load = redis.call('HLEN', ARGV[9] .. id)
      live = live + 1
      total = total + load
      if state == 'ready' then
        ready = ready + 1
        if least < 0 or load < least then least = load end
      end
    else
      -- Removed here and only here (or by DEREGISTER), atomically: the
      -- head whose sweep removes an id is the one that announces it.
      redis.call('SREM', KEYS[2], id)
      table.insert(gone, id)
    end
  end
  if #gone > 0 then version = redis.call('INCR', KEYS[5]) end
  if least < 0 then least = 0 end
  digest = string.format('%d %d %d %d', total, ready, least, live)
  redis.call('SET', KEYS[6], digest, 'PX', ARGV[3])
end
local out = {existed, version, assigned, digest, gone}
local fenced = redis.call('LRANGE', KEYS[4], 0, -1)
if #fenced > 0 then
  redis.call('DEL', KEYS[4])
  for _, f in ipairs(fenced) do table.insert(out, f) end
end
return out
"#,
    )
});

/// Removes a head at once (clean exit).
///
/// KEYS: head hash, heads set, the head's assignment hash, its fence
/// list, the heads version counter.
/// ARGV: head id.
pub static DEREGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('INCR', KEYS[5])
return 1
"#,
    )
});

/// Lists live heads. Reads only: an id whose lease expired is skipped,
/// and left for the sweep in [`REFRESH_LEASE`] to remove and announce (a
/// worker running this could not announce it).
///
/// KEYS: heads set, heads version counter. ARGV: head key prefix,
/// assignment-hash key prefix.
/// Returns a flat list: the heads version the list was read at, then id,
/// addr, state (`ready`, `draining` or `stale`), assigned workers, start
/// time (Unix ms), `--capacity` (0: none), metrics address (empty: none,
/// or a head too old to say), for each head. Three commands per head
/// (`HMGET`, `PTTL`, `HLEN`), and one `GET`.
pub static LIVE_HEADS: LazyLock<Script> = LazyLock::new(|| {
    with_lib(
        r#"
local out = {redis.call('GET', KEYS[2]) or '0'}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. id
  local state, addr, started, capacity, metrics = head_state(key)
  if state then
    table.insert(out, id)
    table.insert(out, addr or '')
    table.insert(out, state)
    table.insert(out, redis.call('HLEN', ARGV[2] .. id))
    table.insert(out, started or '0')
    table.insert(out, capacity or '0')
    table.insert(out, metrics or '')
  end
end
return out
"#,
    )
});

/// Assigns a worker to a head under a fresh epoch, within the head's load
/// bound, and leaves every other head that held the worker a fencing
/// notice.
///
/// KEYS: head hash, the head's assignment hash, epoch counter, heads set.
/// ARGV: 1 head id, 2 worker id, 3 epoch seed (decimal), 4 lease ms,
/// 5 head key prefix, 6 assignment-hash key prefix, 7 fence-list key
/// prefix, 8 slack in thousandths, 9 capacity (0: none), 10 worker
/// instance (may be empty), 11 worker addr, 12 the state to record (`p`:
/// adopted by `Reassign`, stream not open yet; `s`: adopted on open, the
/// stream is already open), 13... heads that do not count as live in the
/// load bound (lost, unreachable or full, as the worker reports them).
///
/// Returns the epoch as a decimal string. Fails with `NOLEASE`,
/// `DRAINING`, `FULL load bound`, `CAPACITY load capacity` or
/// `HELD head head-addr` (another process of the same worker id streams
/// to a live head).
pub static ASSIGN: LazyLock<Script> = LazyLock::new(|| {
    with_lib(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOLEASE head holds no lease')
end
if redis.call('HGET', KEYS[1], 'state') == 'draining' then
  return redis.error_reply('DRAINING head is draining')
end
local me, worker, instance = ARGV[1], ARGV[2], ARGV[10]
local excluded = {}
for i = 13, #ARGV do excluded[ARGV[i]] = true end
-- W: workers assigned to live heads, plus this one unless counted.
-- H: live heads not draining, minus the excluded ones.
-- holders: the heads whose hash holds this worker.
local total, live, holders = 0, 0, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local state, addr = head_state(ARGV[5] .. id)
  if state then
    local hash = ARGV[6] .. id
    total = total + redis.call('HLEN', hash)
    if state == 'ready' and not excluded[id] then live = live + 1 end
    local a = parse(redis.call('HGET', hash, worker))
    if a then
      -- Another process under this id, streaming to a head that is alive:
      -- refuse rather than let two processes take turns for ever.
      if instance ~= '' and a.instance ~= '' and a.instance ~= instance
          and a.state == 's' and state ~= 'stale' then
        return redis.error_reply('HELD ' .. id .. ' ' .. (addr or '?') .. ' ' .. a.addr)
      end
      table.insert(holders, id)
    end
  end
end
local mine = false
for _, id in ipairs(holders) do if id == me then mine = true end end
if not mine then
  if #holders == 0 then total = total + 1 end
  if live < 1 then live = 1 end
  local slack = tonumber(ARGV[8])
  local bound = math.floor(((1000 + slack) * total + 1000 * live - 1) / (1000 * live))
  local load = redis.call('HLEN', KEYS[2])
  if load + 1 > bound then
    return redis.error_reply(string.format('FULL %d %d', load, bound))
  end
  local cap = tonumber(ARGV[9])
  if cap > 0 and load + 1 > cap then
    return redis.error_reply(string.format('CAPACITY %d %d', load, cap))
  end
end
ensure_counter(KEYS[3], ARGV[3])
redis.call('INCR', KEYS[3])
local epoch = redis.call('GET', KEYS[3])
for _, id in ipairs(holders) do
  if id ~= me then
    redis.call('HDEL', ARGV[6] .. id, worker)
    local fence = ARGV[7] .. id
    redis.call('RPUSH', fence, epoch .. ':' .. worker)
    redis.call('LTRIM', fence, -10000, -1)
    redis.call('PEXPIRE', fence, ARGV[4])
  end
end
redis.call('HSET', KEYS[2], worker, value(epoch, instance, ARGV[12], ARGV[11]))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return epoch
"#,
    )
});

/// Marks an assignment streaming when its worker opens `Heartbeat`, if it
/// is still this head's at this epoch.
///
/// KEYS: the head's assignment hash. ARGV: worker id, epoch.
/// Returns `{1, addr}` on success, `{0, current epoch}` if the worker holds
/// another epoch here, `{0, ''}` if the head holds no assignment for it.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    with_lib(
        r#"
local a = parse(redis.call('HGET', KEYS[1], ARGV[1]))
if not a then return {0, ''} end
if a.epoch ~= ARGV[2] then return {0, a.epoch} end
if a.state ~= 's' then
  redis.call('HSET', KEYS[1], ARGV[1], value(a.epoch, a.instance, 's', a.addr))
end
return {1, a.addr}
"#,
    )
});

/// After a head got its lease back (it was paused, or Redis forgot it),
/// re-records the workers whose streams it still holds, and names those
/// that another head took under a newer epoch meanwhile.
///
/// KEYS: the head's assignment hash, epoch counter, heads set.
/// ARGV: 1 head id, 2 assignment-hash key prefix, 3 lease ms, 4 epoch
/// seed, then worker id, epoch, instance, addr for each stream.
/// Returns the worker ids the head must let go.
pub static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    with_lib(
        r#"
local me, stale = ARGV[1], {}
local others = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if id ~= me then table.insert(others, ARGV[2] .. id) end
end
ensure_counter(KEYS[2], ARGV[4])
local top = redis.call('GET', KEYS[2])
for i = 5, #ARGV, 4 do
  local worker, epoch = ARGV[i], ARGV[i + 1]
  local taken = false
  for _, hash in ipairs(others) do
    local a = parse(redis.call('HGET', hash, worker))
    if a and newer(a.epoch, epoch) then taken = true end
  end
  local a = parse(redis.call('HGET', KEYS[1], worker))
  if a and newer(a.epoch, epoch) then taken = true end
  if taken then
    table.insert(stale, worker)
  else
    -- Redis forgot the assignment (the hash expired with the lapsed
    -- lease, or Redis restarted): the stream is still the truth.
    redis.call('HSET', KEYS[1], worker, value(epoch, ARGV[i + 2], 's', ARGV[i + 3]))
    if newer(epoch, top) then top = epoch end
  end
end
-- Epochs must keep growing even if the counter was lost.
if newer(top, redis.call('GET', KEYS[2])) then
  redis.call('SET', KEYS[2], top)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return stale
"#,
    )
});

/// Drops an assignment, but only if it is still this head's at the given
/// epoch: a late release never undoes a newer assignment.
///
/// KEYS: the head's assignment hash. ARGV: worker id, epoch.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    with_lib(
        r#"
local a = parse(redis.call('HGET', KEYS[1], ARGV[1]))
if a and a.epoch == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"#,
    )
});
