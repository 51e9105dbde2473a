//! Erasure: deleting a whole tenant, or one person of a tenant, from every table, and the
//! suppression list (`erasure_suppression`, migration 0005) that keeps the writers from
//! storing them again from messages still in Kafka or sent later.
//!
//! Both run the same way: (1) the suppression rows are committed; (2) the eraser waits until
//! no writer transaction begun before that commit is still open, since writers read the list
//! inside each batch's transaction, so every batch committed after this point has seen it;
//! (3) the rows are deleted in small batches, each its own short transaction holding only row
//! locks, so writers are never locked out. Both are idempotent: an interrupted run is
//! finished by running it again.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::partitions;
use crate::pii::PiiKeys;
use crate::SchemaError;

/// What a suppression row matches: the `erasure_suppression.kind` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SuppressionKind {
    /// Every message of the tenant (a deleted tenant).
    Tenant,
    /// Messages whose `userId` (or an alias's `previousId`) is the erased user id.
    UserId,
    /// Messages whose `anonymousId` (or an alias's `previousId`) is an erased anonymous id.
    AnonymousId,
    /// Identify calls whose email has the erased email's fingerprint.
    Email,
    /// Identify calls whose phone has the erased phone's fingerprint.
    Phone,
}

impl SuppressionKind {
    /// The `kind` column's value.
    pub const fn as_str(self) -> &'static str {
        match self {
            SuppressionKind::Tenant => "tenant",
            SuppressionKind::UserId => "user_id",
            SuppressionKind::AnonymousId => "anonymous_id",
            SuppressionKind::Email => "email",
            SuppressionKind::Phone => "phone",
        }
    }

    /// The kind of a `kind` column value; `None` for a value this build does not know.
    pub fn parse(s: &str) -> Option<SuppressionKind> {
        Some(match s {
            "tenant" => SuppressionKind::Tenant,
            "user_id" => SuppressionKind::UserId,
            "anonymous_id" => SuppressionKind::AnonymousId,
            "email" => SuppressionKind::Email,
            "phone" => SuppressionKind::Phone,
            _ => return None,
        })
    }
}

/// The stored fingerprint of a user or anonymous id: SHA-256 of the kind and the id, so the
/// list names nobody (the writer hashes a message's ids the same way to compare). Email and
/// phone use the keyed fingerprints of [`PiiKeys`] instead, as `lead` does.
pub fn id_fingerprint(kind: SuppressionKind, id: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"sluice.suppression.v1/");
    h.update(kind.as_str().as_bytes());
    h.update(b"/");
    h.update(id.as_bytes());
    h.finalize().into()
}

/// Rows deleted per statement: a few thousand keep each transaction in the milliseconds.
pub const DELETE_BATCH: i64 = 5_000;

/// Longest wait for writer transactions begun before the suppression rows were committed.
const WRITER_WAIT: Duration = Duration::from_secs(120);

/// Rows deleted from one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// Table name.
    pub table: &'static str,
    /// Rows deleted.
    pub rows: u64,
}

/// Who to erase inside a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Person {
    /// The lead with this user id (and, without a lead, events and visitors carrying it).
    UserId(String),
    /// The lead with this email (matched by fingerprint: needs the PII keys).
    Email(String),
    /// The visitor with this anonymous id, and the lead it is linked to.
    AnonymousId(String),
}

/// What [`erase_person`] found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erased {
    /// Ids of the leads removed.
    pub leads: Vec<i64>,
    /// Identifiers put on the suppression list (new or already there).
    pub suppressed: usize,
    /// Rows deleted per table.
    pub deleted: Vec<Deleted>,
}

