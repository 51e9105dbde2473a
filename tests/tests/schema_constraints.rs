//! Every foreign key and constraint of the schema, each with the error a bad row gets, and
//! tenant isolation: the same client-made ids in two tenants are two rows that scoped
//! queries never mix.

use sluice_schema::control;
use sluice_tests::TestDb;
use sluice_tests::{query_pairs, query_scalar};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Runs `sql`, which must fail; returns the SQLSTATE, the constraint named (if any) and the
/// message.
async fn refused(client: &Client, sql: &str) -> (SqlState, String, String) {
    let err = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("accepted: {sql}"));
    let db = err.as_db_error().expect("a server error");
    (
        db.code().clone(),
        db.constraint().unwrap_or_default().to_owned(),
        db.message().to_owned(),
    )
}

/// Runs `sql`, which `constraint` must refuse with SQLSTATE `state`.
async fn assert_refused_by(client: &Client, sql: &str, state: SqlState, constraint: &str) {
    let (code, name, msg) = refused(client, sql).await;
    assert_eq!(code, state, "{sql}: {msg}");
    assert_eq!(name, constraint, "{sql}: {msg}");
}

async fn assert_check(client: &Client, sql: &str, constraint: &str) {
    assert_refused_by(client, sql, SqlState::CHECK_VIOLATION, constraint).await;
}

async fn assert_fk(client: &Client, sql: &str, constraint: &str) {
    assert_refused_by(client, sql, SqlState::FOREIGN_KEY_VIOLATION, constraint).await;
}

async fn assert_unique(client: &Client, sql: &str, constraint: &str) {
    assert_refused_by(client, sql, SqlState::UNIQUE_VIOLATION, constraint).await;
}

/// Two tenants with a workspace each: (tenant, workspace) pairs.
async fn two_tenants(client: &Client) -> [(i64, i64); 2] {
    let mut out = [(0, 0); 2];
    for (i, name) in ["alpha", "beta"].into_iter().enumerate() {
        let t = control::create_tenant(client, name)
            .await
            .expect("two_tenants");
        let w = control::create_workspace(client, t, "web")
            .await
            .expect("two_tenants");
        out[i] = (t, w);
    }
    out
}

const HASH: &str = "'\\x0000000000000000000000000000000000000000000000000000000000000000'";

