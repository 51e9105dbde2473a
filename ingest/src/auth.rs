//! Write-key authentication: the key from the request (Basic, Bearer, body `writeKey`, pixel
//! `k=`), its row from `api_key` by prefix behind an in-memory TTL cache (one look-up in
//! flight per prefix, found keys refreshed ahead of their expiry), the constant-time hash
//! check, and `last_used_at` written in the background, never per request.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use base64::Engine;
use chrono::{DateTime, Utc};
use sluice_schema::apikey;

use tokio::sync::watch;

use crate::error::IngestError;
use crate::metrics;
use crate::metrics::KeyLookup;

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
#[derive(Debug, Clone, thiserror::Error)]
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
    /// From when a request using the entry also looks the row up again, so that a busy key
    /// is refreshed by one request before it expires instead of by all of them after.
    refresh_at: Instant,
    /// When the entry stops being believed.
    expires: Instant,
}

/// What the cache says of a prefix.
enum Cached {
    /// Believed: use it.
    Fresh(Option<KeyRow>),
    /// Believed, but due for a refresh.
    Due(Option<KeyRow>),
    /// Absent or expired: look it up before answering.
    Missing,
}

/// The answer of a look-up in flight, `None` until it lands.
type Answer = Option<Result<Option<KeyRow>, StoreError>>;

/// Whether a request asks the store itself or waits for the look-up another one started.
enum Role<'a> {
    /// This request looks the prefix up; the others wait for its answer.
    Lead(Flight<'a>),
    /// Another request's look-up of the same prefix is in flight.
    Follow(watch::Receiver<Answer>),
}

/// A look-up this request leads. Dropped, it leaves the flights (also when the request is
/// cancelled midway: its followers then see the sender gone and ask again).
struct Flight<'a> {
    flights: &'a Mutex<HashMap<String, watch::Receiver<Answer>>>,
    /// `None` when the flights were full and this look-up is not shared.
    prefix: Option<&'a str>,
    answer: watch::Sender<Answer>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if let (Some(prefix), Ok(mut flights)) = (self.prefix, self.flights.lock()) {
            flights.remove(prefix);
        }
    }
}

/// Keys checked against a [`KeyStore`] through a bounded TTL cache.
pub struct Authenticator<K> {
    /// The key rows' source.
    store: K,
    /// Prefix -> row. Bounded by `max_entries`; a revoked key works at most `ttl` longer.
    cache: Mutex<HashMap<String, Entry>>,
    /// Prefix -> the answer of its look-up in flight, so that the requests a cold or expired
    /// key gets at once cost the store one query, not one each (which, behind a busy
    /// database, timed out the small pool: 503s). Bounded by `max_entries`; past it a look-up
    /// is not shared.
    flights: Mutex<HashMap<String, watch::Receiver<Answer>>>,
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
            flights: Mutex::new(HashMap::new()),
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
        let row = self.row_of(prefix).await?.ok_or(IngestError::UnknownKey)?;
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

    /// The row of `prefix` (`None`: unknown), from the cache or the store. A row due for a
    /// refresh is refreshed by the one request that finds no refresh in flight; if that
    /// look-up fails, the row is used until it expires, and no longer (fail closed).
    async fn row_of(&self, prefix: &str) -> Result<Option<KeyRow>, IngestError> {
        match self.cached(prefix) {
            Cached::Fresh(row) => {
                metrics::key_cache_lookup(KeyLookup::Hit);
                Ok(row)
            }
            Cached::Due(row) => match self.join(prefix) {
                Role::Lead(flight) => {
                    metrics::key_cache_lookup(KeyLookup::Refresh);
                    Ok(self.fetch(prefix, flight).await.unwrap_or(row))
                }
                Role::Follow(_) => {
                    metrics::key_cache_lookup(KeyLookup::Hit);
                    Ok(row)
                }
            },
            Cached::Missing => loop {
                match self.join(prefix) {
                    Role::Lead(flight) => {
                        metrics::key_cache_lookup(KeyLookup::Miss);
                        return self.fetch(prefix, flight).await.map_err(|err| {
                            tracing::warn!(cause = %err, "cannot look up a write key");
                            IngestError::KeyStoreUnavailable(self.retry_after_secs)
                        });
                    }
                    Role::Follow(mut answer) => {
                        let landed = answer.wait_for(Option::is_some).await.ok();
                        if let Some(answer) = landed.as_deref().cloned().flatten() {
                            metrics::key_cache_lookup(KeyLookup::Shared);
                            return answer.map_err(|_| {
                                IngestError::KeyStoreUnavailable(self.retry_after_secs)
                            });
                        }
                        // The leading request was cancelled before its answer: lead or follow
                        // the next look-up.
                    }
                }
            },
        }
    }

