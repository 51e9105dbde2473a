-- Funnels: a named sequence of steps, edited as numbered versions. A version is a draft until
-- published; publishing freezes it (its steps and rules can no longer change) and stores an
-- immutable snapshot in funnel_publication, which is what reports read.
--
-- Guards below tell a direct statement (pg_trigger_depth() = 1) from a cascade of a foreign
-- key (depth > 1): deleting a tenant, workspace or funnel still removes everything it owns,
-- but nobody can edit or delete a published definition piecemeal.

CREATE TABLE funnel (
    tenant_id     bigint      NOT NULL,
    id            bigint      GENERATED ALWAYS AS IDENTITY,
    workspace_id  bigint      NOT NULL,
    name          text        NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    description   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    archived_at   timestamptz,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, workspace_id, name),
    FOREIGN KEY (tenant_id, workspace_id) REFERENCES workspace (tenant_id, id) ON DELETE CASCADE
);

CREATE TABLE funnel_version (
    tenant_id                  bigint      NOT NULL,
    funnel_id                  bigint      NOT NULL,
    version                    integer     NOT NULL CHECK (version >= 1),
    status                     text        NOT NULL DEFAULT 'draft'
                               CHECK (status IN ('draft', 'published', 'archived')),
    -- How long after step 1 a visitor may take to complete the funnel.
    conversion_window_seconds  integer     NOT NULL DEFAULT 604800
                               CHECK (conversion_window_seconds BETWEEN 1 AND 31622400),
    created_at                 timestamptz NOT NULL DEFAULT now(),
    published_at               timestamptz,
    PRIMARY KEY (tenant_id, funnel_id, version),
    FOREIGN KEY (tenant_id, funnel_id) REFERENCES funnel (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT funnel_version_published_at_iff_not_draft
        CHECK ((status = 'draft') = (published_at IS NULL))
);

-- One draft being edited and one live version per funnel at a time.
CREATE UNIQUE INDEX funnel_version_one_draft ON funnel_version (tenant_id, funnel_id) WHERE status = 'draft';
CREATE UNIQUE INDEX funnel_version_one_published ON funnel_version (tenant_id, funnel_id) WHERE status = 'published';

CREATE TABLE funnel_step (
    tenant_id  bigint  NOT NULL,
    funnel_id  bigint  NOT NULL,
    version    integer NOT NULL,
    -- 1-based order of the step; the primary key makes positions unique within a version.
    position   integer NOT NULL CHECK (position BETWEEN 1 AND 50),
    name       text    NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    PRIMARY KEY (tenant_id, funnel_id, version, position),
    FOREIGN KEY (tenant_id, funnel_id, version)
        REFERENCES funnel_version (tenant_id, funnel_id, version) ON DELETE CASCADE
);

-- Shape of a step's match rule (docs/database.md, "Funnels"):
--   {"event_type": "track"|"page"|"screen"|"group"|"pixel",
--    "name": "Signed Up",                                      (optional)
--    "where": [{"field": "properties.plan", "op": "eq", "value": "pro"}, ...]}  (optional)
-- ops: eq ne contains starts_with gt gte lt lte in (value an array) exists (no value).
-- CASE guards keep each test from running on a value of the wrong JSON type.
CREATE FUNCTION funnel_rule_is_valid(r jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
SELECT coalesce(CASE WHEN jsonb_typeof(r) <> 'object' THEN false ELSE
    (SELECT bool_and(k IN ('event_type', 'name', 'where')) FROM jsonb_object_keys(r) AS k)
    AND jsonb_typeof(r -> 'event_type') = 'string'
    AND r ->> 'event_type' IN ('track', 'page', 'screen', 'group', 'pixel')
    AND (NOT r ? 'name' OR jsonb_typeof(r -> 'name') = 'string')
    AND (NOT r ? 'where' OR CASE WHEN jsonb_typeof(r -> 'where') <> 'array' THEN false ELSE
        coalesce((SELECT bool_and(CASE WHEN jsonb_typeof(c) <> 'object' THEN false ELSE
            (SELECT bool_and(k IN ('field', 'op', 'value')) FROM jsonb_object_keys(c) AS k)
            AND jsonb_typeof(c -> 'field') = 'string'
            AND c ->> 'field' ~ '^(properties|context)(\.[A-Za-z0-9_$-]+)+$'
            AND c ->> 'op' IN ('eq', 'ne', 'contains', 'starts_with', 'gt', 'gte', 'lt', 'lte', 'in', 'exists')
            AND (c ->> 'op' = 'exists') = NOT (c ? 'value')
            AND (c ->> 'op' <> 'in' OR jsonb_typeof(c -> 'value') = 'array')
        END) FROM jsonb_array_elements(r -> 'where') AS c), true)
    END)
END, false)
$$;

CREATE TABLE funnel_step_match (
    tenant_id  bigint  NOT NULL,
    funnel_id  bigint  NOT NULL,
    version    integer NOT NULL,
    position   integer NOT NULL,
    -- A step is reached when any of its rules matches; ordinal orders them for display.
    ordinal    integer NOT NULL CHECK (ordinal >= 1),
    rule       jsonb   NOT NULL CONSTRAINT funnel_step_match_rule_shape CHECK (funnel_rule_is_valid(rule)),
    PRIMARY KEY (tenant_id, funnel_id, version, position, ordinal),
    FOREIGN KEY (tenant_id, funnel_id, version, position)
        REFERENCES funnel_step (tenant_id, funnel_id, version, position) ON DELETE CASCADE
);

-- The frozen definition of a published version. Never updated; deleted only with its funnel.
CREATE TABLE funnel_publication (
    tenant_id     bigint      NOT NULL,
    funnel_id     bigint      NOT NULL,
    version       integer     NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT now(),
    published_by  text,
    definition    jsonb       NOT NULL
                  CHECK (jsonb_typeof(definition) = 'object' AND jsonb_typeof(definition -> 'steps') = 'array'),
    PRIMARY KEY (tenant_id, funnel_id, version),
    FOREIGN KEY (tenant_id, funnel_id, version)
        REFERENCES funnel_version (tenant_id, funnel_id, version) ON DELETE CASCADE
);

CREATE FUNCTION funnel_publication_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND pg_trigger_depth() > 1 THEN
        RETURN OLD; -- cascade from deleting the funnel, workspace or tenant
    END IF;
    RAISE EXCEPTION 'funnel publications are immutable (% refused)', TG_OP
        USING ERRCODE = 'integrity_constraint_violation',
              HINT = 'publish a new version of the funnel instead (funnel_publish)';
END
$$;

CREATE TRIGGER funnel_publication_immutable BEFORE UPDATE OR DELETE ON funnel_publication
    FOR EACH ROW EXECUTE FUNCTION funnel_publication_immutable();
CREATE TRIGGER funnel_publication_no_truncate BEFORE TRUNCATE ON funnel_publication
    FOR EACH STATEMENT EXECUTE FUNCTION funnel_publication_immutable();

-- A version that left draft is frozen: it may only go from published to archived.
CREATE FUNCTION funnel_version_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 OR OLD.status = 'draft' THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'published' AND NEW.status = 'archived'
       AND (NEW.tenant_id, NEW.funnel_id, NEW.version, NEW.conversion_window_seconds,
            NEW.created_at, NEW.published_at)
           IS NOT DISTINCT FROM
           (OLD.tenant_id, OLD.funnel_id, OLD.version, OLD.conversion_window_seconds,
            OLD.created_at, OLD.published_at) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'funnel % version % is %: % refused', OLD.funnel_id, OLD.version, OLD.status, TG_OP
        USING ERRCODE = 'integrity_constraint_violation',
              HINT = 'edit a new draft version instead';
END
$$;

CREATE TRIGGER funnel_version_guard BEFORE UPDATE OR DELETE ON funnel_version
    FOR EACH ROW EXECUTE FUNCTION funnel_version_guard();

-- Steps and rules change only while their version is a draft.
CREATE FUNCTION funnel_step_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    st text;
BEGIN
    IF pg_trigger_depth() > 1 THEN
        RETURN r;
    END IF;
    SELECT status INTO st FROM funnel_version
     WHERE tenant_id = r.tenant_id AND funnel_id = r.funnel_id AND version = r.version;
    IF TG_OP = 'UPDATE' AND st IS NOT DISTINCT FROM 'draft' THEN
        -- moving a row to another version: that version must be a draft too
        SELECT status INTO st FROM funnel_version
         WHERE tenant_id = OLD.tenant_id AND funnel_id = OLD.funnel_id AND version = OLD.version;
    END IF;
    IF st IS NOT NULL AND st <> 'draft' THEN
        RAISE EXCEPTION 'funnel % version % is %: its steps cannot change', r.funnel_id, r.version, st
            USING ERRCODE = 'integrity_constraint_violation',
                  HINT = 'edit a new draft version instead';
    END IF;
    RETURN r;
END
$$;

CREATE TRIGGER funnel_step_guard BEFORE INSERT OR UPDATE OR DELETE ON funnel_step
    FOR EACH ROW EXECUTE FUNCTION funnel_step_guard();
CREATE TRIGGER funnel_step_match_guard BEFORE INSERT OR UPDATE OR DELETE ON funnel_step_match
    FOR EACH ROW EXECUTE FUNCTION funnel_step_guard();

-- Publishes a draft: snapshots its steps and rules into funnel_publication, archives the
-- version that was live, and marks this one published, all in the caller's transaction.
CREATE FUNCTION funnel_publish(p_tenant bigint, p_funnel bigint, p_version integer, p_by text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v funnel_version;
    def jsonb;
BEGIN
    SELECT * INTO v FROM funnel_version
     WHERE tenant_id = p_tenant AND funnel_id = p_funnel AND version = p_version FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'funnel % has no version % in tenant %', p_funnel, p_version, p_tenant
            USING ERRCODE = 'no_data_found';
    END IF;
    IF v.status <> 'draft' THEN
        RAISE EXCEPTION 'funnel % version % is already %', p_funnel, p_version, v.status
            USING ERRCODE = 'integrity_constraint_violation', HINT = 'publish a draft version';
    END IF;
    SELECT jsonb_build_object(
               'funnel_id', f.id, 'version', v.version, 'name', f.name,
               'conversion_window_seconds', v.conversion_window_seconds,
               'steps', coalesce((
                   SELECT jsonb_agg(jsonb_build_object(
                              'position', s.position, 'name', s.name,
                              'match', coalesce((SELECT jsonb_agg(m.rule ORDER BY m.ordinal)
                                                   FROM funnel_step_match m
                                                  WHERE m.tenant_id = s.tenant_id AND m.funnel_id = s.funnel_id
                                                    AND m.version = s.version AND m.position = s.position),
                                                '[]'::jsonb))
                            ORDER BY s.position)
                     FROM funnel_step s
                    WHERE s.tenant_id = p_tenant AND s.funnel_id = p_funnel AND s.version = p_version),
                   '[]'::jsonb))
      INTO def
      FROM funnel f WHERE f.tenant_id = p_tenant AND f.id = p_funnel;
    IF jsonb_array_length(def -> 'steps') = 0 THEN
        RAISE EXCEPTION 'funnel % version % has no steps', p_funnel, p_version
            USING ERRCODE = 'check_violation', HINT = 'add at least one step before publishing';
    END IF;
    UPDATE funnel_version SET status = 'archived'
     WHERE tenant_id = p_tenant AND funnel_id = p_funnel AND status = 'published';
    UPDATE funnel_version SET status = 'published', published_at = now()
     WHERE tenant_id = p_tenant AND funnel_id = p_funnel AND version = p_version;
    INSERT INTO funnel_publication (tenant_id, funnel_id, version, published_by, definition)
    VALUES (p_tenant, p_funnel, p_version, p_by, def);
    RETURN def;
END
$$;