#[tokio::test]
async fn control_plane_keys_and_checks() {
    let db = TestDb::migrated().await.unwrap();
    let c = db.client().await.unwrap();
    let [(t1, w1), (t2, w2)] = two_tenants(&c).await;

    assert_check(
        &c,
        "INSERT INTO tenant (name) VALUES ('  ')",
        "tenant_name_check",
    )
    .await;
    assert_fk(
        &c,
        "INSERT INTO workspace (tenant_id, name) VALUES (999999, 'x')",
        "workspace_tenant_id_fkey",
    )
    .await;
    assert_unique(
        &c,
        &format!("INSERT INTO workspace (tenant_id, name) VALUES ({t1}, 'web')"),
        "workspace_tenant_id_name_key",
    )
    .await;
    // A key cannot name the workspace of another tenant: the composite key refuses it.
    assert_fk(
        &c,
        &format!("INSERT INTO api_key (tenant_id, workspace_id, prefix, hash) VALUES ({t1}, {w2}, 'AAAAAAAA', {HASH})"),
        "api_key_tenant_id_workspace_id_fkey",
    )
    .await;
    let key = |prefix: &str, hash: &str, extra: &str| {
        format!("INSERT INTO api_key (tenant_id, workspace_id, prefix, hash{}) VALUES ({t1}, {w1}, '{prefix}', {hash}{})",
            extra.split_once('|').map_or(String::new(), |(c, _)| format!(", {c}")),
            extra.split_once('|').map_or(String::new(), |(_, v)| format!(", {v}")))
    };
    assert_check(&c, &key("short", HASH, ""), "api_key_prefix_check").await;
    assert_check(&c, &key("AAAA-AAA", HASH, ""), "api_key_prefix_check").await;
    assert_check(&c, &key("AAAAAAAA", "'\\x00'", ""), "api_key_hash_check").await;
    assert_check(
        &c,
        &key("AAAAAAAA", HASH, "scopes|'{delete}'"),
        "api_key_scopes_check",
    )
    .await;
    assert_check(
        &c,
        &key("AAAAAAAA", HASH, "scopes|'{}'"),
        "api_key_scopes_check",
    )
    .await;
    assert_check(
        &c,
        &key("AAAAAAAA", HASH, "expires_at|now() - interval '1 day'"),
        "api_key_expires_after_creation",
    )
    .await;
    c.batch_execute(&key("AAAAAAAA", HASH, "")).await.unwrap();
    assert_unique(&c, &key("AAAAAAAA", HASH, ""), "api_key_prefix_key").await;

    // Deleting a tenant removes its workspaces and keys, and nothing of the other tenant.
    let made = control::create_key(&c, w2, None).await.unwrap();
    c.execute("DELETE FROM tenant WHERE id = $1", &[&t1])
        .await
        .unwrap();
    let left: Vec<(i64, i64)> = query_pairs(
        &c,
        "SELECT tenant_id, count(*) FROM api_key GROUP BY 1",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(left, [(t2, 1)]);
    let workspaces: i64 = query_scalar(&c, "SELECT count(*) FROM workspace")
        .await
        .unwrap();
    assert_eq!(workspaces, 1);
    assert!(control::revoke_key(&c, made.id).await.unwrap());
    assert!(
        !control::revoke_key(&c, made.id).await.unwrap(),
        "second revoke is a no-op"
    );
    assert!(control::revoke_key(&c, 424242)
        .await
        .unwrap_err()
        .to_string()
        .contains("not found"));
    assert!(control::create_workspace(&c, 424242, "x")
        .await
        .unwrap_err()
        .to_string()
        .contains("tenant tnt_"));
}

#[tokio::test]
async fn created_keys_store_only_a_hash_that_verifies() {
    let db = TestDb::migrated().await.unwrap();
    let c = db.client().await.unwrap();
    let [(t1, w1), _] = two_tenants(&c).await;
    let key = control::create_key(&c, w1, Some("site")).await.unwrap();
    assert_eq!(key.tenant_id, t1);
    let prefix = sluice_schema::apikey::prefix_of(&key.plaintext).unwrap();
    // The collector's lookup, as written in the table contract.
    let row = c
        .query_one(
            "SELECT id, tenant_id, workspace_id, hash, scopes, expires_at, revoked_at FROM api_key WHERE prefix = $1",
            &[&prefix],
        )
        .await
        .unwrap();
    let hash: Vec<u8> = row.get(3);
    assert!(sluice_schema::apikey::verify(&key.plaintext, &hash));
    assert_eq!(row.get::<_, Vec<String>>(4), ["write"]);
    let dump: String = query_scalar(&c, "SELECT row_to_json(k)::text FROM api_key k")
        .await
        .unwrap();
    assert!(!dump.contains(&key.plaintext[3..]), "plaintext stored");
}

#[tokio::test]
async fn identity_tables_refuse_bad_rows() {
    let db = TestDb::migrated().await.unwrap();
    let c = db.client().await.unwrap();
    let [(t1, w1), (t2, w2)] = two_tenants(&c).await;
    let fp = |b: u8| format!("'\\x{}'", format!("{b:02x}").repeat(32));
    let ct = format!("'\\x{}'", "ab".repeat(40));

    let visitor = |anon: &str, first: &str, last: &str| {
        format!("INSERT INTO visitor (tenant_id, anonymous_id, workspace_id, first_seen_at, last_seen_at) VALUES ({t1}, '{anon}', {w1}, '{first}', '{last}')")
    };
    assert_check(
        &c,
        &visitor("", "2026-01-01", "2026-01-02"),
        "visitor_anonymous_id_check",
    )
    .await;
    assert_check(
        &c,
        &visitor("a", "2026-01-02", "2026-01-01"),
        "visitor_seen_in_order",
    )
    .await;
    assert_check(
        &c,
        &format!("INSERT INTO visitor (tenant_id, anonymous_id, workspace_id, first_seen_at, last_seen_at, first_utm) VALUES ({t1}, 'a', {w1}, now(), now(), '[]')"),
        "visitor_first_utm_check",
    )
    .await;

    let lead = |tenant: i64, ws: i64, cols: &str, vals: &str| {
        format!("INSERT INTO lead (tenant_id, workspace_id{cols}) VALUES ({tenant}, {ws}{vals})")
    };
    let ciphertext = format!(", {ct}");
    for (cols, vals, constraint) in [
        (
            ", email_ciphertext",
            ciphertext.as_str(),
            "lead_ciphertext_has_key_id",
        ),
        (
            ", email_ciphertext, pii_key_id",
            ", '\\x00', 'k1'",
            "lead_email_ciphertext_check",
        ),
        (
            ", email_fingerprint",
            ", '\\x00'",
            "lead_email_fingerprint_check",
        ),
        (
            ", traits",
            ", '{\"email\": \"ada@example.com\"}'",
            "lead_traits_check",
        ),
        (
            ", traits",
            ", '{\"phone\": \"+14155550100\"}'",
            "lead_traits_check",
        ),
    ] {
        assert_check(&c, &lead(t1, w1, cols, vals), constraint).await;
    }
    c.batch_execute(&lead(
        t1,
        w1,
        ", email_fingerprint, user_id",
        &format!(", {}, 'u1'", fp(1)),
    ))
    .await
    .unwrap();
    assert_unique(
        &c,
        &lead(t1, w1, ", email_fingerprint", &format!(", {}", fp(1))),
        "lead_tenant_id_email_fingerprint_key",
    )
    .await;
    assert_unique(
        &c,
        &lead(t1, w1, ", user_id", ", 'u1'"),
        "lead_tenant_id_user_id_key",
    )
    .await;
    c.batch_execute(&lead(
        t1,
        w1,
        ", phone_fingerprint",
        &format!(", {}", fp(2)),
    ))
    .await
    .unwrap();
    assert_unique(
        &c,
        &lead(t1, w1, ", phone_fingerprint", &format!(", {}", fp(2))),
        "lead_tenant_id_phone_fingerprint_key",
    )
    .await;
    // The same person in another tenant is another lead.
    c.batch_execute(&lead(
        t2,
        w2,
        ", email_fingerprint, user_id",
        &format!(", {}, 'u1'", fp(1)),
    ))
    .await
    .unwrap();

    let lead_id: i64 = c
        .query_one(
            "SELECT id FROM lead WHERE tenant_id = $1 AND user_id = 'u1'",
            &[&t1],
        )
        .await
        .unwrap()
        .get(0);
    let link = |tenant: i64, lead: i64, kind: &str| {
        format!("INSERT INTO identity_link (tenant_id, anonymous_id, lead_id, kind, first_seen_at, last_seen_at) VALUES ({tenant}, 'anon-1', {lead}, '{kind}', now(), now())")
    };
    assert_fk(
        &c,
        &link(t1, 999999, "identify"),
        "identity_link_tenant_id_lead_id_fkey",
    )
    .await;
    // A lead of tenant 1 cannot be linked from tenant 2.
    assert_fk(
        &c,
        &link(t2, lead_id, "identify"),
        "identity_link_tenant_id_lead_id_fkey",
    )
    .await;
    assert_check(&c, &link(t1, lead_id, "merge"), "identity_link_kind_check").await;
    assert_check(
        &c,
        &format!("INSERT INTO identity_link (tenant_id, anonymous_id, lead_id, kind, first_seen_at, last_seen_at) VALUES ({t1}, 'a', {lead_id}, 'alias', '2026-02-02', '2026-02-01')"),
        "identity_link_seen_in_order",
    )
    .await;
    c.batch_execute(&link(t1, lead_id, "alias")).await.unwrap();
    c.execute(
        "DELETE FROM lead WHERE tenant_id = $1 AND id = $2",
        &[&t1, &lead_id],
    )
    .await
    .unwrap();
    let links: i64 = query_scalar(&c, "SELECT count(*) FROM identity_link")
        .await
        .unwrap();
    assert_eq!(links, 0, "links go with their lead");
}

#[tokio::test]
async fn event_session_and_writer_tables_refuse_bad_rows() {
    let db = TestDb::migrated().await.unwrap();
    let c = db.client().await.unwrap();
    sluice_schema::partitions::ensure_month(
        &c,
        chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
        2,
    )
    .await
    .unwrap();
    let session = |id: &str, extra_col: &str, extra_val: &str| {
        format!("INSERT INTO session (tenant_id, session_id, workspace_id, started_at, last_seen_at{extra_col}) VALUES (1, '{id}', 1, '2026-01-01', '2026-01-01'{extra_val})")
    };
    assert_check(&c, &session("", "", ""), "session_session_id_check").await;
    assert_check(
        &c,
        &session("s", ", device", ", '\"phone\"'"),
        "session_device_check",
    )
    .await;
    assert_check(&c, &session("s", ", geo", ", '[1]'"), "session_geo_check").await;
    assert_check(&c, &session("s", ", utm", ", 'null'"), "session_utm_check").await;
    assert_check(
        &c,
        &session("s", ", page_count", ", -1"),
        "session_page_count_check",
    )
    .await;
    assert_check(
        &c,
        "INSERT INTO session (tenant_id, session_id, workspace_id, started_at, last_seen_at) VALUES (1, 's', 1, '2026-01-02', '2026-01-01')",
        "session_seen_in_order",
    )
    .await;

    let event = |kind: &str| {
        format!("INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, message_id, received_at) VALUES (1, '2026-01-05', gen_random_uuid(), 1, '{kind}', 'm', now())")
    };
    assert_check(&c, &event("click"), "event_type_check").await;
    let (code, _, msg) = refused(&c, "INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, received_at) VALUES (1, '2026-01-05', gen_random_uuid(), 1, 'track', now())").await;
    assert_eq!(code, SqlState::NOT_NULL_VIOLATION, "{msg}");
    c.batch_execute(&event("track")).await.unwrap();
    // The same (tenant, time, id) twice: the primary key of the leaf refuses it.
    let (code, name, msg) = refused(
        &c,
        "INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, message_id, received_at) SELECT tenant_id, occurred_at, event_id, 1, 'page', 'm', now() FROM event",
    )
    .await;
    assert_eq!(code, SqlState::UNIQUE_VIOLATION, "{msg}");
    assert!(
        name.starts_with("event_y2026m01_p") && name.ends_with("_pkey"),
        "{name}"
    );

    // Claims: unique per (key, id) inside a day partition; a key on a day without one is
    // refused, never kept in a catch-all table.
    c.batch_execute("SELECT event_dedup_ensure_day('2026-01-15')")
        .await
        .unwrap();
    let claim = |key: i64| {
        format!("INSERT INTO event_dedup VALUES ({key}, '00000000-0000-0000-0000-000000000001')")
    };
    // 2026-01-15T12:00:00Z in milliseconds.
    let noon = 1_768_478_400_000_i64;
    c.batch_execute(&claim(noon)).await.unwrap();
    assert_unique(&c, &claim(noon), "event_dedup_d20260115_pkey").await;
    c.batch_execute(&claim(noon + 1)).await.unwrap();
    let (code, _, msg) = refused(&c, &claim(noon + 86_400_000)).await;
    assert_eq!(code, SqlState::CHECK_VIOLATION, "{msg}");
    assert!(msg.starts_with("no partition of relation"), "{msg}");

    assert_check(&c, "INSERT INTO writer_offset (consumer_group, topic, partition, next_offset) VALUES ('g', 't', -1, 0)", "writer_offset_partition_check").await;
    assert_check(&c, "INSERT INTO writer_offset (consumer_group, topic, partition, next_offset) VALUES ('g', 't', 0, -5)", "writer_offset_next_offset_check").await;
}

#[tokio::test]
async fn equal_client_ids_in_two_tenants_are_two_rows_and_never_mix() {
    let db = TestDb::migrated().await.unwrap();
    let c = db.client().await.unwrap();
    let [(t1, w1), (t2, w2)] = two_tenants(&c).await;
    for (t, w, ua) in [(t1, w1, "alpha-agent"), (t2, w2, "beta-agent")] {
        c.execute(
            "INSERT INTO visitor (tenant_id, anonymous_id, workspace_id, first_seen_at, last_seen_at, user_agent)
             VALUES ($1, 'same-anon', $2, now(), now(), $3)",
            &[&t, &w, &ua],
        )
        .await
        .unwrap();
        c.execute(
            "INSERT INTO session (tenant_id, session_id, workspace_id, anonymous_id, started_at, last_seen_at, referrer)
             VALUES ($1, 'same-session', $2, 'same-anon', now(), now(), $3)",
            &[&t, &w, &ua],
        )
        .await
        .unwrap();
    }
    let visitors: i64 = query_scalar(
        &c,
        "SELECT count(*) FROM visitor WHERE anonymous_id = 'same-anon'",
    )
    .await
    .unwrap();
    let sessions: i64 = query_scalar(
        &c,
        "SELECT count(*) FROM session WHERE session_id = 'same-session'",
    )
    .await
    .unwrap();
    assert_eq!((visitors, sessions), (2, 2));
    for (t, ua) in [(t1, "alpha-agent"), (t2, "beta-agent")] {
        let rows = c
            .query(
                "SELECT v.user_agent, s.referrer FROM visitor v
                   JOIN session s ON s.tenant_id = v.tenant_id AND s.anonymous_id = v.anonymous_id
                  WHERE v.tenant_id = $1 AND v.anonymous_id = 'same-anon'",
                &[&t],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, String>(0), ua);
        assert_eq!(rows[0].get::<_, String>(1), ua);
    }
    // The upsert the writer runs touches only its own tenant's row.
    c.execute(
        "INSERT INTO visitor (tenant_id, anonymous_id, workspace_id, first_seen_at, last_seen_at, event_count)
         VALUES ($1, 'same-anon', $2, now(), now(), 5)
         ON CONFLICT (tenant_id, anonymous_id) DO UPDATE SET event_count = visitor.event_count + EXCLUDED.event_count",
        &[&t1, &w1],
    )
    .await
    .unwrap();
    let counts: Vec<(i64, i64)> = query_pairs(
        &c,
        "SELECT tenant_id, event_count FROM visitor ORDER BY tenant_id",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(counts, [(t1, 5), (t2, 0)]);
}
