-- Minute, hour and day rollups. An hour or day row holds aggregate states for one
-- (tenant, meter, bucket, route, method, status, dims); a minute row only for one
-- (tenant, meter, bucket), because at minute grain the full key is nearly as large as the
-- raw table. Merges combine states, they never add a row twice. Duplicates are stopped upstream: a raw block re-inserted with its
-- insert_deduplication_token is dropped, and with deduplicate_blocks_in_dependent_materialized_views
-- the views' blocks are dropped too (hence the same dedup window here).
-- `events` counts non-correction rows; `correction_units` carries the signed corrections of
-- COUNT meters; `units_sum` includes corrections; `subjects` ignores corrections.
CREATE TABLE IF NOT EXISTS usage_minute
(
    tenant_id        LowCardinality(String),
    meter            LowCardinality(String),
    bucket           DateTime('UTC'),
    events           AggregateFunction(count),
    correction_units AggregateFunction(sum, Decimal(38, 9)),
    units_sum        AggregateFunction(sum, Decimal(38, 9)),
    units_max        AggregateFunction(max, Decimal(38, 9)),
    units_latest     AggregateFunction(argMax, Decimal(38, 9), DateTime64(3, 'UTC')),
    bytes_in         AggregateFunction(sum, UInt64),
    bytes_out        AggregateFunction(sum, UInt64),
    subjects         AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, meter, bucket)
TTL bucket + INTERVAL {raw_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS usage_hour
(
    tenant_id        LowCardinality(String),
    meter            LowCardinality(String),
    bucket           DateTime('UTC'),
    route            LowCardinality(String),
    method           LowCardinality(String),
    status           UInt16,
    dims             Map(String, String),
    events           AggregateFunction(count),
    correction_units AggregateFunction(sum, Decimal(38, 9)),
    units_sum        AggregateFunction(sum, Decimal(38, 9)),
    units_max        AggregateFunction(max, Decimal(38, 9)),
    units_latest     AggregateFunction(argMax, Decimal(38, 9), DateTime64(3, 'UTC')),
    bytes_in         AggregateFunction(sum, UInt64),
    bytes_out        AggregateFunction(sum, UInt64),
    subjects         AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, meter, bucket, route, method, status, dims)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS usage_day AS usage_hour
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, meter, bucket, route, method, status, dims)
SETTINGS non_replicated_deduplication_window = 10000;
