//! The Lua scripts. Each runs atomically on the server and reads time from
//! Redis `TIME`, so hosts with skewed clocks agree. Every key a script
//! touches shares one hash tag, so the scripts also run on a cluster.

/// GCRA. KEYS[1] = theoretical arrival time (µs). ARGV = emission interval
/// (µs per unit of cost), capacity (µs: interval × burst), cost.
/// Returns {1, remaining} or {0, retry_after_µs}.
pub(crate) const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * cost
local diff = new_tat - now
if diff > capacity then
  return {0, math.ceil(diff - capacity)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(diff / 1000) + 1)
return {1, math.floor((capacity - diff) / interval)}
"#;

/// Bulkhead lease. KEYS[1] = sorted set of lease ids scored by expiry
/// (ms). ARGV = max, ttl_ms, id. Returns 1 if the lease was taken (or
/// renewed), 0 if the fleet is at its cap.
pub(crate) const LEASE_ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) == false and redis.call('ZCARD', KEYS[1]) >= max then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
"#;

/// Extends a lease. KEYS[1] as above; ARGV = ttl_ms, id. Returns 1 if the
/// lease was still held.
pub(crate) const LEASE_RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local ok = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return ok
"#;

/// Gives a lease back. KEYS[1] as above; ARGV = id.
pub(crate) const LEASE_RELEASE: &str = r#"
return redis.call('ZREM', KEYS[1], ARGV[1])
"#;

/// Leases held now. KEYS[1] as above.
pub(crate) const LEASE_COUNT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"#;

/// The fleet breaker: one instance's report merged into the shared state,
/// and the shared state returned.
///
/// KEYS[1] = hash {state, failures, open_until, gen}; KEYS[2] = sorted set
/// of probe holders scored by expiry (ms).
///
/// ARGV: 1 failures seen since the last report, 2 whether a success came
/// before them (1: the fleet's run restarts), 3 ms to open for if this
/// instance opened (0: it did not), 4 whether this instance's probes
/// closed it, 5 whether it wants (or keeps) a probe, 6 instance id,
/// 7 failure threshold, 8 open timeout ms, 9 probe lease ms, 10 fleet
/// half-open limit, 11 key ttl ms, 12 force: '' | 'closed' | 'forced_open'.
///
/// Returns {state, open_remaining_ms, failures, probe_granted, gen} with
/// state 0 closed, 1 open, 2 half-open, 3 forced open.
pub(crate) const BREAKER_SYNC: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = KEYS[1]
local probes = KEYS[2]
local st = redis.call('HGET', h, 'state') or 'closed'
local failures = tonumber(redis.call('HGET', h, 'failures') or '0')
local open_until = tonumber(redis.call('HGET', h, 'open_until') or '0')
local gen = tonumber(redis.call('HGET', h, 'gen') or '0')
local id = ARGV[6]
local threshold = tonumber(ARGV[7])
local ttl = tonumber(ARGV[11])

local function open(ms)
  st = 'open'
  failures = 0
  if now + ms > open_until then open_until = now + ms end
  gen = gen + 1
  redis.call('DEL', probes)
end

if ARGV[12] == 'closed' then
  st = 'closed'; failures = 0; open_until = 0; gen = gen + 1
  redis.call('DEL', probes)
elseif ARGV[12] == 'forced_open' then
  st = 'forced_open'; gen = gen + 1
  redis.call('DEL', probes)
end

if st == 'open' and now >= open_until then
  st = 'half_open'
  gen = gen + 1
  redis.call('DEL', probes)
end
redis.call('ZREMRANGEBYSCORE', probes, '-inf', now)

local opened_ms = tonumber(ARGV[3])
if opened_ms > 0 and st ~= 'forced_open' then
  if st ~= 'open' or now + opened_ms > open_until then open(opened_ms) end
elseif ARGV[4] == '1' and st == 'half_open' then
  st = 'closed'; failures = 0; open_until = 0; gen = gen + 1
  redis.call('DEL', probes)
elseif st == 'closed' then
  local delta = tonumber(ARGV[1])
  if ARGV[2] == '1' then failures = delta else failures = failures + delta end
  if failures >= threshold then open(tonumber(ARGV[8])) end
end

local granted = 0
if st == 'half_open' and ARGV[5] == '1' then
  local held = redis.call('ZSCORE', probes, id)
  if held ~= false or redis.call('ZCARD', probes) < tonumber(ARGV[10]) then
    redis.call('ZADD', probes, now + tonumber(ARGV[9]), id)
    redis.call('PEXPIRE', probes, ttl)
    granted = 1
  end
end

redis.call('HSET', h, 'state', st, 'failures', failures, 'open_until', open_until, 'gen', gen)
redis.call('PEXPIRE', h, ttl)
local code = 0
if st == 'open' then code = 1 elseif st == 'half_open' then code = 2 elseif st == 'forced_open' then code = 3 end
local remaining = 0
if st == 'open' then remaining = open_until - now end
return {code, remaining, failures, granted, gen}
"#;
