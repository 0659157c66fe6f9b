//! The Lua scripts behind every multi-key change, so that each change is
//! atomic in Redis (and stays in one slot on Redis Cluster: every key
//! shares the namespace's hash tag).

use deadpool_redis::redis::Script;
use std::sync::LazyLock;

/// Creates or refreshes a head's lease, and hands the head the fencing
/// notices other heads left for it (see [`ASSIGN`]).
///
/// KEYS: head hash, heads set, the head's worker set, the head's fence
/// list, the heads version counter.
/// ARGV: head id, addr, lease ms, started ms, state, write (`1`: write
/// the lease's fields even though it exists: the process's first refresh,
/// or a new state).
/// Returns `{existed, heads version, fence...}`: existed is 1 if the lease
/// still existed (a refresh), 0 if it was created; each fence entry is
/// `epoch:worker`.
pub static REFRESH_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- Runs once an interval per head: a quiet refresh is PEXPIRE, PEXPIRE,
-- GET and LRANGE. PEXPIRE answers 0 when the lease is gone.
local existed, version = 1, nil
local function write()
  redis.call('HSET', KEYS[1], 'addr', ARGV[2], 'started_ms', ARGV[4], 'state', ARGV[5], 'ttl_ms', ARGV[3])
end
if redis.call('PEXPIRE', KEYS[1], ARGV[3]) == 0 then
  existed = 0
  write()
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  -- The id leaves the heads set only once its lease expired (LIVE_HEADS
  -- prunes it) or at deregistration, which is when it is created again.
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
    version = tonumber(redis.call('GET', KEYS[5]) or '0')
  end
end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
local out = {existed, version}
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
/// KEYS: head hash, heads set, the head's worker set, its fence list, the
/// heads version counter.
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

/// Lists live heads and prunes ids whose lease expired.
///
/// KEYS: heads set. ARGV: head key prefix, worker-set key prefix.
/// Returns a flat list: id, addr, state (`ready`, `draining` or `stale`),
/// assigned workers, start time (Unix ms), for each head.
pub static LIVE_HEADS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. id
  local h = redis.call('HMGET', key, 'addr', 'state', 'ttl_ms', 'started_ms')
  if h[1] then
    local state = h[2] or 'ready'
    -- A live head refreshes every interval, well within its TTL; one whose
    -- lease has run down past half is probably dead (crashed, hung, cut
    -- off): "stale", tried last and not counted as live.
    local ttl = tonumber(h[3] or '0')
    local pttl = redis.call('PTTL', key)
    if state == 'ready' and ttl > 0 and pttl >= 0 and pttl < ttl / 2 then
      state = 'stale'
    end
    table.insert(out, id)
    table.insert(out, h[1])
    table.insert(out, state)
    table.insert(out, redis.call('SCARD', ARGV[2] .. id))
    table.insert(out, h[4] or '0')
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"#,
    )
});

/// Assigns a worker to a head under a fresh epoch, within the head's load
/// bound, and leaves the previous head a fencing notice.
///
/// KEYS: head hash, worker hash, epoch counter, the head's worker set,
/// heads set.
/// ARGV: 1 head id, 2 worker id, 3 since ms, 4 worker addr, 5 worker-set
/// key prefix, 6 lease ms, 7 head key prefix, 8 slack in thousandths,
/// 9 capacity (0: none), 10 head the worker lost (excluded from H; may be
/// empty), 11 fence-list key prefix.
///
/// Fails with `NOLEASE`, `DRAINING`, `FULL load bound` or
/// `CAPACITY load capacity`.
pub static ASSIGN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOLEASE head holds no lease')
end
if redis.call('HGET', KEYS[1], 'state') == 'draining' then
  return redis.error_reply('DRAINING head is draining')
