-- Admission for one request: tenant rate, key rate, concurrency lease, monthly quotas.
--
-- Every check runs before any write, so a denied request consumes nothing. Rates are GCRA in
-- integer microseconds: a limiter is one key holding its theoretical arrival time (TAT).
-- Expiries are absolute (PXAT/PEXPIREAT) against the script's own clock, so a caller-supplied
-- clock (tests) and the server clock behave alike.
--
-- KEYS[1] tenant GCRA key    KEYS[2] key GCRA key    KEYS[3] lease sorted set
-- KEYS[4..] quota counters, one per meter, for the current month bucket
--
-- ARGV[1]  now in ms, or "" to use the server clock
-- ARGV[2]  tenant emission interval (us), 0 = no tenant rate
-- ARGV[3]  tenant burst
-- ARGV[4]  key emission interval (us), 0 = no key rate
-- ARGV[5]  key burst
-- ARGV[6]  concurrency, 0 = no lease taken
-- ARGV[7]  lease ttl (ms)
-- ARGV[8]  lease id
-- ARGV[9]  epoch ms at which the quota month resets
-- ARGV[10] epoch ms at which the quota counters expire (the reset plus a grace)
-- ARGV[11+2i], ARGV[12+2i]  limit and increment of quota i (0-based)
--
-- Reply: {allowed, violated, retry_after_us, now_ms,
--         tenant_remaining, tenant_reset_us, key_remaining, key_reset_us,
--         concurrency_remaining, quota_remaining...}
-- violated: 0 none, 1 tenant rate, 2 key rate, 3 concurrency, 4+i quota i.

local now_ms
if ARGV[1] == "" then
  if redis.replicate_commands then
    redis.replicate_commands()
  end
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now_ms = tonumber(ARGV[1])
end
local now = now_ms * 1000

local violated = 0
local retry_us = 0

-- GCRA: returns the TAT after this request, and whether it fits the burst.
local function gcra(key, interval, burst)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local allowed = new_tat - now <= interval * burst
  return tat, new_tat, allowed
end

local function remaining(tat, interval, burst)
  return math.floor((interval * burst - (tat - now)) / interval)
end

local t_interval, t_burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local k_interval, k_burst = tonumber(ARGV[4]), tonumber(ARGV[5])
local t_tat, t_new, k_tat, k_new = now, now, now, now

if t_interval > 0 then
  local ok
  t_tat, t_new, ok = gcra(KEYS[1], t_interval, t_burst)
  if not ok then
    violated = 1
    retry_us = t_new - now - t_interval * t_burst
  end
end

if k_interval > 0 then
  local ok
  k_tat, k_new, ok = gcra(KEYS[2], k_interval, k_burst)
  if violated == 0 and not ok then
    violated = 2
    retry_us = k_new - now - k_interval * k_burst
  end
end

local concurrency = tonumber(ARGV[6])
local held = 0
if concurrency > 0 then
  -- Purging expired leases is housekeeping, not consumption: a dead gateway's leases lapse.
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  held = redis.call('ZCARD', KEYS[3])
  if violated == 0 and held >= concurrency then
    violated = 3
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    retry_us = (tonumber(first[2]) - now_ms) * 1000
  end
end

local nquota = #KEYS - 3
local used = {}
for i = 1, nquota do
  local limit = tonumber(ARGV[9 + 2 * i])
  local inc = tonumber(ARGV[10 + 2 * i])
  used[i] = tonumber(redis.call('GET', KEYS[3 + i]) or 0)
  -- inc 0 checks a meter charged elsewhere (reported usage): refused once it is used up.
  if violated == 0 and (used[i] + inc > limit or (inc == 0 and used[i] >= limit)) then
    violated = 3 + i
    retry_us = (tonumber(ARGV[9]) - now_ms) * 1000
  end
end

local reply = {0, violated, retry_us, now_ms, 0, 0, 0, 0, 0}

if violated == 0 then
  reply[1] = 1
  if t_interval > 0 then
    redis.call('SET', KEYS[1], string.format('%d', t_new), 'PXAT', math.ceil(t_new / 1000) + 1)
    t_tat = t_new
  end
  if k_interval > 0 then
    redis.call('SET', KEYS[2], string.format('%d', k_new), 'PXAT', math.ceil(k_new / 1000) + 1)
    k_tat = k_new
  end
  if concurrency > 0 then
    local ttl = tonumber(ARGV[7])
    redis.call('ZADD', KEYS[3], now_ms + ttl, ARGV[8])
    redis.call('PEXPIREAT', KEYS[3], now_ms + ttl)
    held = held + 1
  end
  for i = 1, nquota do
    local inc = tonumber(ARGV[10 + 2 * i])
    if inc > 0 then
      used[i] = redis.call('INCRBY', KEYS[3 + i], inc)
      redis.call('PEXPIREAT', KEYS[3 + i], ARGV[10])
    end
  end
end

if t_interval > 0 then
  reply[5] = remaining(t_tat, t_interval, t_burst)
  reply[6] = t_tat - now
end
if k_interval > 0 then
  reply[7] = remaining(k_tat, k_interval, k_burst)
  reply[8] = k_tat - now
end
reply[9] = concurrency - held
for i = 1, nquota do
  reply[9 + i] = tonumber(ARGV[9 + 2 * i]) - used[i]
end
return reply