    /// Leads the look-up of `prefix`, or follows the one in flight.
    fn join<'a>(&'a self, prefix: &'a str) -> Role<'a> {
        let (answer, waiting) = watch::channel(None);
        let Ok(mut flights) = self.flights.lock() else {
            return Role::Lead(Flight {
                flights: &self.flights,
                prefix: None,
                answer,
            });
        };
        if let Some(waiting) = flights.get(prefix) {
            return Role::Follow(waiting.clone());
        }
        let shared = flights.len() < self.max_entries;
        if shared {
            flights.insert(prefix.to_owned(), waiting);
        }
        Role::Lead(Flight {
            flights: &self.flights,
            prefix: shared.then_some(prefix),
            answer,
        })
    }

    /// Asks the store for `prefix` and caches a found or unknown row (a failure is not
    /// cached: the next request asks again), then tells the followers.
    async fn fetch(&self, prefix: &str, flight: Flight<'_>) -> Result<Option<KeyRow>, StoreError> {
        let answer = self.store.fetch(prefix).await;
        if let Ok(row) = &answer {
            self.remember(prefix, row.clone());
        }
        flight.answer.send_replace(Some(answer.clone()));
        answer
    }

    /// What the cache holds for `prefix` now.
    fn cached(&self, prefix: &str) -> Cached {
        let Ok(cache) = self.cache.lock() else {
            return Cached::Missing;
        };
        let now = Instant::now();
        match cache.get(prefix) {
            Some(e) if e.expires <= now => Cached::Missing,
            Some(e) if e.refresh_at <= now => Cached::Due(e.row.clone()),
            Some(e) => Cached::Fresh(e.row.clone()),
            None => Cached::Missing,
        }
    }

