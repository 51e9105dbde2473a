//! The write keys a run sends with: given on the command line (`--key`, repeatable), or made
//! fresh, one tenant, workspace and key each, through the schema crate (`--create-tenants N`).
//! `verify` maps a key's lookup prefix back to its tenant through `api_key` when `run` did
//! not know it.

use std::collections::HashMap;

use sluice_schema::{apikey, control};

use crate::acks::KeyRecord;
use crate::Error;

/// A write key of the run.
#[derive(Debug, Clone)]
pub struct Key {
    /// The plaintext key, sent to the collector (never written to the ack file).
    pub plaintext: String,
    /// Its lookup prefix, written to the ack file.
    pub prefix: String,
    /// Its tenant, when known.
    pub tenant_id: Option<i64>,
}

impl Key {
    /// A key given by the user, checked for the key format.
    pub fn given(plaintext: &str) -> Result<Key, Error> {
        let prefix = apikey::prefix_of(plaintext).ok_or_else(|| {
            Error::Usage(format!(
                "--key {}…: not a sluice write key (`{}` and {} letters or digits); make one with `sluice-schema key create`",
                plaintext.chars().take(6).collect::<String>(),
                apikey::KEY_MARKER,
                apikey::PREFIX_LEN + apikey::SECRET_LEN
            ))
        })?;
        Ok(Key {
            prefix: prefix.to_owned(),
            plaintext: plaintext.to_owned(),
            tenant_id: None,
        })
    }

    /// How the ack file names key `index`.
    pub fn record(&self, index: usize) -> KeyRecord {
        KeyRecord {
            index,
            prefix: self.prefix.clone(),
            tenant_id: self.tenant_id,
        }
    }
}

/// Makes `n` tenants, each with one workspace and one write key, named
/// `{name_prefix}-{i}`; returns their keys with tenants known.
pub async fn create_tenants(
    client: &tokio_postgres::Client,
    n: usize,
    name_prefix: &str,
) -> Result<Vec<Key>, Error> {
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{name_prefix}-{i}");
        let control = |err: sluice_schema::SchemaError| Error::Control(err.to_string());
        let tenant = control::create_tenant(client, &name)
            .await
            .map_err(control)?;
        let workspace = control::create_workspace(client, tenant, "loadtest")
            .await
            .map_err(control)?;
        let created = control::create_key(client, workspace, Some("sluice-loadtest"))
            .await
            .map_err(control)?;
        let mut key = Key::given(&created.plaintext)?;
        key.tenant_id = Some(created.tenant_id);
        keys.push(key);
    }
    Ok(keys)
}

/// Connects to PostgreSQL, driving the connection on a background task.
/// TLS settings in the URL (`sslmode`, `sslrootcert`, ...) apply, as for the services.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, Error> {
    sluice_schema::db::connect(url)
        .await
        .map_err(|e| Error::Connect(e.to_string()))
}

/// The tenants of the keys with these lookup prefixes; a prefix not in `api_key` is an error.
pub async fn tenants_of(
    client: &tokio_postgres::Client,
    prefixes: &[String],
) -> Result<HashMap<String, i64>, Error> {
    let rows = client
        .query(
            "SELECT prefix, tenant_id FROM api_key WHERE prefix = ANY($1)",
            &[&prefixes],
        )
        .await
        .map_err(Error::db("looking up write keys in api_key"))?;
    let found: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    if let Some(missing) = prefixes.iter().find(|p| !found.contains_key(*p)) {
        return Err(Error::UnknownKey {
            prefix: missing.clone(),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_keys_must_have_the_key_format() {
        let new = apikey::generate();
        let key = Key::given(&new.plaintext).unwrap();
        assert_eq!(key.prefix, new.prefix);
        let err = Key::given("sk_tooshort").unwrap_err().to_string();
        assert!(err.contains("sluice-schema key create"), "{err}");
        assert!(
            !err.contains("tooshort"),
            "the key is not echoed whole: {err}"
        );
    }
}
