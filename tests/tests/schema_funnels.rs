//! Funnels in the database: match rules are shape-checked, publishing snapshots a draft,
//! and a publication (with the steps it froze) cannot be changed or deleted, except by
//! deleting the funnel that owns it.

use serde_json::{json, Value};
use sluice_schema::control;
use sluice_tests::TestDb;
use sluice_tests::{query_pairs, query_scalar};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

struct Funnel {
    tenant: i64,
    id: i64,
}

async fn funnel_with_draft(c: &Client) -> Funnel {
    let tenant = control::create_tenant(c, "acme")
        .await
        .expect("funnel_with_draft");
    let ws = control::create_workspace(c, tenant, "web")
        .await
        .expect("funnel_with_draft");
    let id: i64 = c
        .query_one(
            "INSERT INTO funnel (tenant_id, workspace_id, name) VALUES ($1, $2, 'signup') RETURNING id",
            &[&tenant, &ws],
        )
        .await
        .expect("funnel_with_draft")
        .get(0);
    c.execute(
        "INSERT INTO funnel_version (tenant_id, funnel_id, version) VALUES ($1, $2, 1)",
        &[&tenant, &id],
    )
    .await
    .expect("funnel_with_draft");
    for (pos, name, rule) in [
        (
            1,
            "Pricing",
            json!({"event_type": "page", "where": [{"field": "properties.path", "op": "starts_with", "value": "/pricing"}]}),
        ),
        (
            2,
            "Signed up",
            json!({"event_type": "track", "name": "Signed Up"}),
        ),
    ] {
        add_step(c, &Funnel { tenant, id }, 1, pos, name, &rule)
            .await
            .expect("funnel_with_draft");
    }
    Funnel { tenant, id }
}

async fn add_step(
    c: &Client,
    f: &Funnel,
    version: i32,
    pos: i32,
    name: &str,
    rule: &Value,
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO funnel_step (tenant_id, funnel_id, version, position, name) VALUES ($1, $2, $3, $4, $5)",
        &[&f.tenant, &f.id, &version, &pos, &name],
    )
    .await?;
    c.execute(
        "INSERT INTO funnel_step_match (tenant_id, funnel_id, version, position, ordinal, rule) VALUES ($1, $2, $3, $4, 1, $5)",
        &[&f.tenant, &f.id, &version, &pos, rule],
    )
    .await?;
    Ok(())
}

fn code(err: &tokio_postgres::Error) -> SqlState {
    err.code().cloned().unwrap_or(SqlState::INTERNAL_ERROR)
}

/// PostgreSQL's message of a server error.
fn message(err: &tokio_postgres::Error) -> &str {
    err.as_db_error().expect("a server error").message()
}

/// The constraint a server error names.
fn constraint(err: &tokio_postgres::Error) -> Option<&str> {
    err.as_db_error().expect("a server error").constraint()
}

/// `funnel_publish` of `version` of `f` (published by `by`): the definition it froze.
async fn publish(
    c: &Client,
    f: &Funnel,
    version: i32,
    by: &str,
) -> Result<Value, tokio_postgres::Error> {
    let sql = format!("SELECT funnel_publish($1, $2, {version}, '{by}')");
    Ok(c.query_one(&sql, &[&f.tenant, &f.id]).await?.get(0))
}

/// A publication of version 1 of `f` inserted by hand, with `definition`.
async fn insert_publication(
    c: &Client,
    f: &Funnel,
    definition: &Value,
) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        "INSERT INTO funnel_publication (tenant_id, funnel_id, version, definition) VALUES ($1, $2, 1, $3)",
        &[&f.tenant, &f.id, definition],
    )
    .await
}

