-- Back to 0004's publishing: the function's own status moves, no publication trigger.
DROP TRIGGER funnel_publication_publish ON funnel_publication;
DROP FUNCTION funnel_publication_publish();

CREATE OR REPLACE FUNCTION funnel_publish(p_tenant bigint, p_funnel bigint, p_version integer, p_by text)
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

DROP TRIGGER funnel_version_guard ON funnel_version;
CREATE OR REPLACE FUNCTION funnel_version_guard() RETURNS trigger
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

DROP FUNCTION funnel_definition(bigint, bigint, integer);
