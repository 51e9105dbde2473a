//! The migrator: applies and rolls back the numbered SQL files of `schema/migrations/`,
//! which are compiled into the binary so a deployed `sluice-schema` needs no files beside it.
//!
//! Each migration runs in its own transaction under a transaction-scoped advisory lock, so two
//! migrators started at once apply every migration exactly once (the second waits, then sees
//! it applied). `schema_migration` records each applied migration with the SHA-256 of its up
//! SQL; before doing anything the migrator compares those with the embedded files and refuses
//! to run when an applied file was edited or the database is ahead of this build.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_postgres::{Client, Transaction};

use crate::SchemaError;

/// One numbered migration, as embedded in the binary.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number: applied in increasing order.
    pub version: i32,
    /// Its name (the file name without number and suffix).
    pub name: &'static str,
    /// SQL that applies it.
    pub up: &'static str,
    /// SQL that rolls it back.
    pub down: &'static str,
}

impl Migration {
    /// SHA-256 of the up SQL, as recorded in `schema_migration.checksum`. The down SQL is not
    /// covered: fixing a broken rollback must stay possible after the migration was applied.
    pub fn checksum(&self) -> [u8; 32] {
        Sha256::digest(self.up.as_bytes()).into()
    }
}

macro_rules! migration {
    ($version:literal, $name:literal, $file:literal) => {
        Migration {
            version: $version,
            name: $name,
            up: include_str!(concat!("../migrations/", $file, ".up.sql")),
            down: include_str!(concat!("../migrations/", $file, ".down.sql")),
        }
    };
}

/// Every migration this build knows, in order. Add new files here (never edit applied ones).
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "control_plane", "0001_control_plane"),
    migration!(2, "identity", "0002_identity"),
    migration!(3, "events", "0003_events"),
    migration!(4, "funnels", "0004_funnels"),
    migration!(5, "erasure", "0005_erasure"),
    migration!(6, "funnel_publish_only", "0006_funnel_publish_only"),
    migration!(7, "dedup_by_day", "0007_dedup_by_day"),
];

/// Where a migration stands in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Migration number.
    pub version: i32,
    /// Migration name.
    pub name: String,
    /// When it was applied, or `None` when pending.
    pub applied_at: Option<DateTime<Utc>>,
    /// Applied, but the embedded file differs from what was applied.
    pub modified: bool,
    /// Applied, but this build has no such migration (the database is ahead of the build).
    pub unknown: bool,
}

/// A migration applied or rolled back by [`up`] or [`down`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Migration number.
    pub version: i32,
    /// Migration name.
    pub name: String,
    /// How long its SQL took, in milliseconds.
    pub duration_ms: u64,
}

// One key for every migrator of every sluice database on the cluster: migrations are rare,
// so serialising them cluster-wide costs nothing and needs no per-database key.
const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock(hashtextextended('sluice.migrate', 0))";

const CREATE_TABLE_SQL: &str = "CREATE TABLE schema_migration (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    bytea       NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms bigint      NOT NULL
)";

struct Row {
    version: i32,
    name: String,
    checksum: Vec<u8>,
    applied_at: DateTime<Utc>,
}

/// Applies every pending migration, oldest first, each in its own transaction. Returns what
/// it applied (empty when the database was up to date).
pub async fn up(client: &mut Client) -> Result<Vec<Applied>, SchemaError> {
    let mut done = Vec::new();
    loop {
        let tx = locked(client).await?;
        let applied = verified_rows(&tx).await?;
        let Some(next) = MIGRATIONS
            .iter()
            .find(|m| !applied.iter().any(|r| r.version == m.version))
        else {
            return Ok(done);
        };
        let started = std::time::Instant::now();
        tx.batch_execute(next.up)
            .await
            .map_err(SchemaError::db(format!(
                "applying migration {:04} ({})",
                next.version, next.name
            )))?;
        let duration_ms = elapsed_ms(started);
        tx.execute(
            "INSERT INTO schema_migration (version, name, checksum, duration_ms) VALUES ($1, $2, $3, $4)",
            &[&next.version, &next.name, &next.checksum().as_slice(), &(duration_ms as i64)],
        )
        .await
        .map_err(SchemaError::db("recording the migration"))?;
        tx.commit().await.map_err(SchemaError::db(format!(
            "committing migration {:04} ({})",
            next.version, next.name
        )))?;
        tracing::info!(
            version = next.version,
            name = next.name,
            duration_ms,
            "migration applied"
        );
        done.push(Applied {
            version: next.version,
            name: next.name.to_owned(),
            duration_ms,
        });
    }
}

