-- Deliver the next batch of a shard stream to one consumer and record its id range in the
-- same atomic step. The range is the batch's identity: a batch redelivered after a crash is
-- rebuilt from it (XRANGE first last) and inserted with the same deduplication token.
-- Returns {ids, payloads}: two flat arrays, which the worker parses far faster than one nested
-- entry per event. payloads is false if an entry's first field is not `e` (the worker then
-- reads the batch with XRANGE and dead-letters what cannot be stored). Joining the payloads
-- here with table.concat would cost Redis more than the whole read.
-- KEYS[1] shard stream, KEYS[2] the shard's batch hash (same hash tag)
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] count
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
  'STREAMS', KEYS[1], '>')
if not reply then
  return false
end
local entries = reply[1][2]
redis.call('HSET', KEYS[2], entries[1][1], entries[#entries][1])
local ids, lines = {}, {}
for i, entry in ipairs(entries) do
  ids[i] = entry[1]
  if lines then
    local fields = entry[2]
    if fields[1] == 'e' then
      lines[i] = fields[2]
    else
      lines = nil
    end
  end
end
return {ids, lines or false}
