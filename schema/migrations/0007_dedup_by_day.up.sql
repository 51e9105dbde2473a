-- Dedup claims by day (docs/architecture.md §5): the claim key leads with the client's own
-- timestamp in milliseconds (which a retry repeats), so index inserts land at the right edge
-- of a small, recent part of the index instead of anywhere in a B-tree over a whole window of
-- random UUIDs, and each UTC day of keys is a partition of its own that expires by DROP, not
-- by row-by-row DELETE. The writer computes key_ms (schema/src/dedup.rs): the timestamp when
-- it lies within the window around the receipt, else the start of the receipt's UTC day.
--
-- The claims of 0003 are not carried over: they are keyed by the event id alone, and a retry
-- arriving after this migration is looked up by its new key, which they do not have. A client
-- retry whose first delivery was stored before the upgrade is stored again (once).
DROP TABLE event_dedup;

CREATE TABLE event_dedup (
    key_ms    bigint NOT NULL,
    event_id  uuid   NOT NULL,
    PRIMARY KEY (key_ms, event_id)
) PARTITION BY RANGE (key_ms);

-- Creates the partition of the UTC day `p_day` when it does not exist yet; returns true when
-- it created it. Like event_ensure_month (0003) it builds the table detached and ATTACHes it,
-- which takes only a SHARE UPDATE EXCLUSIVE lock on event_dedup: running claims go on.
CREATE FUNCTION event_dedup_ensure_day(p_day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    lo bigint := (extract(epoch FROM p_day::timestamp) * 1000)::bigint;
    hi bigint := (extract(epoch FROM (p_day + 1)::timestamp) * 1000)::bigint;
    tbl text := format('event_dedup_d%s', to_char(p_day, 'YYYYMMDD'));
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('sluice.event_dedup_partitions', 0));
    IF to_regclass(format('%I', tbl)) IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM pg_inherits
                       WHERE inhrelid = to_regclass(format('%I', tbl))
                         AND inhparent = 'event_dedup'::regclass) THEN
            RAISE EXCEPTION 'table % exists but is not a partition of event_dedup', tbl
                USING HINT = 'drop it (it holds only dedup claims), then retry';
        END IF;
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE event_dedup INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', tbl);
    EXECUTE format('ALTER TABLE event_dedup ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', tbl, lo, hi);
    RETURN true;
END
$$;
