-- Tollway's metering schema for a ClickHouse cluster: the statements of metering/sql/ with
-- replicated engines and Distributed tables sharded by tenant.
--
-- Layout. Each table of metering/sql/ exists twice: `<name>_local` (Replicated*, the data of
-- one shard) and `<name>` (Distributed over the `_local` tables, sharded by
-- cityHash64(tenant_id)). The application reads and writes only the Distributed names, so its
-- queries are the same as on a single server; every row of one tenant, raw or rolled up,
-- lives on one shard. The materialized views sit on each shard's `usage_events_local` and
-- write its `_local` rollups, so a shard aggregates only what it stores.
--
-- Requirements. Macros {cluster}, {shard} and {replica} on every node ({replica} unique in
-- the whole cluster, e.g. the host name), `internal_replication` true for the cluster in
-- remote_servers, an inter-server `secret` (so shards run distributed reads as the initial
-- user and row policies apply there too), and SQL access management with a replicated user
-- directory. Run it once against any node, in the database TOLLWAY_CLICKHOUSE_URL names:
--   clickhouse-client --database tollway --multiquery < deploy/clickhouse/cluster.sql
--
-- Column lists are metering/sql's; tests/test_deploy.py fails if they drift apart.
-- The TTL is TOLLWAY_RAW_TTL_DAYS' default (400): change both together.

CREATE TABLE IF NOT EXISTS usage_events_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/usage_events_local', '{replica}')
PARTITION BY toYYYYMM(time)
ORDER BY (tenant_id, meter, time, event_id)
TTL toDateTime(time) + INTERVAL 400 DAY
SETTINGS replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS usage_minute_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/usage_minute_local', '{replica}')
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, meter, bucket)
TTL bucket + INTERVAL 400 DAY
SETTINGS replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS usage_hour_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/usage_hour_local', '{replica}')
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, meter, bucket, route, method, status, dims)
SETTINGS replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS usage_day_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/usage_day_local', '{replica}')
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, meter, bucket, route, method, status, dims)
SETTINGS replicated_deduplication_window = 10000;

-- The views of metering/sql/0003, reading and writing shard-local tables.
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_minute_mv ON CLUSTER '{cluster}' TO usage_minute_local AS
SELECT
    tenant_id,
    meter,
    toStartOfMinute(time) AS bucket,
    countStateIf(source != 'correction') AS events,
    sumStateIf(units, source = 'correction') AS correction_units,
    sumState(units) AS units_sum,
    maxState(units) AS units_max,
    argMaxState(units, time) AS units_latest,
    sumState(bytes_in) AS bytes_in,
    sumState(bytes_out) AS bytes_out,
    uniqExactStateIf(subject, source != 'correction') AS subjects
FROM usage_events_local
GROUP BY tenant_id, meter, bucket;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hour_mv ON CLUSTER '{cluster}' TO usage_hour_local AS
SELECT
    tenant_id,
    meter,
    toStartOfHour(time) AS bucket,
    route,
    method,
    status,
    dims,
    countStateIf(source != 'correction') AS events,
    sumStateIf(units, source = 'correction') AS correction_units,
    sumState(units) AS units_sum,
    maxState(units) AS units_max,
    argMaxState(units, time) AS units_latest,
    sumState(bytes_in) AS bytes_in,
    sumState(bytes_out) AS bytes_out,
    uniqExactStateIf(subject, source != 'correction') AS subjects
FROM usage_events_local
GROUP BY tenant_id, meter, bucket, route, method, status, dims;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_day_mv ON CLUSTER '{cluster}' TO usage_day_local AS
SELECT
    tenant_id,
    meter,
    toStartOfDay(time) AS bucket,
    route,
    method,
    status,
    dims,
    countStateIf(source != 'correction') AS events,
    sumStateIf(units, source = 'correction') AS correction_units,
    sumState(units) AS units_sum,
    maxState(units) AS units_max,
    argMaxState(units, time) AS units_latest,
    sumState(bytes_in) AS bytes_in,
    sumState(bytes_out) AS bytes_out,
    uniqExactStateIf(subject, source != 'correction') AS subjects
FROM usage_events_local
GROUP BY tenant_id, meter, bucket, route, method, status, dims;

-- What the application and finance use: one Distributed table per local table.
CREATE TABLE IF NOT EXISTS usage_events ON CLUSTER '{cluster}' AS usage_events_local
ENGINE = Distributed('{cluster}', currentDatabase(), usage_events_local, cityHash64(tenant_id));

CREATE TABLE IF NOT EXISTS usage_minute ON CLUSTER '{cluster}' AS usage_minute_local
ENGINE = Distributed('{cluster}', currentDatabase(), usage_minute_local, cityHash64(tenant_id));

CREATE TABLE IF NOT EXISTS usage_hour ON CLUSTER '{cluster}' AS usage_hour_local
ENGINE = Distributed('{cluster}', currentDatabase(), usage_hour_local, cityHash64(tenant_id));

