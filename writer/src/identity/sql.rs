//! The statements of the identity step, prepared once per batch.

/// Every lead each lookup row reaches (slot, lead id): by user id, email fingerprint, phone
/// fingerprint and anonymous-id link, one index lookup per branch (see `FIND_LEADS` on `OR`).
pub(super) const FIND_MATCHES: &str = "SELECT DISTINCT q.slot, m.id \
    FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bytea[], $5::bytea[], $6::text[]) \
      AS q(slot, tenant_id, user_id, email_fp, phone_fp, anonymous_id) \
    CROSS JOIN LATERAL ( \
      (SELECT l.id FROM lead l WHERE l.tenant_id = q.tenant_id AND l.user_id = q.user_id) \
      UNION ALL (SELECT l.id FROM lead l \
        WHERE l.tenant_id = q.tenant_id AND l.email_fingerprint = q.email_fp) \
      UNION ALL (SELECT l.id FROM lead l \
        WHERE l.tenant_id = q.tenant_id AND l.phone_fingerprint = q.phone_fp) \
      UNION ALL (SELECT k.lead_id FROM identity_link k \
        WHERE k.tenant_id = q.tenant_id AND k.anonymous_id = q.anonymous_id) \
    ) m(id)";

/// The best lead for each identify of a wave (arrays in, one row per match, by ordinality):
/// same user id, then same email fingerprint, then same phone
/// fingerprint, then the lowest-id lead the anonymous id is linked to. One index lookup per
/// branch: an `OR` of the four in one `WHERE` (the first version) made PostgreSQL read every
/// lead of the tenant for each identify (a bitmap scan on `tenant_id` filtered row by row),
/// so each call grew with the tenant's leads and 20,000-message batches took 5-30 s.
pub(super) const FIND_LEADS: &str = "SELECT q.n, m.id, m.email_ciphertext, m.phone_ciphertext, m.pii_key_id \
    FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bytea[], $5::text[]) \
      WITH ORDINALITY AS q(tenant_id, user_id, email_fp, phone_fp, anonymous_id, n) \
    CROSS JOIN LATERAL ( \
      SELECT * FROM ( \
        (SELECT 1 AS rank, l.* FROM lead l WHERE l.tenant_id = q.tenant_id AND l.user_id = q.user_id) \
        UNION ALL (SELECT 2, l.* FROM lead l \
          WHERE l.tenant_id = q.tenant_id AND l.email_fingerprint = q.email_fp) \
        UNION ALL (SELECT 3, l.* FROM lead l \
          WHERE l.tenant_id = q.tenant_id AND l.phone_fingerprint = q.phone_fp) \
        UNION ALL (SELECT 4, l.* FROM identity_link k JOIN lead l \
          ON l.tenant_id = k.tenant_id AND l.id = k.lead_id \
          WHERE k.tenant_id = q.tenant_id AND k.anonymous_id = q.anonymous_id) \
      ) c ORDER BY rank, id LIMIT 1 \
    ) m";

/// The found leads of a wave's identifies, updated (arrays in, one row each). A fingerprint
/// owned by another lead stays there (unique per tenant): the call is attached to the best
/// match and does not steal it. One statement for the wave: per-lead statements, even
/// pipelined, cost PostgreSQL ~100-200 us each (a fifth of a mixed drain's time).
pub(super) const UPDATE_LEADS: &str =
    "UPDATE lead l SET user_id = coalesce(l.user_id, q.user_id), \
       traits = l.traits || q.traits, email_ciphertext = q.email_ct, \
       phone_ciphertext = q.phone_ct, pii_key_id = q.key_id, \
       email_fingerprint = CASE WHEN q.email_fp IS NULL OR EXISTS (SELECT 1 FROM lead o \
         WHERE o.tenant_id = q.tenant_id AND o.email_fingerprint = q.email_fp AND o.id <> q.id) \
         THEN l.email_fingerprint ELSE q.email_fp END, \
       phone_fingerprint = CASE WHEN q.phone_fp IS NULL OR EXISTS (SELECT 1 FROM lead o \
         WHERE o.tenant_id = q.tenant_id AND o.phone_fingerprint = q.phone_fp AND o.id <> q.id) \
         THEN l.phone_fingerprint ELSE q.phone_fp END, \
       updated_at = now() \
     FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::jsonb[], $5::bytea[], $6::bytea[], \
       $7::text[], $8::bytea[], $9::bytea[]) \
       AS q(tenant_id, id, user_id, traits, email_ct, phone_ct, key_id, email_fp, phone_fp) \
     WHERE l.tenant_id = q.tenant_id AND l.id = q.id";

/// New leads of a wave's identifies, in one statement; returns (ordinality, id). The ids are
/// drawn first, in message order, so that each row's id is known without relying on the
/// order of `RETURNING`.
pub(super) const INSERT_LEADS: &str = "WITH q AS MATERIALIZED (SELECT *, \
       nextval(pg_get_serial_sequence('lead', 'id')) AS id \
       FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bytea[], $5::bytea[], $6::text[], \
         $7::bytea[], $8::bytea[], $9::jsonb[]) WITH ORDINALITY \
         AS u(tenant_id, workspace_id, user_id, email_ct, phone_ct, key_id, email_fp, phone_fp, \
           traits, n) \
       ORDER BY n), \
     ins AS (INSERT INTO lead (tenant_id, id, workspace_id, user_id, email_ciphertext, \
       phone_ciphertext, pii_key_id, email_fingerprint, phone_fingerprint, traits) \
       OVERRIDING SYSTEM VALUE \
       SELECT tenant_id, id, workspace_id, user_id, email_ct, phone_ct, key_id, email_fp, \
         phone_fp, traits FROM q) \
     SELECT n, id FROM q";

/// The lead an alias renames or links to: the one known by the new user id first.
pub(super) const FIND_ALIAS: &str =
    "SELECT id, user_id FROM lead WHERE tenant_id = $1 AND user_id IN ($2, $3) \
     ORDER BY (user_id = $2) DESC LIMIT 1";

pub(super) const RENAME_LEAD: &str =
    "UPDATE lead SET user_id = $3, updated_at = now() WHERE tenant_id = $1 AND id = $2";

pub(super) const INSERT_ALIAS: &str =
    "INSERT INTO lead (tenant_id, workspace_id, user_id) VALUES ($1, $2, $3) RETURNING id";

/// The link, and the visitor row (it may not exist yet: its topic is consumed independently)
/// pointed at its lead, in one statement.
pub(super) const LINK: &str = "WITH q AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], \
       $4::text[], $5::timestamptz[], $6::timestamptz[]) \
       AS q(tenant_id, anonymous_id, lead_id, kind, first_at, last_at)), \
     link AS (INSERT INTO identity_link AS l (tenant_id, anonymous_id, lead_id, kind, \
       first_seen_at, last_seen_at) SELECT tenant_id, anonymous_id, lead_id, kind, first_at, last_at \
       FROM q ORDER BY tenant_id, anonymous_id \
     ON CONFLICT (tenant_id, anonymous_id, lead_id) DO UPDATE SET \
       first_seen_at = least(l.first_seen_at, excluded.first_seen_at), \
       last_seen_at = greatest(l.last_seen_at, excluded.last_seen_at)) \
     UPDATE visitor v SET lead_id = q.lead_id FROM q \
     WHERE v.tenant_id = q.tenant_id AND v.anonymous_id = q.anonymous_id \
       AND v.lead_id IS DISTINCT FROM q.lead_id";
