//! Write-key authentication: the key from the request (Basic, Bearer, body `writeKey`, pixel
//! `k=`), its row from `api_key` by prefix behind an in-memory TTL cache, the constant-time
//! hash check, and `last_used_at` written in the background, never per request.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use base64::Engine;
use chrono::{DateTime, Utc};
use sluice_schema::apikey;

use crate::error::IngestError;
use crate::metrics;

/// What the collector knows of a key: its `api_key` row without the secret parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// `api_key.id`.
    pub id: i64,
    /// Tenant the key writes into.
    pub tenant_id: i64,
    /// Workspace the key writes into.
    pub workspace_id: i64,
    /// SHA-256 of the whole key.
    pub hash: Vec<u8>,
    /// Granted scopes; writing needs `write`.
    pub scopes: Vec<String>,
    /// When the key stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the key was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The authenticated identity of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    /// `api_key.id`, for rate limiting and `last_used_at`.
    pub key_id: i64,
    /// Tenant of every message of the request.
    pub tenant_id: i64,
    /// Workspace of every message of the request.
    pub workspace_id: i64,
}

/// The key store failed (not: the key is unknown).
#[derive(Debug, thiserror::Error)]
#[error("key store unavailable: {0}")]
pub struct StoreError(pub String);

/// Where key rows come from: PostgreSQL in production, a map in handler unit tests.
pub trait KeyStore: Send + Sync + 'static {
    /// The row whose `prefix` is `prefix`, or `None`.
    fn fetch(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Option<KeyRow>, StoreError>> + Send;
    /// Sets `last_used_at = now()` on these keys.
    fn touch(&self, ids: &[i64]) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// `Ok` when the store answers (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// [`KeyStore`] over the `api_key` table.
pub struct PgKeyStore {
    /// Small pool: look-ups are cached, so few connections serve many requests.
    pool: deadpool_postgres::Pool,
}

impl PgKeyStore {
    /// A store over `pool`.
    pub fn new(pool: deadpool_postgres::Pool) -> PgKeyStore {
        PgKeyStore { pool }
    }
}

impl KeyStore for PgKeyStore {
    async fn fetch(&self, prefix: &str) -> Result<Option<KeyRow>, StoreError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError(sluice_schema::db::describe_pool(&e)))?;
        let row = client
            .query_opt(
                "SELECT id, tenant_id, workspace_id, hash, scopes, expires_at, revoked_at \
                 FROM api_key WHERE prefix = $1",
                &[&prefix],
            )
            .await
            .map_err(|e| StoreError(sluice_schema::db::describe(&e)))?;
        row.map(|row| {
            Ok(KeyRow {
                id: row.try_get(0)?,
                tenant_id: row.try_get(1)?,
                workspace_id: row.try_get(2)?,
                hash: row.try_get(3)?,
                scopes: row.try_get(4)?,
                expires_at: row.try_get(5)?,
                revoked_at: row.try_get(6)?,
            })
        })
        .transpose()
        .map_err(|e: tokio_postgres::Error| StoreError(sluice_schema::db::describe(&e)))
    }

    async fn touch(&self, ids: &[i64]) -> Result<(), StoreError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError(sluice_schema::db::describe_pool(&e)))?;
        client
            .execute(
                "UPDATE api_key SET last_used_at = now() WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(|e| StoreError(sluice_schema::db::describe(&e)))?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), String> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| sluice_schema::db::describe_pool(&e))?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| sluice_schema::db::describe(&e))?;
        Ok(())
    }
}

/// The key a request presents, if any: `Authorization: Basic` (key as user name, as Segment's
/// server SDKs send it) or `Authorization: Bearer`.
pub fn key_from_headers(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
        return Some(user.to_owned());
    }
    None
}

/// One cached look-up.
struct Entry {
    /// The row, or `None` for an unknown prefix.
    row: Option<KeyRow>,
    /// When the entry stops being believed.
    expires: Instant,
}

/// Keys checked against a [`KeyStore`] through a bounded TTL cache.
pub struct Authenticator<K> {
    /// The key rows' source.
    store: K,
    /// Prefix -> row. Bounded by `max_entries`; a revoked key works at most `ttl` longer.
    cache: Mutex<HashMap<String, Entry>>,
    /// Life of a found row.
    ttl: Duration,
    /// Life of an unknown prefix.
    negative_ttl: Duration,
    /// Most entries.
    max_entries: usize,
    /// Keys used since the last `last_used_at` flush. Bounded by the number of keys that
    /// exist, since only found keys are added.
    used: Mutex<HashSet<i64>>,
    /// `Retry-After` seconds when the store is down.
    retry_after_secs: u64,
}

