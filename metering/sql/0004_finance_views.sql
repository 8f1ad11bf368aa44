-- Finance views: the hourly and daily rollups with their states finalized, so plain SQL
-- (sum, max, GROUP BY) works on them. `events_net` is the value of a COUNT meter (events
-- plus signed corrections). `subjects` is distinct per row: distinct counts do not add up
-- across rows, so count distinct users over a period on the rollup with uniqExactMerge.
CREATE VIEW IF NOT EXISTS usage_hourly AS
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

CREATE VIEW IF NOT EXISTS usage_daily AS
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
