-- One tenant analyst on a cluster set up with cluster.sql: a read-only user with the
-- tollway_analyst role who sees only one tenant's rows. A template: replace the user name
-- (acme_analyst), the tenant id and the password, then run it like cluster.sql. A granted
-- role is a default role unless the user's default roles were narrowed.
-- Users without a policy on these tables keep seeing all rows only while the server's
-- users_without_row_policies_can_read_rows is on (the default).

CREATE USER IF NOT EXISTS acme_analyst ON CLUSTER '{cluster}'
    IDENTIFIED WITH sha256_password BY 'replace-with-a-long-random-password';

GRANT ON CLUSTER '{cluster}' tollway_analyst TO acme_analyst;

CREATE ROW POLICY IF NOT EXISTS acme_analyst_tenant ON CLUSTER '{cluster}' ON usage_events
    FOR SELECT USING tenant_id = 'acme-robotics' TO acme_analyst;
CREATE ROW POLICY IF NOT EXISTS acme_analyst_tenant ON CLUSTER '{cluster}' ON usage_minute
    FOR SELECT USING tenant_id = 'acme-robotics' TO acme_analyst;
CREATE ROW POLICY IF NOT EXISTS acme_analyst_tenant ON CLUSTER '{cluster}' ON usage_hour
    FOR SELECT USING tenant_id = 'acme-robotics' TO acme_analyst;
CREATE ROW POLICY IF NOT EXISTS acme_analyst_tenant ON CLUSTER '{cluster}' ON usage_day
    FOR SELECT USING tenant_id = 'acme-robotics' TO acme_analyst;
CREATE ROW POLICY IF NOT EXISTS acme_analyst_tenant ON CLUSTER '{cluster}' ON usage_events_local
    FOR SELECT USING tenant_id = 'acme-robotics' TO acme_analyst;
CREATE ROW POLICY IF NOT EXISTS acme_analyst_tenant ON CLUSTER '{cluster}' ON usage_minute_local
    FOR SELECT USING tenant_id = 'acme-robotics' TO acme_analyst;
CREATE ROW POLICY IF NOT EXISTS acme_analyst_tenant ON CLUSTER '{cluster}' ON usage_hour_local
    FOR SELECT USING tenant_id = 'acme-robotics' TO acme_analyst;
CREATE ROW POLICY IF NOT EXISTS acme_analyst_tenant ON CLUSTER '{cluster}' ON usage_day_local
    FOR SELECT USING tenant_id = 'acme-robotics' TO acme_analyst;
