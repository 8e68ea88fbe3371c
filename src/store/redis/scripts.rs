//! The Lua scripts. Each runs atomically on the server and reads time from
//! Redis `TIME`, so hosts with skewed clocks agree. Every key a script
//! touches shares one hash tag, so the scripts also run on a cluster.

/// GCRA, charging a request named by an id its sender chose before
/// sending it. KEYS[1] = theoretical arrival time (µs); KEYS[2] = the
/// request's receipt; KEYS[3] = the total refunds gave back to this
/// bucket lately; KEYS[4] = the log of those refunds (see [`REFUND`]). ARGV = emission interval (µs per unit of cost),
/// capacity (µs: interval × burst), cost, receipt ttl (ms).
/// Returns {1, remaining} or {0, retry_after_µs}.
///
/// An admitted request leaves a receipt `"<start> <end> <given>"`: the
/// stretch of the TAT axis it took and the refund total then, so
/// [`REFUND`] can give it back if its sender never learnt the answer. A
/// receipt reading `x` means the sender gave up before this script ran (a
/// refund got here first): nothing is charged. The same id charged twice
/// is charged once. The total lives as long as any receipt that read it.
pub(crate) const GCRA: &str = r#"
local seen = redis.call('GET', KEYS[2])
if seen == 'x' then return {0, 0} end
if seen then return {1, 0} end
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
local given = redis.call('GET', KEYS[3])
if given then
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
else
  given = '0'
end
local stored = string.format('%.0f', new_tat)
redis.call('SET', KEYS[1], stored, 'PX', math.ceil(diff / 1000) + 1)
redis.call('SET', KEYS[2], string.format('%.0f', tat) .. ' ' .. stored .. ' ' .. given, 'PX', ARGV[4])
return {1, math.floor((capacity - diff) / interval)}
"#;

