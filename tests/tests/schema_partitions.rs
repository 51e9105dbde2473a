//! The event partition manager against the real PostgreSQL: rows land in the month and hash
//! leaf they belong to, a month without a partition is a clear error until it is made,
//! creation is idempotent and race-free and does not wait for running writes, and pruning
//! drops only old months.

use std::time::Duration;

use chrono::{NaiveDate, TimeZone, Utc};
use sluice_schema::partitions::{self, PartitionConfig};
use sluice_tests::query_scalar;
use sluice_tests::TestDb;
use tokio_postgres::GenericClient;
use uuid::Uuid;

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("day")
}

async fn insert_event(
    client: &impl GenericClient,
    tenant: i64,
    at: chrono::DateTime<Utc>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, name, message_id, received_at)
             VALUES ($1, $2, $3, 1, 'track', 'Signed Up', $4, $2)",
            &[&tenant, &at, &Uuid::new_v4(), &Uuid::new_v4().to_string()],
        )
        .await
}

#[tokio::test]
async fn an_event_lands_in_its_month_and_tenant_hash_leaf() {
    let db = TestDb::migrated().await.unwrap();
    let client = db.client().await.unwrap();
    assert!(partitions::ensure_month(&client, day(2026, 3, 9), 8)
        .await
        .unwrap());
    assert!(partitions::ensure_month(&client, day(2026, 4, 1), 8)
        .await
        .unwrap());

    for tenant in [1i64, 2, 3, 42, 1_000_003] {
        let at = Utc.with_ymd_and_hms(2026, 3, 31, 23, 59, 59).unwrap();
        insert_event(&client, tenant, at).await.unwrap();
        let row = client
            .query_one(
                "SELECT e.tableoid::regclass::text, pg_get_expr(c.relpartbound, c.oid)
                   FROM event e JOIN pg_class c ON c.oid = e.tableoid WHERE e.tenant_id = $1",
                &[&tenant],
            )
            .await
            .unwrap();
        let (leaf, bound): (String, String) = (row.get(0), row.get(1));
        assert!(
            leaf.starts_with("event_y2026m03_p"),
            "tenant {tenant} in {leaf}"
        );
        // The leaf's name is its remainder, and PostgreSQL agrees the tenant hashes there.
        let remainder: i32 = leaf.rsplit_once("_p").unwrap().1.parse().unwrap();
        assert_eq!(
            bound,
            format!("FOR VALUES WITH (modulus 8, remainder {remainder})")
        );
        let fits: bool = client
            .query_one(
                "SELECT satisfies_hash_partition('event_y2026m03'::regclass, 8, $1, $2::bigint)",
                &[&remainder, &tenant],
            )
            .await
            .unwrap()
            .get(0);
        assert!(fits);
    }
    // The first instant of April belongs to April.
    insert_event(
        &client,
        7,
        Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap(),
    )
    .await
    .unwrap();
    let leaf: String = query_scalar(
        &client,
        "SELECT tableoid::regclass::text FROM event WHERE tenant_id = 7",
    )
    .await
    .unwrap();
    assert!(leaf.starts_with("event_y2026m04_p"), "{leaf}");
}

#[tokio::test]
async fn a_month_without_a_partition_is_a_clear_error_until_it_is_created() {
    let db = TestDb::migrated().await.unwrap();
    let client = db.client().await.unwrap();
    let at = Utc.with_ymd_and_hms(2031, 1, 15, 12, 0, 0).unwrap();
    let err = insert_event(&client, 1, at).await.unwrap_err();
    assert!(partitions::is_missing_partition(&err), "{err:?}");
    let db_err = err.as_db_error().unwrap();
    assert_eq!(
        db_err.message(),
        "no partition of relation \"event\" found for row"
    );
    assert!(
        db_err.detail().unwrap().contains("2031-01-15"),
        "{:?}",
        db_err.detail()
    );

    assert!(partitions::ensure_month(&client, at.date_naive(), 4)
        .await
        .unwrap());
    assert_eq!(insert_event(&client, 1, at).await.unwrap(), 1);
    // Other errors are not mistaken for a missing month.
    let dup = client
        .execute("INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, message_id, received_at) SELECT tenant_id, occurred_at, event_id, 1, 'page', 'x', now() FROM event", &[])
        .await
        .unwrap_err();
    assert!(!partitions::is_missing_partition(&dup));
}