#[tokio::test]
async fn a_publication_is_immutable() {
    let db = TestDb::migrated().await.unwrap();
    let c = db.client().await.unwrap();
    let f = funnel_with_draft(&c).await;
    let def = publish(&c, &f, 1, "test").await.unwrap();
    assert_eq!(def["steps"].as_array().unwrap().len(), 2);
    assert_eq!(def["steps"][1]["match"][0]["name"], "Signed Up");

    for sql in [
        "UPDATE funnel_publication SET published_by = 'mallory'",
        "UPDATE funnel_publication SET definition = '{\"steps\": []}'",
        "DELETE FROM funnel_publication",
        "TRUNCATE funnel_publication",
    ] {
        let err = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            code(&err),
            SqlState::INTEGRITY_CONSTRAINT_VIOLATION,
            "{sql}"
        );
        assert!(message(&err).contains("immutable"), "{sql}: {err:?}");
    }
    // The published version and its steps are frozen too.
    for sql in [
        "UPDATE funnel_step SET name = 'renamed'",
        "DELETE FROM funnel_step_match",
        "UPDATE funnel_version SET conversion_window_seconds = 60",
        "DELETE FROM funnel_version",
    ] {
        let err = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            code(&err),
            SqlState::INTEGRITY_CONSTRAINT_VIOLATION,
            "{sql}: {err:?}"
        );
    }
    let err = add_step(
        &c,
        &f,
        1,
        3,
        "Paid",
        &json!({"event_type": "track", "name": "Paid"}),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), SqlState::INTEGRITY_CONSTRAINT_VIOLATION);
    let err = publish(&c, &f, 1, "again").await.unwrap_err();
    assert!(message(&err).contains("already published"));
    let unchanged: Value = query_scalar(&c, "SELECT definition FROM funnel_publication")
        .await
        .unwrap();
    assert_eq!(unchanged, def);

    // A new draft is the way to change it; publishing it archives version 1.
    c.execute(
        "INSERT INTO funnel_version (tenant_id, funnel_id, version) VALUES ($1, $2, 2)",
        &[&f.tenant, &f.id],
    )
    .await
    .unwrap();
    let err = c
        .execute(
            "INSERT INTO funnel_version (tenant_id, funnel_id, version) VALUES ($1, $2, 3)",
            &[&f.tenant, &f.id],
        )
        .await
        .unwrap_err();
    assert_eq!(
        code(&err),
        SqlState::UNIQUE_VIOLATION,
        "one draft at a time"
    );
    let err = publish(&c, &f, 2, "test").await.unwrap_err();
    assert!(message(&err).contains("has no steps"));
    add_step(&c, &f, 2, 1, "Anything", &json!({"event_type": "page"}))
        .await
        .unwrap();
    publish(&c, &f, 2, "test").await.unwrap();
    let statuses: Vec<(i32, String)> = query_pairs(
        &c,
        "SELECT version, status FROM funnel_version ORDER BY version",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        statuses,
        [(1, "archived".to_owned()), (2, "published".to_owned())]
    );
    let publications: i64 = query_scalar(&c, "SELECT count(*) FROM funnel_publication")
        .await
        .unwrap();
    assert_eq!(publications, 2);

    // Deleting the funnel (or its tenant) takes everything with it.
    c.execute(
        "DELETE FROM funnel WHERE tenant_id = $1 AND id = $2",
        &[&f.tenant, &f.id],
    )
    .await
    .unwrap();
    for table in [
        "funnel_publication",
        "funnel_version",
        "funnel_step",
        "funnel_step_match",
    ] {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table}");
    }
}