/// Deletes every row of `tenant_id`: events (every month partition), dedup claims, sessions,
/// identity links, visitors, leads, then the tenant with its workspaces, keys and funnels.
/// Keys are revoked and the tenant suppressed first, so nothing arrives behind the delete.
/// `progress` is called after every batch. The suppression row stays (it holds only the id).
pub async fn delete_tenant(
    client: &Client,
    tenant_id: i64,
    mut progress: impl FnMut(&str, u64),
) -> Result<Vec<Deleted>, SchemaError> {
    let committed = {
        client
            .execute(
                "INSERT INTO erasure_suppression (tenant_id, kind, fingerprint) VALUES ($1, 'tenant', '') \
                 ON CONFLICT DO NOTHING",
                &[&tenant_id],
            )
            .await
            .map_err(SchemaError::db("suppressing the tenant"))?;
        client
            .execute(
                "UPDATE api_key SET revoked_at = coalesce(revoked_at, now()) WHERE tenant_id = $1",
                &[&tenant_id],
            )
            .await
            .map_err(SchemaError::db("revoking the tenant's keys"))?;
        now(client).await?
    };
    wait_for_writers(client, committed).await?;
    let t: &(dyn ToSql + Sync) = &tenant_id;
    let mut out = Vec::new();
    out.push(Deleted {
        table: "event",
        rows: delete_events(client, "tenant_id = $1", &[t], &mut progress).await?,
    });
    // `event_dedup` is not here: a claim is a key and a hashed id with no tenant column, and
    // it expires whole with its day partition within the dedup window.
    for (table, key) in [
        ("session", "tenant_id, session_id"),
        ("identity_link", "tenant_id, anonymous_id, lead_id"),
        ("visitor", "tenant_id, anonymous_id"),
        ("lead", "tenant_id, id"),
    ] {
        let rows =
            delete_batched(client, table, key, "tenant_id = $1", &[t], &mut progress).await?;
        out.push(Deleted { table, rows });
    }
    // The control plane is small: one statement, the cascades take workspaces, keys, funnels.
    let rows = client
        .execute("DELETE FROM tenant WHERE id = $1", &[&tenant_id])
        .await
        .map_err(SchemaError::db("deleting the tenant row"))?;
    progress("tenant", rows);
    out.push(Deleted {
        table: "tenant",
        rows,
    });
    Ok(out)
}

const LEAD_BY_USER_ID: &str = "SELECT id, user_id, email_fingerprint, phone_fingerprint \
    FROM lead WHERE tenant_id = $1 AND user_id = $2";
const LEAD_BY_EMAIL: &str = "SELECT id, user_id, email_fingerprint, phone_fingerprint \
    FROM lead WHERE tenant_id = $1 AND email_fingerprint = $2";
/// The leads an anonymous id is linked to, or its visitor row points at.
const LEAD_BY_ANONYMOUS_ID: &str = "SELECT id, user_id, email_fingerprint, phone_fingerprint \
    FROM lead WHERE tenant_id = $1 AND id IN (SELECT lead_id FROM identity_link \
      WHERE tenant_id = $1 AND anonymous_id = $2 UNION SELECT lead_id FROM visitor \
      WHERE tenant_id = $1 AND anonymous_id = $2 AND lead_id IS NOT NULL)";