impl<K: KeyStore> Authenticator<K> {
    /// An authenticator over `store`.
    pub fn new(
        store: K,
        ttl: Duration,
        negative_ttl: Duration,
        max_entries: usize,
        retry_after_secs: u64,
    ) -> Self {
        Authenticator {
            store,
            cache: Mutex::new(HashMap::new()),
            ttl,
            negative_ttl,
            max_entries: max_entries.max(1),
            used: Mutex::new(HashSet::new()),
            retry_after_secs,
        }
    }

    /// Checks a presented key: known, hash equal, write scope, not revoked, not expired.
    pub async fn authenticate(&self, presented: &str) -> Result<Principal, IngestError> {
        let prefix = apikey::prefix_of(presented).ok_or(IngestError::UnknownKey)?;
        let row = match self.cached(prefix) {
            Some(row) => {
                metrics::key_cache_lookup(true);
                row
            }
            None => {
                metrics::key_cache_lookup(false);
                let row = self.store.fetch(prefix).await.map_err(|err| {
                    tracing::warn!(cause = %err, "cannot look up a write key");
                    IngestError::KeyStoreUnavailable(self.retry_after_secs)
                })?;
                self.remember(prefix, row.clone());
                row
            }
        };
        let row = row.ok_or(IngestError::UnknownKey)?;
        if !apikey::verify(presented, &row.hash) {
            return Err(IngestError::UnknownKey);
        }
        let now = Utc::now();
        if row.revoked_at.is_some_and(|t| t <= now) {
            return Err(IngestError::KeyRevoked);
        }
        if row.expires_at.is_some_and(|t| t <= now) {
            return Err(IngestError::KeyExpired);
        }
        if !row.scopes.iter().any(|s| s == "write") {
            return Err(IngestError::KeyScope);
        }
        if let Ok(mut used) = self.used.lock() {
            used.insert(row.id);
        }
        Ok(Principal {
            key_id: row.id,
            tenant_id: row.tenant_id,
            workspace_id: row.workspace_id,
        })
    }

    /// The cached look-up of `prefix`: `Some(row or None)` while fresh, `None` to fetch.
    fn cached(&self, prefix: &str) -> Option<Option<KeyRow>> {
        let cache = self.cache.lock().ok()?;
        let entry = cache.get(prefix)?;
        (entry.expires > Instant::now()).then(|| entry.row.clone())
    }

    fn remember(&self, prefix: &str, row: Option<KeyRow>) {
        let ttl = if row.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        };
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= self.max_entries {
            let now = Instant::now();
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= self.max_entries {
                // Still full of live entries (a flood of distinct prefixes): start over rather
                // than grow; found keys come back with one look-up each.
                cache.clear();
            }
        }
        cache.insert(
            prefix.to_owned(),
            Entry {
                row,
                expires: Instant::now() + ttl,
            },
        );
        metrics::key_cache_entries(cache.len());
    }

    /// Writes `last_used_at` for the keys used since the last call.
    pub async fn flush_last_used(&self) {
        let ids: Vec<i64> = match self.used.lock() {
            Ok(mut used) => used.drain().collect(),
            Err(_) => return,
        };
        if ids.is_empty() {
            return;
        }
        if let Err(err) = self.store.touch(&ids).await {
            // Not worth failing anything for: the next flush tries again with these ids.
            tracing::warn!(cause = %err, keys = ids.len(), "cannot update api_key.last_used_at");
            if let Ok(mut used) = self.used.lock() {
                used.extend(ids);
            }
        }
    }

    /// The store, for readiness checks.
    pub fn store(&self) -> &K {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn keys_come_from_basic_and_bearer() {
        let mut h = HeaderMap::new();
        assert_eq!(key_from_headers(&h), None);
        let basic = base64::engine::general_purpose::STANDARD.encode("sk_abc:");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {basic}")).unwrap(),
        );
        assert_eq!(key_from_headers(&h).as_deref(), Some("sk_abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk_def"),
        );
        assert_eq!(key_from_headers(&h).as_deref(), Some("sk_def"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(key_from_headers(&h), None);
    }
}