/// Rolls back the newest `steps` applied migrations, newest first, each in its own
/// transaction. `steps` larger than the number applied rolls back to an empty database.
pub async fn down(client: &mut Client, steps: usize) -> Result<Vec<Applied>, SchemaError> {
    let mut done = Vec::new();
    while done.len() < steps {
        let tx = locked(client).await?;
        let applied = verified_rows(&tx).await?;
        let Some(last) = applied.last() else {
            return Ok(done);
        };
        let migration = MIGRATIONS
            .iter()
            .find(|m| m.version == last.version)
            .ok_or_else(|| SchemaError::UnknownMigration {
                version: last.version,
                name: last.name.clone(),
            })?;
        let started = std::time::Instant::now();
        tx.batch_execute(migration.down)
            .await
            .map_err(SchemaError::db(format!(
                "rolling back migration {:04} ({})",
                migration.version, migration.name
            )))?;
        tx.execute(
            "DELETE FROM schema_migration WHERE version = $1",
            &[&migration.version],
        )
        .await
        .map_err(SchemaError::db("recording the rollback"))?;
        tx.commit().await.map_err(SchemaError::db(format!(
            "committing the rollback of migration {:04} ({})",
            migration.version, migration.name
        )))?;
        let duration_ms = elapsed_ms(started);
        tracing::info!(
            version = migration.version,
            name = migration.name,
            duration_ms,
            "migration rolled back"
        );
        done.push(Applied {
            version: migration.version,
            name: migration.name.to_owned(),
            duration_ms,
        });
    }
    Ok(done)
}

/// Every known and every applied migration, in version order, with its state. It reports
/// edited files (`modified`) rather than failing on them, and changes nothing except creating
/// the empty `schema_migration` table in a database that never had one.
pub async fn status(client: &mut Client) -> Result<Vec<MigrationStatus>, SchemaError> {
    let tx = locked(client).await?;
    let applied = rows(&tx).await?;
    let mut out: Vec<MigrationStatus> = MIGRATIONS
        .iter()
        .map(|m| {
            let row = applied.iter().find(|r| r.version == m.version);
            MigrationStatus {
                version: m.version,
                name: m.name.to_owned(),
                applied_at: row.map(|r| r.applied_at),
                modified: row.is_some_and(|r| r.checksum != m.checksum()),
                unknown: false,
            }
        })
        .collect();
    for row in applied
        .iter()
        .filter(|r| !MIGRATIONS.iter().any(|m| m.version == r.version))
    {
        out.push(MigrationStatus {
            version: row.version,
            name: row.name.clone(),
            applied_at: Some(row.applied_at),
            modified: false,
            unknown: true,
        });
    }
    out.sort_by_key(|s| s.version);
    tx.commit()
        .await
        .map_err(SchemaError::db("ending the status transaction"))?;
    Ok(out)
}

/// A transaction holding the migration lock, with `schema_migration` in place.
async fn locked(client: &mut Client) -> Result<Transaction<'_>, SchemaError> {
    let tx = client
        .transaction()
        .await
        .map_err(SchemaError::db("starting a migration transaction"))?;
    tx.batch_execute(LOCK_SQL)
        .await
        .map_err(SchemaError::db("taking the migration lock"))?;
    // Under the lock, so two first-time migrators do not race on creating it. Checked first
    // rather than IF NOT EXISTS, which logs a NOTICE on every run.
    let exists: bool = tx
        .query_one("SELECT to_regclass('schema_migration') IS NOT NULL", &[])
        .await
        .map_err(SchemaError::db("looking for schema_migration"))?
        .get(0);
    if !exists {
        tx.batch_execute(CREATE_TABLE_SQL)
            .await
            .map_err(SchemaError::db("creating schema_migration"))?;
    }
    Ok(tx)
}

async fn rows(tx: &Transaction<'_>) -> Result<Vec<Row>, SchemaError> {
    let rows = tx
        .query(
            "SELECT version, name, checksum, applied_at FROM schema_migration ORDER BY version",
            &[],
        )
        .await
        .map_err(SchemaError::db("reading schema_migration"))?;
    Ok(rows
        .into_iter()
        .map(|r| Row {
            version: r.get(0),
            name: r.get(1),
            checksum: r.get(2),
            applied_at: r.get(3),
        })
        .collect())
}

/// The applied migrations, after checking each against the embedded files.
async fn verified_rows(tx: &Transaction<'_>) -> Result<Vec<Row>, SchemaError> {
    let applied = rows(tx).await?;
    for row in &applied {
        let Some(m) = MIGRATIONS.iter().find(|m| m.version == row.version) else {
            return Err(SchemaError::UnknownMigration {
                version: row.version,
                name: row.name.clone(),
            });
        };
        if row.checksum != m.checksum() {
            return Err(SchemaError::ChecksumMismatch {
                version: m.version,
                name: m.name.to_owned(),
                applied: hex(&row.checksum),
                file: hex(&m.checksum()),
            });
        }
    }
    Ok(applied)
}

fn elapsed_ms(started: std::time::Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(
                !m.up.trim().is_empty() && !m.down.trim().is_empty(),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn every_migration_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let expected: Vec<String> = MIGRATIONS
            .iter()
            .flat_map(|m| {
                [
                    format!("{:04}_{}.down.sql", m.version, m.name),
                    format!("{:04}_{}.up.sql", m.version, m.name),
                ]
            })
            .collect();
        assert_eq!(files, expected);
    }
}