CREATE TABLE IF NOT EXISTS usage_day ON CLUSTER '{cluster}' AS usage_day_local
ENGINE = Distributed('{cluster}', currentDatabase(), usage_day_local, cityHash64(tenant_id));

-- The finance views of metering/sql/0004, over the Distributed rollups: states from every
-- shard are merged on the node that runs the query.
CREATE VIEW IF NOT EXISTS usage_hourly ON CLUSTER '{cluster}' AS
SELECT
    tenant_id,
    meter,
    bucket AS hour,
    route,
    method,
    status,
    dims,
    countMerge(r.events) AS events,
    sumMerge(r.correction_units) AS correction_units,
    countMerge(r.events) + sumMerge(r.correction_units) AS events_net,
    sumMerge(r.units_sum) AS units,
    maxMerge(r.units_max) AS units_max,
    argMaxMerge(r.units_latest) AS units_latest,
    sumMerge(r.bytes_in) AS bytes_in,
    sumMerge(r.bytes_out) AS bytes_out,
    uniqExactMerge(r.subjects) AS subjects
FROM usage_hour AS r
GROUP BY tenant_id, meter, bucket, route, method, status, dims;

CREATE VIEW IF NOT EXISTS usage_daily ON CLUSTER '{cluster}' AS
SELECT
    tenant_id,
    meter,
    bucket AS day,
    route,
    method,
    status,
    dims,
    countMerge(r.events) AS events,
    sumMerge(r.correction_units) AS correction_units,
    countMerge(r.events) + sumMerge(r.correction_units) AS events_net,
    sumMerge(r.units_sum) AS units,
    maxMerge(r.units_max) AS units_max,
    argMaxMerge(r.units_latest) AS units_latest,
    sumMerge(r.bytes_in) AS bytes_in,
    sumMerge(r.bytes_out) AS bytes_out,
    uniqExactMerge(r.subjects) AS subjects
FROM usage_day AS r
GROUP BY tenant_id, meter, bucket, route, method, status, dims;

-- The versions this file covers, so `tollway migrate` finds the analytics schema current.
-- One replica set for the whole cluster (no {shard} in the path): every node reads the same.
CREATE TABLE IF NOT EXISTS schema_migrations ON CLUSTER '{cluster}'
(
    version    String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/{database}/schema_migrations', '{replica}')
ORDER BY version;

INSERT INTO schema_migrations (version) VALUES
    ('0001_usage_events'), ('0002_rollup_tables'), ('0003_rollup_views'), ('0004_finance_views');

-- The metering workers' user gets inserts that return only once every shard has stored its
-- rows (a batch is acknowledged in Redis after that), with the rollups deduplicated alongside
-- a re-sent raw block, and tenant-filtered reads that visit one shard only.
-- Create the user `tollway` first (its password stays out of this file).
CREATE SETTINGS PROFILE IF NOT EXISTS tollway_app ON CLUSTER '{cluster}' SETTINGS
    distributed_foreground_insert = 1,
    deduplicate_blocks_in_dependent_materialized_views = 1,
    optimize_skip_unused_shards = 1;

ALTER USER IF EXISTS tollway ON CLUSTER '{cluster}' SETTINGS PROFILE 'tollway_app';

-- Tenant analysts: read-only, bounded, and (per user, deploy/clickhouse/analyst.sql) row
-- policies on both the Distributed and the local tables, since a distributed read runs on
-- the shards as the analyst.
CREATE SETTINGS PROFILE IF NOT EXISTS tollway_analyst ON CLUSTER '{cluster}' SETTINGS
    readonly = 1,
    max_execution_time = 30,
    max_result_rows = 100000,
    result_overflow_mode = 'throw',
    optimize_skip_unused_shards = 1;

CREATE ROLE IF NOT EXISTS tollway_analyst ON CLUSTER '{cluster}' SETTINGS PROFILE 'tollway_analyst';

GRANT ON CLUSTER '{cluster}' SELECT ON usage_events TO tollway_analyst;
GRANT ON CLUSTER '{cluster}' SELECT ON usage_minute TO tollway_analyst;
GRANT ON CLUSTER '{cluster}' SELECT ON usage_hour TO tollway_analyst;
GRANT ON CLUSTER '{cluster}' SELECT ON usage_day TO tollway_analyst;
GRANT ON CLUSTER '{cluster}' SELECT ON usage_hourly TO tollway_analyst;
GRANT ON CLUSTER '{cluster}' SELECT ON usage_daily TO tollway_analyst;
GRANT ON CLUSTER '{cluster}' SELECT ON usage_events_local TO tollway_analyst;
GRANT ON CLUSTER '{cluster}' SELECT ON usage_minute_local TO tollway_analyst;
GRANT ON CLUSTER '{cluster}' SELECT ON usage_hour_local TO tollway_analyst;
GRANT ON CLUSTER '{cluster}' SELECT ON usage_day_local TO tollway_analyst;