#[tokio::test]
async fn ensure_is_idempotent_and_an_existing_month_keeps_its_modulus() {
    let db = TestDb::migrated().await.unwrap();
    let client = db.client().await.unwrap();
    assert!(partitions::ensure_month(&client, day(2026, 5, 20), 8)
        .await
        .unwrap());
    assert!(!partitions::ensure_month(&client, day(2026, 5, 1), 4)
        .await
        .unwrap());
    let months = partitions::list(&client).await.unwrap();
    assert_eq!(months.len(), 1);
    assert_eq!(months[0].table, "event_y2026m05");
    assert_eq!(months[0].leaves.len(), 8);
    assert_eq!(months[0].leaves[7].table, "event_y2026m05_p7");
    // Every leaf has the parent's three indexes.
    let indexes: i64 = query_scalar(
        &client,
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'event_y2026m05_p3'",
    )
    .await
    .unwrap();
    assert_eq!(indexes, 3);
    assert!(partitions::ensure_month(&client, day(2026, 6, 1), 0)
        .await
        .is_err());
    assert!(partitions::ensure_month(&client, day(2026, 6, 1), 5000)
        .await
        .is_err());
}

#[tokio::test]
async fn concurrent_callers_create_a_month_exactly_once() {
    let db = TestDb::migrated().await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(db.client().await.unwrap());
    }
    let results = futures::future::join_all(
        clients
            .iter()
            .map(|c| partitions::ensure_month(c, day(2027, 2, 14), 8)),
    )
    .await;
    let created = results
        .into_iter()
        .map(|r| r.unwrap())
        .filter(|&c| c)
        .count();
    assert_eq!(created, 1);
    assert_eq!(
        partitions::list(&clients[0]).await.unwrap()[0].leaves.len(),
        8
    );
}

#[tokio::test]
async fn creating_a_month_does_not_wait_for_an_open_write_transaction() {
    let db = TestDb::migrated().await.unwrap();
    let mut writer = db.client().await.unwrap();
    let manager = db.client().await.unwrap();
    partitions::ensure_month(&manager, day(2026, 7, 1), 8)
        .await
        .unwrap();
    // A writer mid-batch: it holds locks on event and July until it commits.
    let tx = writer.transaction().await.unwrap();
    insert_event(&tx, 1, Utc.with_ymd_and_hms(2026, 7, 3, 0, 0, 0).unwrap())
        .await
        .unwrap();
    manager
        .batch_execute("SET lock_timeout = '3s'")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let created = tokio::time::timeout(
        Duration::from_secs(10),
        partitions::ensure_month(&manager, day(2026, 8, 1), 8),
    )
    .await
    .expect("ensure_month blocked behind the open transaction")
    .unwrap();
    assert!(created);
    assert!(started.elapsed() < Duration::from_secs(3));
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn ensure_ahead_makes_the_current_month_and_the_months_ahead() {
    let db = TestDb::migrated().await.unwrap();
    let client = db.client().await.unwrap();
    let now = Utc.with_ymd_and_hms(2026, 11, 30, 23, 0, 0).unwrap();
    let cfg = PartitionConfig {
        hash_modulus: 2,
        months_ahead: 3,
    };
    let made = partitions::ensure_ahead(&client, now, &cfg).await.unwrap();
    let tables: Vec<&str> = made.iter().map(|m| m.table.as_str()).collect();
    assert_eq!(
        tables,
        [
            "event_y2026m11",
            "event_y2026m12",
            "event_y2027m01",
            "event_y2027m02"
        ]
    );
    assert!(made.iter().all(|m| m.created));
    let again = partitions::ensure_ahead(&client, now, &cfg).await.unwrap();
    assert!(again.iter().all(|m| !m.created));
}

#[tokio::test]
async fn prune_drops_only_months_older_than_the_kept_ones() {
    let db = TestDb::migrated().await.unwrap();
    let mut client = db.client().await.unwrap();
    for m in 1..=4 {
        partitions::ensure_month(&client, day(2026, m, 1), 2)
            .await
            .unwrap();
        insert_event(
            &client,
            9,
            Utc.with_ymd_and_hms(2026, m, 10, 0, 0, 0).unwrap(),
        )
        .await
        .unwrap();
    }
    let now = Utc.with_ymd_and_hms(2026, 4, 15, 0, 0, 0).unwrap();
    assert!(partitions::prune(&mut client, now, 0).await.is_err());
    let dropped = partitions::prune(&mut client, now, 2).await.unwrap();
    assert_eq!(dropped, ["event_y2026m01", "event_y2026m02"]);
    let left: Vec<String> = partitions::list(&client)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.table)
        .collect();
    assert_eq!(left, ["event_y2026m03", "event_y2026m04"]);
    let rows: i64 = query_scalar(&client, "SELECT count(*) FROM event")
        .await
        .unwrap();
    assert_eq!(rows, 2);
    assert!(partitions::prune(&mut client, now, 2)
        .await
        .unwrap()
        .is_empty());
}
