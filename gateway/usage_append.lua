-- Append one batch of usage events to a shard stream, at most once per (producer, seq).
-- A batch is spooled and replayed when its first send failed without an answer, which may
-- be after Redis already ran it; the sequence number makes that replay a no-op.
-- KEYS[1] shard stream, KEYS[2] the shard's producer hash (same hash tag)
-- ARGV[1] producer id, ARGV[2] batch sequence number, ARGV[3..] event documents
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= last then
  return 0
end
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return #ARGV - 2
