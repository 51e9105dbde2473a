-- Back to one unpartitioned claim table keyed by tenant and event id (0003); the day claims
-- are dropped with their table, as 0007 dropped 0003's.
DROP FUNCTION event_dedup_ensure_day(date);
DROP TABLE event_dedup;

CREATE TABLE event_dedup (
    tenant_id    bigint      NOT NULL,
    event_id     uuid        NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX event_dedup_received_brin ON event_dedup USING brin (received_at);