#[tokio::test]
async fn match_rules_of_a_bad_shape_are_refused() {
    let db = TestDb::migrated().await.unwrap();
    let c = db.client().await.unwrap();
    let f = funnel_with_draft(&c).await;
    let good = [
        json!({"event_type": "screen"}),
        json!({"event_type": "track", "name": "Paid", "where": []}),
        json!({"event_type": "page", "where": [{"field": "context.page.path", "op": "exists"}]}),
        json!({"event_type": "track", "where": [{"field": "properties.plan", "op": "in", "value": ["pro", "team"]}]}),
        json!({"event_type": "track", "where": [{"field": "properties.revenue", "op": "gte", "value": 10}]}),
    ];
    let bad = [
        json!([]),
        json!("page"),
        json!({}),
        json!({"event_type": "click"}),
        json!({"event_type": 1}),
        json!({"event_type": "track", "name": 5}),
        json!({"event_type": "track", "extra": true}),
        json!({"event_type": "track", "where": {}}),
        json!({"event_type": "track", "where": ["x"]}),
        json!({"event_type": "track", "where": [{"field": "plan", "op": "eq", "value": 1}]}),
        json!({"event_type": "track", "where": [{"field": "properties.plan", "op": "like", "value": 1}]}),
        json!({"event_type": "track", "where": [{"field": "properties.plan", "op": "eq"}]}),
        json!({"event_type": "track", "where": [{"field": "properties.plan", "op": "exists", "value": 1}]}),
        json!({"event_type": "track", "where": [{"field": "properties.plan", "op": "in", "value": "pro"}]}),
        json!({"event_type": "track", "where": [{"field": "properties.plan", "op": "eq", "value": 1, "x": 2}]}),
    ];
    for (i, rule) in good.iter().enumerate() {
        c.execute(
            "INSERT INTO funnel_step_match (tenant_id, funnel_id, version, position, ordinal, rule) VALUES ($1, $2, 1, 1, $3, $4)",
            &[&f.tenant, &f.id, &(i as i32 + 2), rule],
        )
        .await
        .unwrap_or_else(|e| panic!("{rule} refused: {e:?}"));
    }
    for rule in bad {
        let err = c
            .execute(
                "INSERT INTO funnel_step_match (tenant_id, funnel_id, version, position, ordinal, rule) VALUES ($1, $2, 1, 2, 9, $3)",
                &[&f.tenant, &f.id, &rule],
            )
            .await
            .expect_err(&format!("{rule} accepted"));
        assert_eq!(code(&err), SqlState::CHECK_VIOLATION, "{rule}");
        assert_eq!(constraint(&err), Some("funnel_step_match_rule_shape"));
    }
    // Steps: unique positions, and a rule must belong to an existing step.
    let err = add_step(&c, &f, 1, 1, "Again", &json!({"event_type": "page"}))
        .await
        .unwrap_err();
    assert_eq!(code(&err), SqlState::UNIQUE_VIOLATION);
    let err = c
        .execute(
            "INSERT INTO funnel_step_match (tenant_id, funnel_id, version, position, ordinal, rule) VALUES ($1, $2, 1, 7, 1, '{\"event_type\": \"page\"}')",
            &[&f.tenant, &f.id],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), SqlState::FOREIGN_KEY_VIOLATION);
    let err = c
        .execute("INSERT INTO funnel_version (tenant_id, funnel_id, version, published_at) VALUES ($1, $2, 5, now())", &[&f.tenant, &f.id])
        .await
        .unwrap_err();
    assert_eq!(
        constraint(&err),
        Some("funnel_version_published_at_iff_not_draft")
    );
}

