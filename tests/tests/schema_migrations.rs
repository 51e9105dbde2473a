//! Migrations against the real PostgreSQL: a full round trip leaves the schema exactly as it
//! was, edited or unknown applied migrations are refused, and concurrent migrators are safe.

use std::process::Command;

use sluice_schema::migrate::{self, MIGRATIONS};
use sluice_schema::SchemaError;
use sluice_tests::query_column;
use sluice_tests::TestDb;

const PG_DUMP: &str = "/usr/lib/postgresql/15/bin/pg_dump";

fn schema_dump(db: &TestDb) -> String {
    let out = Command::new(PG_DUMP)
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--dbname",
            &db.url,
        ])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // pg_dump (15.14+) brackets its output with a random `\restrict` token: not schema.
    String::from_utf8(out.stdout)
        .expect("schema_dump")
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first line where two dumps differ, or `None` when they are the same.
fn first_difference(a: &str, b: &str) -> Option<(usize, String, String)> {
    let (mut la, mut lb) = (a.lines(), b.lines());
    for n in 1.. {
        match (la.next(), lb.next()) {
            (None, None) => return None,
            (x, y) if x != y => {
                return Some((
                    n,
                    x.unwrap_or("<end>").to_owned(),
                    y.unwrap_or("<end>").to_owned(),
                ))
            }
            _ => {}
        }
    }
    None
}

#[tokio::test]
async fn up_down_to_zero_up_gives_an_identical_schema() {
    let db = TestDb::new().await.unwrap();
    let mut client = db.client().await.unwrap();
    let applied = migrate::up(&mut client).await.unwrap();
    assert_eq!(applied.len(), MIGRATIONS.len());
    let first = schema_dump(&db);
    assert!(first.contains("CREATE TABLE public.funnel_publication"));

    let rolled_back = migrate::down(&mut client, usize::MAX).await.unwrap();
    assert_eq!(
        rolled_back.iter().map(|m| m.version).collect::<Vec<_>>(),
        MIGRATIONS
            .iter()
            .rev()
            .map(|m| m.version)
            .collect::<Vec<_>>()
    );
    // Nothing of ours is left but the bookkeeping table.
    let left: Vec<String> = query_column(
        &client,
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'S', 'i')
             UNION ALL
             SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'public'",
    )
    .await
    .unwrap();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["schema_migration", "schema_migration_pkey"]);

    migrate::up(&mut client).await.unwrap();
    let second = schema_dump(&db);
    assert_eq!(
        first_difference(&first, &second),
        None,
        "schema differs after up, down, up"
    );
    assert!(first.len() > 10_000, "the dump holds the whole schema");
}

#[tokio::test]
async fn an_edited_applied_migration_is_refused_with_a_clear_message() {
    let db = TestDb::migrated().await.unwrap();
    let mut client = db.client().await.unwrap();
    // What an edited file looks like from the database's side: the recorded checksum no
    // longer matches the embedded SQL.
    client
        .execute(
            "UPDATE schema_migration SET checksum = sha256('edited') WHERE version = 2",
            &[],
        )
        .await
        .unwrap();
    let err = migrate::up(&mut client).await.unwrap_err();
    assert!(
        matches!(err, SchemaError::ChecksumMismatch { version: 2, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("0002 (identity) was edited after it was applied"),
        "{msg}"
    );
    assert!(msg.contains("add a new numbered migration"), "{msg}");
    assert!(
        migrate::down(&mut client, 1).await.is_err(),
        "down must refuse too"
    );

    let status = migrate::status(&mut client).await.unwrap();
    assert!(status.iter().find(|s| s.version == 2).unwrap().modified);
    assert!(!status.iter().find(|s| s.version == 1).unwrap().modified);
}

#[tokio::test]
async fn a_database_ahead_of_the_build_is_refused() {
    let db = TestDb::migrated().await.unwrap();
    let mut client = db.client().await.unwrap();
    client
        .execute(
            "INSERT INTO schema_migration (version, name, checksum, duration_ms) VALUES (9999, 'future', '\\x00', 0)",
            &[],
        )
        .await
        .unwrap();
    let err = migrate::up(&mut client).await.unwrap_err();
    assert!(
        matches!(err, SchemaError::UnknownMigration { version: 9999, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("run a newer sluice-schema"));
    assert!(migrate::status(&mut client)
        .await
        .unwrap()
        .iter()
        .any(|s| s.unknown));
}

#[tokio::test]
async fn concurrent_migrators_apply_each_migration_exactly_once() {
    let db = TestDb::new().await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(db.client().await.unwrap());
    }
    let results = futures::future::join_all(clients.iter_mut().map(migrate::up)).await;
    let mut versions: Vec<i32> = results
        .into_iter()
        .flat_map(|r| r.unwrap())
        .map(|m| m.version)
        .collect();
    versions.sort();
    assert_eq!(
        versions,
        MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn down_n_rolls_back_the_newest_and_up_reapplies_only_those() {
    let db = TestDb::migrated().await.unwrap();
    let mut client = db.client().await.unwrap();
    // Back to before 0003 (the events tables), newest first.
    let from_events: Vec<i32> = MIGRATIONS
        .iter()
        .map(|m| m.version)
        .filter(|v| *v >= 3)
        .collect();
    let down = migrate::down(&mut client, from_events.len()).await.unwrap();
    assert_eq!(
        down.iter().map(|m| m.version).collect::<Vec<_>>(),
        from_events.iter().rev().copied().collect::<Vec<_>>()
    );
    let status = migrate::status(&mut client).await.unwrap();
    let pending: Vec<i32> = status
        .iter()
        .filter(|s| s.applied_at.is_none())
        .map(|s| s.version)
        .collect();
    assert_eq!(pending, from_events);
    let missing = client
        .execute("SELECT 1 FROM event", &[])
        .await
        .unwrap_err();
    assert!(
        missing.to_string().contains("does not exist")
            || format!("{missing:?}").contains("does not exist")
    );
    let up = migrate::up(&mut client).await.unwrap();
    assert_eq!(
        up.iter().map(|m| m.version).collect::<Vec<_>>(),
        from_events
    );
    assert!(migrate::up(&mut client).await.unwrap().is_empty());
}
