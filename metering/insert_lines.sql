-- The consumer's fast path: a batch of stream payloads, one JSON document per line in a file,
-- parsed and converted by ClickHouse. A line is taken only if it has exactly the shape
-- UsageEvent.to_bytes writes (consumer.CANONICAL_EVENT: fixed key order, plain JSON numbers
-- and strings) and holds only values the Python path stores unchanged. Any other line fails
-- the whole INSERT before a row is written, and the consumer then stores the batch through the
-- Python path under the same token. One insert thread: rows are squashed into one block
-- (up to min_insert_block_size_rows/_bytes, about 1M rows or 256 MB) and written only after
-- the last line has passed, whereas parallel insert streams would each write their own.
-- The braced names are replaced by quoted literals.
INSERT INTO usage_events
    (event_id, tenant_id, meter, subject, time, units, route, method, status,
     latency_ms, bytes_in, bytes_out, dims, source)
SETTINGS insert_deduplication_token = {token}, max_insert_threads = 1
SELECT
    toUUID(e.event_id),
    e.tenant_id,
    e.meter,
    e.subject,
    fromUnixTimestamp64Milli(e.time, 'UTC'),
    toDecimal128(e.units, 9),
    e.route,
    e.method,
    toUInt16(e.status),
    toFloat32(e.latency_ms),
    e.bytes_in,
    e.bytes_out,
    e.dims,
    'gateway'
FROM
(
    SELECT
        line,
        JSONExtract(line, 'Tuple(event_id String, tenant_id String, meter String,
            subject String, time Int64, units String, route String, method String,
            status UInt32, latency_ms Float64, bytes_in UInt64, bytes_out UInt64,
            dims Map(String, String))') AS e
    FROM file({path}, 'LineAsString')
)
WHERE throwIf(NOT (
        match(line, {shape})
        AND isValidUTF8(line)
        AND e.status <= 65535
        AND isFinite(toFloat32(e.latency_ms))
        AND length(e.dims) <= 16
        AND length(arrayDistinct(mapKeys(e.dims))) = length(e.dims)
        AND arrayAll(s -> lengthUTF8(s) <= 128, arrayConcat(mapKeys(e.dims), mapValues(e.dims)))
    ), 'not a canonical usage event') = 0