#[tokio::test]
async fn funnel_foreign_keys_refuse_orphans_and_other_tenants() {
    let db = TestDb::migrated().await.unwrap();
    let c = db.client().await.unwrap();
    let f = funnel_with_draft(&c).await;
    let other = control::create_tenant(&c, "other").await.unwrap();
    let other_ws = control::create_workspace(&c, other, "web").await.unwrap();
    let t = f.tenant;
    let cases = [
        // A funnel cannot sit in another tenant's workspace.
        (
            format!("INSERT INTO funnel (tenant_id, workspace_id, name) VALUES ({t}, {other_ws}, 'x')"),
            "funnel_tenant_id_workspace_id_fkey",
        ),
        (
            format!("INSERT INTO funnel_version (tenant_id, funnel_id, version) VALUES ({other}, {}, 9)", f.id),
            "funnel_version_tenant_id_funnel_id_fkey",
        ),
        (
            format!("INSERT INTO funnel_step (tenant_id, funnel_id, version, position, name) VALUES ({t}, {}, 9, 1, 'x')", f.id),
            "funnel_step_tenant_id_funnel_id_version_fkey",
        ),
        (
            format!("INSERT INTO funnel_publication (tenant_id, funnel_id, version, definition) VALUES ({t}, {}, 9, '{{\"steps\": []}}')", f.id),
            "funnel_publication_tenant_id_funnel_id_version_fkey",
        ),
    ];
    for (sql, named) in cases {
        let err = c.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(
            code(&err),
            SqlState::FOREIGN_KEY_VIOLATION,
            "{sql}: {err:?}"
        );
        assert_eq!(constraint(&err), Some(named), "{sql}");
    }
    // Deleting the tenant cascades through a published funnel: erasure is not blocked by
    // the immutability guard.
    publish(&c, &f, 1, "test").await.unwrap();
    c.execute("DELETE FROM tenant WHERE id = $1", &[&f.tenant])
        .await
        .unwrap();
    let left: i64 = query_scalar(&c, "SELECT count(*) FROM funnel_publication")
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// Publishing cannot be bypassed (issue 13): a version leaves draft only through
/// funnel_publish, and a publication is always the snapshot of its version's steps.
#[tokio::test]
async fn publishing_cannot_be_bypassed_by_direct_statements() {
    let db = TestDb::migrated().await.unwrap();
    let c = db.client().await.unwrap();
    let f = funnel_with_draft(&c).await;
    let refused = |err: tokio_postgres::Error, what: &str| {
        assert_eq!(
            code(&err),
            SqlState::INTEGRITY_CONSTRAINT_VIOLATION,
            "{what}: {err:?}"
        );
        let db = err.as_db_error().unwrap();
        assert!(
            db.hint().unwrap_or_default().contains("funnel_publish"),
            "{what}: the hint names the way to publish: {db:?}"
        );
    };
    // 1. The status of a draft set by hand: a published version without a snapshot.
    for sql in [
        "UPDATE funnel_version SET status = 'published', published_at = now()",
        "UPDATE funnel_version SET status = 'archived', published_at = now()",
    ] {
        refused(c.batch_execute(sql).await.unwrap_err(), sql);
    }
    // Nor created published.
    let sql = format!(
        "INSERT INTO funnel_version (tenant_id, funnel_id, version, status, published_at) VALUES ({}, {}, 2, 'published', now())",
        f.tenant, f.id
    );
    refused(c.batch_execute(&sql).await.unwrap_err(), &sql);

    // 2. Publications of any definition: made up, with fewer steps, or another version's.
    let real: Value = c
        .query_one("SELECT funnel_definition($1, $2, 1)", &[&f.tenant, &f.id])
        .await
        .unwrap()
        .get(0);
    let mut fewer = real.clone();
    fewer["steps"].as_array_mut().unwrap().pop();
    let mut renamed = real.clone();
    renamed["steps"][0]["name"] = json!("Anything");
    for def in [
        json!({"steps": [{"position": 1, "name": "x", "match": []}]}),
        fewer,
        renamed,
    ] {
        let err = insert_publication(&c, &f, &def).await.unwrap_err();
        refused(err, &def.to_string());
    }
    let counts: (i64, String) = {
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM funnel_publication), (SELECT status FROM funnel_version)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(counts, (0, "draft".to_owned()), "nothing was published");

    // The publish operation still works, and its snapshot is the real one.
    let def = publish(&c, &f, 1, "test").await.unwrap();
    assert_eq!(def, real);
    let row = c
        .query_one(
            "SELECT v.status, v.published_at = p.published_at, p.definition FROM funnel_version v \
             JOIN funnel_publication p USING (tenant_id, funnel_id, version)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "published");
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, Value>(2), real);
    // A second publication of the same version is refused as before.
    let err = insert_publication(&c, &f, &real).await.unwrap_err();
    assert!(message(&err).contains("already published"), "{err:?}");
}

/// Migration 0006 rolls back to 0004's behaviour and applies again.
#[tokio::test]
async fn funnel_publish_guard_rolls_back_and_reapplies() {
    let db = TestDb::migrated().await.unwrap();
    let mut c = db.client().await.unwrap();
    // Down to before 0006: every newer migration goes with it, newest first.
    let newer = sluice_schema::migrate::MIGRATIONS
        .iter()
        .filter(|m| m.version >= 6)
        .count();
    let done = sluice_schema::migrate::down(&mut c, newer).await.unwrap();
    assert_eq!(done.last().map(|m| m.version), Some(6));
    let f = funnel_with_draft(&c).await;
    // 0004's function publishes on its own.
    publish(&c, &f, 1, "test").await.unwrap();
    let applied = sluice_schema::migrate::up(&mut c).await.unwrap();
    assert_eq!(applied.first().map(|m| m.version), Some(6));
    assert_eq!(applied.len(), newer);
    let err = c
        .batch_execute(&format!(
            "INSERT INTO funnel_version (tenant_id, funnel_id, version) VALUES ({}, {}, 2); \
             UPDATE funnel_version SET status = 'published', published_at = now() WHERE version = 2",
            f.tenant, f.id
        ))
        .await
        .unwrap_err();
    assert_eq!(
        code(&err),
        SqlState::INTEGRITY_CONSTRAINT_VIOLATION,
        "{err:?}"
    );
}
