-- Deliver the next batch of a shard stream to one consumer and record its id range in the
-- same atomic step. The range is the batch's identity: a batch redelivered after a crash is
-- rebuilt from it (XRANGE first last) and inserted with the same deduplication token.
-- KEYS[1] shard stream, KEYS[2] the shard's batch hash (same hash tag)
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] count
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
  'STREAMS', KEYS[1], '>')
if not reply then
  return false
end
local entries = reply[1][2]
redis.call('HSET', KEYS[2], entries[1][1], entries[#entries][1])
return entries
