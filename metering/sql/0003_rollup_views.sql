-- One view per rollup, each fed straight from usage_events (not chained), so a deduplicated
-- raw block is dropped by every view in the same way.
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_minute_mv TO usage_minute AS
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
FROM usage_events
GROUP BY tenant_id, meter, bucket;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hour_mv TO usage_hour AS
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
FROM usage_events
GROUP BY tenant_id, meter, bucket, route, method, status, dims;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_day_mv TO usage_day AS
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
FROM usage_events
GROUP BY tenant_id, meter, bucket, route, method, status, dims;