end
local me, worker = ARGV[1], ARGV[2]
local prev = redis.call('HGET', KEYS[2], 'head')
if not (prev == me and redis.call('SISMEMBER', KEYS[4], worker) == 1) then
  -- W: workers assigned to live heads, plus this one unless counted.
  -- H: live heads not draining, minus the one the worker lost.
  local total, live, counted = 0, 0, false
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[5])) do
    local h = redis.call('HMGET', ARGV[7] .. id, 'state', 'ttl_ms')
    local state = h[1]
    if state then
      -- See LIVE_HEADS: a head whose lease ran down past half is stale.
      local ttl = tonumber(h[2] or '0')
      local pttl = redis.call('PTTL', ARGV[7] .. id)
      if ttl > 0 and pttl >= 0 and pttl < ttl / 2 then state = 'stale' end
      total = total + redis.call('SCARD', ARGV[5] .. id)
      if state == 'ready' and id ~= ARGV[10] then live = live + 1 end
      if id == prev and redis.call('SISMEMBER', ARGV[5] .. id, worker) == 1 then
        counted = true
      end
    end
  end
  if not counted then total = total + 1 end
  if live < 1 then live = 1 end
  local slack = tonumber(ARGV[8])
  local bound = math.floor(((1000 + slack) * total + 1000 * live - 1) / (1000 * live))
  local load = redis.call('SCARD', KEYS[4])
  if load + 1 > bound then
    return redis.error_reply('FULL ' .. load .. ' ' .. bound)
  end
  local cap = tonumber(ARGV[9])
  if cap > 0 and load + 1 > cap then
    return redis.error_reply('CAPACITY ' .. load .. ' ' .. cap)
  end
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  -- A lost counter (fresh, restarted or flushed Redis) restarts from the
  -- clock, far above any epoch handed out before, so epochs keep growing.
  redis.call('SET', KEYS[3], string.format('%.0f', tonumber(ARGV[3]) * 1000))
end
local epoch = redis.call('INCR', KEYS[3])
if prev and prev ~= me then
  redis.call('SREM', ARGV[5] .. prev, worker)
  local fence = ARGV[11] .. prev
  redis.call('RPUSH', fence, epoch .. ':' .. worker)
  redis.call('LTRIM', fence, -10000, -1)
  redis.call('PEXPIRE', fence, ARGV[6])
end
redis.call('HSET', KEYS[2], 'head', me, 'epoch', epoch, 'since_ms', ARGV[3], 'addr', ARGV[4])
redis.call('SADD', KEYS[4], worker)
redis.call('PEXPIRE', KEYS[4], ARGV[6])
return epoch
"#,
    )
});

/// After a head got its lease back (it was paused, or Redis forgot it),
/// re-records the workers whose streams it still holds, and names those
/// that another head or a newer epoch took meanwhile.
///
/// KEYS: the head's worker set, epoch counter.
/// ARGV: head id, worker key prefix, lease ms, now ms, then worker id and
/// epoch pairs. Returns the worker ids the head must let go.
pub static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local me, stale = ARGV[1], {}
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- See ASSIGN: a lost counter restarts from the clock.
  redis.call('SET', KEYS[2], string.format('%.0f', tonumber(ARGV[4]) * 1000))
end
local top = tonumber(redis.call('GET', KEYS[2]))
for i = 5, #ARGV, 2 do
  local worker, epoch = ARGV[i], ARGV[i + 1]
  local key = ARGV[2] .. worker
  local a = redis.call('HMGET', key, 'head', 'epoch')
  if a[1] == false then
    -- Redis forgot the assignment (restart, flush): the stream is still
    -- the truth, so record it again.
    redis.call('HSET', key, 'head', me, 'epoch', epoch, 'since_ms', 0, 'addr', '')
    redis.call('SADD', KEYS[1], worker)
  elseif a[1] == me and a[2] == epoch then
    redis.call('SADD', KEYS[1], worker)
  else
    table.insert(stale, worker)
  end
  if tonumber(epoch) > top then top = tonumber(epoch) end
end
-- Epochs must keep growing even if the counter was lost.
if top > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], string.format('%.0f', top))
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return stale
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