/// Gives back the charges of requests whose senders never learnt they
/// were admitted (timed out, dropped). KEYS = quadruples (bucket, receipt,
/// refund total, refund log) as for [`GCRA`], all under one hash tag;
/// ARGV[1] = receipt ttl (ms).
///
/// A request admitted at `start` took the stretch `[start, end)`. Refunds
/// since then of requests charged before it moved that stretch down by
/// what they gave back. Those are told apart by a *virtual start*, `start`
/// plus the refund total when the request was charged: it grows with the
/// order of the charges whatever was refunded in between, and each refund
/// is logged at its request's. So the stretch moved by `shift =
/// (given_now - given_then) - (what was given back above it)`, and with
/// `end' = end - shift`, giving back `min(end - start, end' - now)`, the
/// part of it still ahead, never leaves the bucket fuller than had the
/// request never come: while `now < end'`, the TAT stayed above every
/// instant since the charge, so no later request found the bucket full and
/// each stored the TAT it would have stored without this one, plus that
/// same part. Once `now >= end'`, nothing is left to give back. Refunds in
/// any order give back the same. A lost total or log (expired, or the log
/// cut to its newest entries) can only make the shift look larger: less is
/// given back, never more. See `refund` in the tests for the same
/// arithmetic, property-tested over histories.
///
/// A refund that finds no receipt leaves `x`, so the charge, if it is
/// still on its way, is never made.
pub(crate) const REFUND: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = ARGV[1]
for i = 1, #KEYS, 4 do
  local r = redis.call('GET', KEYS[i + 1])
  if r ~= 'x' then
    redis.call('SET', KEYS[i + 1], 'x', 'PX', ttl)
    local s, e, g = string.match(r or '', '^(%d+) (%d+) (%d+)$')
    local given = tonumber(redis.call('GET', KEYS[i + 2]) or '0')
    if s and given >= tonumber(g) then
      local start, stop, v = tonumber(s), tonumber(e), tonumber(s) + tonumber(g)
      local above = 0
      local logged = redis.call('ZRANGEBYSCORE', KEYS[i + 3], '(' .. string.format('%.0f', v), '+inf', 'WITHSCORES')
      for j = 1, #logged, 2 do
        above = above + tonumber(string.match(logged[j], '^(%d+)'))
      end
      local shift = given - tonumber(g) - above
      local give = math.min(stop - start, stop - shift - now)
      local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
      if shift >= 0 and give > 0 and tat > now then
        local new_tat = math.max(tat - give, now)
        if new_tat > now then
          redis.call('SET', KEYS[i], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
        else
          redis.call('DEL', KEYS[i])
        end
        local gave = tat - new_tat
        redis.call('SET', KEYS[i + 2], string.format('%.0f', given + gave), 'PX', ttl)
        redis.call('ZADD', KEYS[i + 3], string.format('%.0f', v), string.format('%.0f', gave) .. ' ' .. KEYS[i + 1])
        redis.call('ZREMRANGEBYRANK', KEYS[i + 3], 0, -1025)
        redis.call('PEXPIRE', KEYS[i + 3], ttl)
      end
    end
  end
end
return 1
"#;

/// Bulkhead lease. KEYS[1] = sorted set of lease ids scored by expiry
/// (ms); KEYS[2] = sorted set of ids given back before they were taken,
/// scored by expiry. ARGV = max, ttl_ms, id. Returns 1 if the lease was
/// taken (or renewed), 0 if the fleet is at its cap or the id was already
/// given back (its caller left: a late request must not take a lease no
/// one will release).
pub(crate) const LEASE_ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZSCORE', KEYS[2], ARGV[3]) ~= false then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) == false and redis.call('ZCARD', KEYS[1]) >= max then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
"#;

/// Extends leases. KEYS[1] as above; ARGV = ttl_ms, ids. Returns how
/// many were still held (one that expired is not taken again).
pub(crate) const LEASE_RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local held = 0
for i = 2, #ARGV do
  held = held + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return held
"#;

/// Gives leases back. KEYS as for [`LEASE_ACQUIRE`]; ARGV = ttl_ms, ids.
/// An id not held is remembered for a ttl as given back, so its
/// acquisition, if still on its way, takes nothing.
pub(crate) const LEASE_RELEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local gone = 0
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 0 then
    redis.call('ZADD', KEYS[2], now + ttl, ARGV[i])
    gone = gone + 1
  end
end
if gone > 0 then redis.call('PEXPIRE', KEYS[2], ttl * 2) end
return #ARGV - 1 - gone
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

/// [`REFUND`]'s arithmetic, and [`GCRA`]'s, in Rust (integer µs), so that
/// the bound is property-tested over histories.
#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A bucket: its TAT, the total its refunds gave back, and the log of
    /// what each gave back, at its request's virtual start.
    #[derive(Default)]
    struct Bucket {
        tat: u64,
        given: u64,
        log: Vec<(u64, u64)>,
    }

    /// A receipt: the stretch taken and the bucket's `given` then.
    type Receipt = (u64, u64, u64);

    /// [`GCRA`]: the receipt, or `None`.
    fn charge(b: &mut Bucket, now: u64, inc: u64, tau: u64) -> Option<Receipt> {
        let start = b.tat.max(now);
        let end = start + inc;
        if end - now > tau {
            return None;
        }
        b.tat = end;
        Some((start, end, b.given))
    }

    /// [`REFUND`] of one receipt.
    fn refund(b: &mut Bucket, now: u64, (start, end, given): Receipt) {
        let v = start + given;
        let above: u64 = b.log.iter().filter(|(w, _)| *w > v).map(|(_, g)| g).sum();
        let Some(shift) = (b.given - given).checked_sub(above) else {
            return;
        };
        let end_now = end.saturating_sub(shift);
        let give = (end - start).min(end_now.saturating_sub(now));
        if give > 0 && b.tat > now {
            let new_tat = b.tat.saturating_sub(give).max(now);
            b.given += b.tat - new_tat;
            b.log.push((v, b.tat - new_tat));
            b.tat = new_tat;
        }
    }

    /// Refunds all of one process's abandoned requests, in any order,
    /// give everything back while no other request came.
    #[test]
    fn refunds_in_any_order_give_everything_back() {
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]] {
            let mut b = Bucket::default();
            let receipts: Vec<_> = (0..4)
                .map(|_| charge(&mut b, 100, 10, 50).unwrap())
                .collect();
            for i in order {
                refund(&mut b, 100, receipts[i]);
            }
            assert_eq!(b.tat, 100, "{order:?}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A request of `cost` units arrives; `abandoned`: its sender gives
        /// up on it, and its refund arrives `refund_after` steps later.
        Charge {
            cost: u64,
            abandoned: bool,
            refund_after: usize,
        },
        Wait(u64),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (1u64..4, any::<bool>(), 0usize..6).prop_map(|(cost, abandoned, refund_after)| {
                    Op::Charge {
                        cost,
                        abandoned,
                        refund_after,
                    }
                }),
                (0u64..50).prop_map(Op::Wait),
            ],
            1..200,
        )
    }

    proptest! {
        /// Whatever is refunded, and whenever, the requests whose senders
        /// kept their admission conform to the limit: replayed alone
        /// through a fresh bucket at the same instants, each is admitted.
        #[test]
        fn refunds_never_let_kept_requests_exceed_the_limit(
            interval in 1u64..20,
            burst in 1u64..6,
            history in ops(),
        ) {
            let tau = interval * burst;
            let mut bucket = Bucket::default();
            let mut now = 1_000;
            let mut due: HashMap<usize, Vec<Receipt>> = HashMap::new();
            let mut kept = Vec::new();
            for (step, op) in history.iter().enumerate() {
                for r in due.remove(&step).unwrap_or_default() {
                    refund(&mut bucket, now, r);
                }
                match *op {
                    Op::Wait(d) => now += d,
                    Op::Charge { cost, abandoned, refund_after } => {
                        let inc = cost * interval;
                        if let Some(stretch) = charge(&mut bucket, now, inc.min(tau), tau) {
                            if abandoned {
                                due.entry(step + 1 + refund_after).or_default().push(stretch);
                            } else {
                                kept.push((now, inc.min(tau)));
                            }
                        }
                    }
                }
            }
            let mut fresh = Bucket::default();
            for (at, inc) in kept {
                prop_assert!(charge(&mut fresh, at, inc, tau).is_some(), "admitted over the limit");
            }
        }
    }
}