/// Erases one person of `tenant_id`: the lead `who` names (if any), its identity links, the
/// visitors linked to it (or named), and their events and sessions. Every identifier found
/// (user ids, anonymous ids, email and phone fingerprints) is suppressed first, so writers
/// drop later messages for the person. `keys` is needed for [`Person::Email`].
pub async fn erase_person(
    client: &Client,
    tenant_id: i64,
    who: &Person,
    keys: Option<&PiiKeys>,
    mut progress: impl FnMut(&str, u64),
) -> Result<Erased, SchemaError> {
    let mut users: Vec<String> = Vec::new();
    let mut anons: Vec<String> = Vec::new();
    let mut emails: Vec<Vec<u8>> = Vec::new();
    let mut phones: Vec<Vec<u8>> = Vec::new();
    let rows = match who {
        Person::UserId(u) => {
            users.push(u.clone());
            client.query(LEAD_BY_USER_ID, &[&tenant_id, u]).await
        }
        Person::Email(e) => {
            let keys = keys.ok_or_else(|| {
                SchemaError::PiiConfig(
                    "erasing by email needs SLUICE_PII_KEYS (the key that made the fingerprints)"
                        .into(),
                )
            })?;
            let fp = keys.fingerprint_email(e).ok_or_else(|| {
                SchemaError::NotFound(format!("a usable email in {e:?} (nothing to match)"))
            })?;
            emails.push(fp.to_vec());
            client
                .query(LEAD_BY_EMAIL, &[&tenant_id, &fp.as_slice()])
                .await
        }
        Person::AnonymousId(a) => {
            anons.push(a.clone());
            client.query(LEAD_BY_ANONYMOUS_ID, &[&tenant_id, a]).await
        }
    }
    .map_err(SchemaError::db("finding the person's lead"))?;
    let mut leads: Vec<i64> = Vec::new();
    for row in rows {
        leads.push(row.get(0));
        users.extend(row.get::<_, Option<String>>(1));
        emails.extend(row.get::<_, Option<Vec<u8>>>(2));
        phones.extend(row.get::<_, Option<Vec<u8>>>(3));
    }
    // Every anonymous id of the person: linked to the lead, pointed at it, or carrying the
    // user id.
    let linked = client
        .query(
            "SELECT anonymous_id FROM identity_link WHERE tenant_id = $1 AND lead_id = ANY($2) \
             UNION SELECT anonymous_id FROM visitor WHERE tenant_id = $1 \
               AND (lead_id = ANY($2) OR user_id = ANY($3))",
            &[&tenant_id, &leads, &users],
        )
        .await
        .map_err(SchemaError::db("finding the person's anonymous ids"))?;
    anons.extend(linked.iter().map(|r| r.get::<_, String>(0)));
    for list in [&mut users, &mut anons] {
        list.sort();
        list.dedup();
    }

    let mut entries: Vec<(SuppressionKind, Vec<u8>)> = Vec::new();
    entries.extend(users.iter().map(|u| {
        (
            SuppressionKind::UserId,
            id_fingerprint(SuppressionKind::UserId, u).to_vec(),
        )
    }));
    entries.extend(anons.iter().map(|a| {
        (
            SuppressionKind::AnonymousId,
            id_fingerprint(SuppressionKind::AnonymousId, a).to_vec(),
        )
    }));
    entries.extend(emails.into_iter().map(|f| (SuppressionKind::Email, f)));
    entries.extend(phones.into_iter().map(|f| (SuppressionKind::Phone, f)));
    let kinds: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    let fps: Vec<&[u8]> = entries.iter().map(|(_, f)| f.as_slice()).collect();
    client
        .execute(
            "INSERT INTO erasure_suppression (tenant_id, kind, fingerprint) \
             SELECT $1, * FROM unnest($2::text[], $3::bytea[]) ON CONFLICT DO NOTHING",
            &[&tenant_id, &kinds, &fps],
        )
        .await
        .map_err(SchemaError::db("adding the person to the suppression list"))?;
    let committed = now(client).await?;
    wait_for_writers(client, committed).await?;

    let (t, a, u, l): (
        &(dyn ToSql + Sync),
        &(dyn ToSql + Sync),
        &(dyn ToSql + Sync),
        &(dyn ToSql + Sync),
    ) = (&tenant_id, &anons, &users, &leads);
    let mut deleted = Vec::new();
    let rows = delete_events(
        client,
        "tenant_id = $1 AND (anonymous_id = ANY($2) OR user_id = ANY($3))",
        &[t, a, u],
        &mut progress,
    )
    .await?;
    deleted.push(Deleted {
        table: "event",
        rows,
    });
    for (table, key, filter, params) in [
        (
            "session",
            "tenant_id, session_id",
            "tenant_id = $1 AND (anonymous_id = ANY($2) OR user_id = ANY($3))",
            vec![t, a, u],
        ),
        (
            "identity_link",
            "tenant_id, anonymous_id, lead_id",
            "tenant_id = $1 AND (anonymous_id = ANY($2) OR lead_id = ANY($3))",
            vec![t, a, l],
        ),
        (
            "visitor",
            "tenant_id, anonymous_id",
            "tenant_id = $1 AND (anonymous_id = ANY($2) OR user_id = ANY($3))",
            vec![t, a, u],
        ),
        (
            "lead",
            "tenant_id, id",
            "tenant_id = $1 AND id = ANY($2)",
            vec![t, l],
        ),
    ] {
        let rows = delete_batched(client, table, key, filter, &params, &mut progress).await?;
        deleted.push(Deleted { table, rows });
    }
    Ok(Erased {
        leads,
        suppressed: entries.len(),
        deleted,
    })
}

