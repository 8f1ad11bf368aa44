-- Raw usage events: one row per event, never deleted to correct usage (corrections are new
-- rows with source = 'correction'). Tenant first in the sort key so one tenant's scan is a
-- contiguous range; monthly partitions match billing periods and the TTL drops whole months.
-- non_replicated_deduplication_window makes inserts carrying insert_deduplication_token
-- idempotent on a plain MergeTree (chDB and single servers), as ReplicatedMergeTree is.
CREATE TABLE IF NOT EXISTS usage_events
(
    event_id    UUID,
    tenant_id   LowCardinality(String),
    meter       LowCardinality(String),
    subject     String,
    time        DateTime64(3, 'UTC'),
    units       Decimal(38, 9),
    route       LowCardinality(String),
    method      LowCardinality(String),
    status      UInt16,
    latency_ms  Float32,
    bytes_in    UInt64,
    bytes_out   UInt64,
    dims        Map(String, String),
    source      LowCardinality(String),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (tenant_id, meter, time, event_id)
TTL toDateTime(time) + INTERVAL {raw_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = 10000;