    fn remember(&self, prefix: &str, row: Option<KeyRow>) {
        // Found rows are refreshed in the last quarter of their life; unknown prefixes are
        // not (a flood of made-up prefixes must not keep the store busy), they just expire.
        let (ttl, refresh_after) = if row.is_some() {
            (self.ttl, self.ttl - self.ttl / 4)
        } else {
            (self.negative_ttl, self.negative_ttl)
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
        let now = Instant::now();
        cache.insert(
            prefix.to_owned(),
            Entry {
                row,
                refresh_at: now + refresh_after,
                expires: now + ttl,
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
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// One key, counted look-ups that take `delay`, and a switch that makes them fail.
    struct SlowStore {
        row: KeyRow,
        prefix: String,
        delay: Duration,
        fetches: AtomicUsize,
        down: AtomicBool,
    }

    impl KeyStore for Arc<SlowStore> {
        async fn fetch(&self, prefix: &str) -> Result<Option<KeyRow>, StoreError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError("timed out waiting for a connection".into()));
            }
            Ok((prefix == self.prefix).then(|| self.row.clone()))
        }
        async fn touch(&self, _: &[i64]) -> Result<(), StoreError> {
            Ok(())
        }
        async fn ping(&self) -> Result<(), String> {
            Ok(())
        }
    }

    /// An authenticator over a [`SlowStore`] of one key, with `ttl`, and that key.
    fn slow(
        ttl: Duration,
        delay: Duration,
    ) -> (Arc<Authenticator<Arc<SlowStore>>>, Arc<SlowStore>, String) {
        let key = apikey::generate();
        let store = Arc::new(SlowStore {
            row: KeyRow {
                id: 1,
                tenant_id: 2,
                workspace_id: 3,
                hash: key.hash.to_vec(),
                scopes: vec!["write".into()],
                expires_at: None,
                revoked_at: None,
            },
            prefix: key.prefix.clone(),
            delay,
            fetches: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        });
        let auth = Authenticator::new(store.clone(), ttl, Duration::from_secs(5), 100, 1);
        (Arc::new(auth), store, key.plaintext)
    }

    /// `n` requests with `key` at once; their results.
    async fn at_once(
        auth: &Arc<Authenticator<Arc<SlowStore>>>,
        key: &str,
        n: usize,
    ) -> Vec<Result<Principal, IngestError>> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (auth, key) = (auth.clone(), key.to_owned());
                tokio::spawn(async move { auth.authenticate(&key).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task ran"));
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_for_an_uncached_key_share_one_look_up_and_its_failure() {
        let (auth, store, key) = slow(Duration::from_secs(30), Duration::from_millis(100));
        store.down.store(true, Ordering::SeqCst);
        let failed = at_once(&auth, &key, 50).await;
        assert!(failed
            .iter()
            .all(|r| matches!(r, Err(IngestError::KeyStoreUnavailable(1)))));
        assert_eq!(
            store.fetches.load(Ordering::SeqCst),
            1,
            "one look-up for 50 requests"
        );

        // A failure is not cached: the next requests ask again, once.
        store.down.store(false, Ordering::SeqCst);
        let ok = at_once(&auth, &key, 50).await;
        assert!(ok
            .iter()
            .all(|r| r.as_ref().is_ok_and(|p| p.tenant_id == 2)));
        assert_eq!(store.fetches.load(Ordering::SeqCst), 2);
        at_once(&auth, &key, 10).await;
        assert_eq!(
            store.fetches.load(Ordering::SeqCst),
            2,
            "then the cache answers"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_key_is_refreshed_once_before_it_expires_and_fails_closed_after() {
        let ttl = Duration::from_secs(2);
        let (auth, store, key) = slow(ttl, Duration::from_millis(50));
        assert!(auth.authenticate(&key).await.is_ok());
        assert_eq!(store.fetches.load(Ordering::SeqCst), 1);

        // In the last quarter of the entry's life: one request refreshes, none waits for it
        // to fail, and a failed refresh leaves the row usable until it expires.
        tokio::time::sleep(ttl - ttl / 8).await;
        store.down.store(true, Ordering::SeqCst);
        let during = at_once(&auth, &key, 20).await;
        assert!(during.iter().all(Result::is_ok), "{during:?}");
        assert_eq!(store.fetches.load(Ordering::SeqCst), 2, "one refresh");

        // Expired and the store still down: closed, not trusted.
        tokio::time::sleep(ttl / 4).await;
        let after = at_once(&auth, &key, 20).await;
        assert!(after
            .iter()
            .all(|r| matches!(r, Err(IngestError::KeyStoreUnavailable(_)))));

        // A refresh that succeeds renews the entry before anyone waits on the store.
        store.down.store(false, Ordering::SeqCst);
        assert!(auth.authenticate(&key).await.is_ok());
        let fetches = store.fetches.load(Ordering::SeqCst);
        tokio::time::sleep(ttl - ttl / 8).await;
        assert!(at_once(&auth, &key, 20).await.iter().all(Result::is_ok));
        assert_eq!(
            store.fetches.load(Ordering::SeqCst),
            fetches + 1,
            "one refresh"
        );
        tokio::time::sleep(ttl / 4).await;
        assert!(at_once(&auth, &key, 20).await.iter().all(Result::is_ok));
        assert_eq!(
            store.fetches.load(Ordering::SeqCst),
            fetches + 1,
            "the refreshed entry answers past the first one's expiry"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_look_up_hands_over_to_a_waiting_request() {
        let (auth, store, key) = slow(Duration::from_secs(30), Duration::from_millis(200));
        let leader = {
            let (auth, key) = (auth.clone(), key.clone());
            tokio::spawn(async move { auth.authenticate(&key).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let follower = {
            let (auth, key) = (auth.clone(), key.clone());
            tokio::spawn(async move { auth.authenticate(&key).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        leader.abort();
        let answer = tokio::time::timeout(Duration::from_secs(2), follower)
            .await
            .expect("the follower does not wait forever")
            .expect("task ran");
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(store.fetches.load(Ordering::SeqCst), 2);
        assert!(
            auth.flights.lock().expect("lock").is_empty(),
            "no flight left behind"
        );
    }

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