/// The database's clock, after the caller's last statement committed (autocommit).
async fn now(client: &Client) -> Result<DateTime<Utc>, SchemaError> {
    Ok(client
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .map_err(SchemaError::db("reading the database clock"))?
        .get(0))
}

/// Waits until no writer (`application_name` sluice-writer) has a transaction open that
/// began before `since`: those may have read the suppression list before it changed.
async fn wait_for_writers(client: &Client, since: DateTime<Utc>) -> Result<(), SchemaError> {
    let started = Instant::now();
    loop {
        let open: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'sluice-writer' AND xact_start < $1",
                &[&since],
            )
            .await
            .map_err(SchemaError::db("looking for open writer transactions"))?
            .get(0);
        if open == 0 {
            return Ok(());
        }
        if started.elapsed() > WRITER_WAIT {
            return Err(SchemaError::WritersBusy(format!(
                "{open} writer transaction(s) begun before the suppression are still open after {} s",
                WRITER_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deletes `event` rows matching `filter` month by month (each statement reaches one month's
/// leaf of the tenant), in batches of [`DELETE_BATCH`].
async fn delete_events(
    client: &Client,
    filter: &str,
    params: &[&(dyn ToSql + Sync)],
    progress: &mut impl FnMut(&str, u64),
) -> Result<u64, SchemaError> {
    let mut total = 0;
    for month in partitions::list(client).await? {
        // The month table alone: the hash leaf is found by tenant_id, no other month is read.
        let n = delete_batched(
            client,
            month_table(&month.table)?,
            "tenant_id, occurred_at, event_id",
            filter,
            params,
            &mut |_, n| progress(&format!("event ({})", month.table), n),
        )
        .await?;
        total += n;
    }
    Ok(total)
}

/// A month table name from the catalogue, checked before it is spliced into SQL.
fn month_table(name: &str) -> Result<&str, SchemaError> {
    if partitions::is_month_name(name) {
        Ok(name)
    } else {
        Err(SchemaError::InvalidPartitionConfig(format!(
            "event partition {name:?} is not named event_yYYYYmMM; rename or detach it, then retry"
        )))
    }
}

/// Deletes rows of `table` matching `filter` by primary key `key`, [`DELETE_BATCH`] at a time,
/// each batch its own transaction; reports the running total after each batch.
async fn delete_batched(
    client: &Client,
    table: &str,
    key: &str,
    filter: &str,
    params: &[&(dyn ToSql + Sync)],
    progress: &mut impl FnMut(&str, u64),
) -> Result<u64, SchemaError> {
    let sql = format!(
        "DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {filter} LIMIT {DELETE_BATCH})"
    );
    let statement = client.prepare(&sql).await.map_err(SchemaError::db(format!(
        "preparing the delete from {table}"
    )))?;
    let mut total = 0;
    loop {
        let n = client
            .execute(&statement, params)
            .await
            .map_err(SchemaError::db(format!(
                "deleting from {table} (run the command again to finish)"
            )))?;
        total += n;
        if n > 0 {
            progress(table, total);
        }
        if n < DELETE_BATCH as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_fingerprints_differ_by_kind_and_id() {
        let u = id_fingerprint(SuppressionKind::UserId, "u-1");
        assert_eq!(u, id_fingerprint(SuppressionKind::UserId, "u-1"));
        assert_ne!(u, id_fingerprint(SuppressionKind::AnonymousId, "u-1"));
        assert_ne!(u, id_fingerprint(SuppressionKind::UserId, "u-2"));
        for k in [
            SuppressionKind::Tenant,
            SuppressionKind::UserId,
            SuppressionKind::AnonymousId,
            SuppressionKind::Email,
            SuppressionKind::Phone,
        ] {
            assert_eq!(SuppressionKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(SuppressionKind::parse("name"), None);
    }
}
