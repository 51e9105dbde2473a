-- Publishing is the only way a funnel version leaves draft (issue 13). 0004 froze what was
-- published, but a direct `UPDATE funnel_version SET status = 'published'` made a published
-- version without a snapshot, and any definition could be inserted into funnel_publication.
--
-- Now the insert into funnel_publication *is* the publish: its trigger checks that the version
-- is a draft and that the definition is exactly that draft's snapshot, and then moves the
-- statuses itself (a nested statement, pg_trigger_depth() > 1). A direct statement
-- (depth 1) can no longer create a version that is not a draft, nor move one out of draft.
-- funnel_publish computes the snapshot and inserts it: the one way callers publish.

-- The snapshot of a version's steps and rules, as reports read it.
CREATE FUNCTION funnel_definition(p_tenant bigint, p_funnel bigint, p_version integer)
RETURNS jsonb LANGUAGE sql STABLE AS $$
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
                WHERE s.tenant_id = v.tenant_id AND s.funnel_id = v.funnel_id AND s.version = v.version),
               '[]'::jsonb))
  FROM funnel f
  JOIN funnel_version v ON v.tenant_id = f.tenant_id AND v.funnel_id = f.id
 WHERE f.tenant_id = p_tenant AND f.id = p_funnel AND v.version = p_version
$$;

-- A version is created as a draft, and leaves draft only by being published.
CREATE OR REPLACE FUNCTION funnel_version_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> 'draft' THEN
            RAISE EXCEPTION 'funnel % version % must be created as a draft, not %', NEW.funnel_id, NEW.version, NEW.status
                USING ERRCODE = 'integrity_constraint_violation',
                      HINT = 'insert a draft, then publish it with funnel_publish(tenant, funnel, version, by)';
        END IF;
        RETURN NEW;
    END IF;
    IF OLD.status = 'draft' THEN
        IF TG_OP = 'UPDATE' AND NEW.status <> 'draft' THEN
            RAISE EXCEPTION 'funnel % version % is a draft: setting it % refused', OLD.funnel_id, OLD.version, NEW.status
                USING ERRCODE = 'integrity_constraint_violation',
                      HINT = 'publish it with funnel_publish(tenant, funnel, version, by), which stores its snapshot';
        END IF;
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

DROP TRIGGER funnel_version_guard ON funnel_version;
CREATE TRIGGER funnel_version_guard BEFORE INSERT OR UPDATE OR DELETE ON funnel_version
    FOR EACH ROW EXECUTE FUNCTION funnel_version_guard();

-- The insert of a publication publishes: only a draft's own snapshot is accepted, and the
-- statuses move with it (the live version archived, this one published).
CREATE FUNCTION funnel_publication_publish() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT status INTO st FROM funnel_version
     WHERE tenant_id = NEW.tenant_id AND funnel_id = NEW.funnel_id AND version = NEW.version
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NEW; -- the foreign key refuses it, with its own name
    END IF;
    IF st <> 'draft' THEN
        RAISE EXCEPTION 'funnel % version % is already %', NEW.funnel_id, NEW.version, st
            USING ERRCODE = 'integrity_constraint_violation', HINT = 'publish a draft version';
    END IF;
    IF NEW.definition IS DISTINCT FROM funnel_definition(NEW.tenant_id, NEW.funnel_id, NEW.version) THEN
        RAISE EXCEPTION 'funnel % version %: a publication must be the snapshot of the draft''s steps', NEW.funnel_id, NEW.version
            USING ERRCODE = 'integrity_constraint_violation',
                  HINT = 'publish with funnel_publish(tenant, funnel, version, by), which takes the snapshot';
    END IF;
    IF jsonb_array_length(NEW.definition -> 'steps') = 0 THEN
        RAISE EXCEPTION 'funnel % version % has no steps', NEW.funnel_id, NEW.version
            USING ERRCODE = 'check_violation', HINT = 'add at least one step before publishing';
    END IF;
    NEW.published_at := now();
    UPDATE funnel_version SET status = 'archived'
     WHERE tenant_id = NEW.tenant_id AND funnel_id = NEW.funnel_id AND status = 'published';
    UPDATE funnel_version SET status = 'published', published_at = NEW.published_at
     WHERE tenant_id = NEW.tenant_id AND funnel_id = NEW.funnel_id AND version = NEW.version;
    RETURN NEW;
END
$$;

CREATE TRIGGER funnel_publication_publish BEFORE INSERT ON funnel_publication
    FOR EACH ROW EXECUTE FUNCTION funnel_publication_publish();

-- Publishes a draft in the caller's transaction; returns the snapshot.
CREATE OR REPLACE FUNCTION funnel_publish(p_tenant bigint, p_funnel bigint, p_version integer, p_by text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    def jsonb := funnel_definition(p_tenant, p_funnel, p_version);
BEGIN
    IF def IS NULL THEN
        RAISE EXCEPTION 'funnel % has no version % in tenant %', p_funnel, p_version, p_tenant
            USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO funnel_publication (tenant_id, funnel_id, version, published_by, definition)
    VALUES (p_tenant, p_funnel, p_version, p_by, def);
    RETURN def;
END
$$;
