-- The reference run's limiter: a fixed one-second window per API key, one INCR per request.
-- KEYS[1] the window counter; ARGV[1] the limit per second. Returns the count, or -1 over it.
local n = redis.call("INCR", KEYS[1])
if n == 1 then
  redis.call("PEXPIRE", KEYS[1], 1000)
end
if n > tonumber(ARGV[1]) then
  return -1
end
return n
