-- Events and sessions, and the writer's bookkeeping (dedup claims, Kafka offsets).
-- Hot-path tables: no foreign keys, few indexes (DESIGN §6 has the measured cost of each).

CREATE TABLE session (
    tenant_id     bigint      NOT NULL,
    -- Client-made, so unique only inside a tenant.
    session_id    text        NOT NULL CHECK (session_id <> ''),
    workspace_id  bigint      NOT NULL,
    anonymous_id  text,
    user_id       text,
    started_at    timestamptz NOT NULL,
    last_seen_at  timestamptz NOT NULL,
    event_count   bigint      NOT NULL DEFAULT 0 CHECK (event_count >= 0),
    page_count    bigint      NOT NULL DEFAULT 0 CHECK (page_count >= 0),
    utm           jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(utm) = 'object'),
    referrer      text,
    landing_page  text,
    device        jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(device) = 'object'),
    geo           jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(geo) = 'object'),
    PRIMARY KEY (tenant_id, session_id),
    CONSTRAINT session_seen_in_order CHECK (last_seen_at >= started_at)
);

-- "Sessions of this tenant in a time range" (dashboards) and "sessions of this visitor".
CREATE INDEX session_started_idx ON session (tenant_id, started_at);
CREATE INDEX session_visitor_idx ON session (tenant_id, anonymous_id, started_at);

-- Range by month on occurred_at (retention drops whole months), each month hashed by
-- tenant_id into leaves (spreads one month's writes and vacuum work). Months and leaves are
-- made by event_ensure_month below (sluice-schema partitions / the writer). There is no
-- DEFAULT partition on purpose: a row for a month without a partition is an error the
-- writer answers by creating the month, never a silent pile-up in a catch-all table.
CREATE TABLE event (
    tenant_id           bigint      NOT NULL,
    occurred_at         timestamptz NOT NULL,
    event_id            uuid        NOT NULL,
    workspace_id        bigint      NOT NULL,
    type                text        NOT NULL CHECK (type IN ('track', 'page', 'screen', 'group', 'pixel')),
    name                text,
    anonymous_id        text,
    user_id             text,
    session_id          text,
    message_id          text        NOT NULL,
    received_at         timestamptz NOT NULL,
    sent_at             timestamptz,
    original_timestamp  timestamptz,
    properties          jsonb       NOT NULL DEFAULT '{}',
    context             jsonb       NOT NULL DEFAULT '{}',
    ip                  inet,
    user_agent          text,
    bot                 boolean     NOT NULL DEFAULT false,
    -- Leads with time after the tenant, so inserts append (cheap) and it doubles as the
    -- "tenant + time range" index.
    PRIMARY KEY (tenant_id, occurred_at, event_id)
) PARTITION BY RANGE (occurred_at);

-- "Events named X of this tenant over time" (funnels, counts).
CREATE INDEX event_name_idx ON event (tenant_id, name, occurred_at);
-- "Timeline of this visitor".
CREATE INDEX event_visitor_idx ON event (tenant_id, anonymous_id, occurred_at);

-- Creates the month of `p_month` (any day of it) with `p_modulus` hash leaves, when it does
-- not exist yet; returns true when it created it. An existing month keeps its modulus.
-- The month table and its leaves are built detached and then ATTACHed: ATTACH PARTITION takes
-- only a SHARE UPDATE EXCLUSIVE lock on event, so running writers' COPYs are not blocked
-- (CREATE TABLE ... PARTITION OF event would take ACCESS EXCLUSIVE). Callers may race: the
-- transaction-scoped advisory lock serialises them and the loser sees the month exists.
CREATE FUNCTION event_ensure_month(p_month date, p_modulus integer) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    month_start date := date_trunc('month', p_month)::date;
    lo timestamptz := month_start::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC';
    tbl text := format('event_y%sm%s', to_char(month_start, 'YYYY'), to_char(month_start, 'MM'));
    i integer;
BEGIN
    IF p_modulus IS NULL OR p_modulus < 1 OR p_modulus > 1024 THEN
        RAISE EXCEPTION 'event partition modulus must be between 1 and 1024, got %', p_modulus
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('sluice.event_partitions', 0));
    IF to_regclass(format('%I', tbl)) IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM pg_inherits
                       WHERE inhrelid = to_regclass(format('%I', tbl))
                         AND inhparent = 'event'::regclass) THEN
            RAISE EXCEPTION 'table % exists but is not a partition of event', tbl
                USING HINT = 'attach it (ALTER TABLE event ATTACH PARTITION ...) or drop it, then retry';
        END IF;
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE event INCLUDING DEFAULTS INCLUDING CONSTRAINTS) '
                   'PARTITION BY HASH (tenant_id)', tbl);
    FOR i IN 0 .. p_modulus - 1 LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES WITH (MODULUS %s, REMAINDER %s)',
                       tbl || '_p' || i, tbl, p_modulus, i);
    END LOOP;
    EXECUTE format('ALTER TABLE event ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', tbl, lo, hi);
    RETURN true;
END
$$;

-- Event ids claimed by the writer, in the same transaction as the event rows: a client retry
-- of one messageId has the same event_id but possibly a different skew-corrected occurred_at,
-- which the event primary key alone would not catch. Rows older than the dedup window are
-- pruned by the writer.
CREATE TABLE event_dedup (
    tenant_id    bigint      NOT NULL,
    event_id     uuid        NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);

-- Pruning deletes by age; rows arrive in received_at order, so a BRIN index finds them at
-- almost no insert cost (a btree here would be a second random-order index on the hot path).
CREATE INDEX event_dedup_received_brin ON event_dedup USING brin (received_at);

-- Kafka positions of the writer, stored in the same transaction as the rows they produced:
-- the exactly-once effect of DESIGN §5.
CREATE TABLE writer_offset (
    consumer_group  text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    next_offset     bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
