//! The control plane: tenants, workspaces and write keys. Used by the `sluice-schema` CLI,
//! the load test and the tests; the collector only reads `api_key`.

use tokio_postgres::error::SqlState;
use tokio_postgres::GenericClient;

use crate::ids::{self, Kind};
use crate::{apikey, SchemaError};

/// Creates a tenant; returns its id.
pub async fn create_tenant<C: GenericClient + Sync>(
    client: &C,
    name: &str,
) -> Result<i64, SchemaError> {
    let row = client
        .query_one(
            "INSERT INTO tenant (name) VALUES ($1) RETURNING id",
            &[&name],
        )
        .await
        .map_err(SchemaError::db(format!(
            "creating tenant {name:?} (names are 1 to 200 characters)"
        )))?;
    Ok(row.get(0))
}

/// Creates a workspace of `tenant_id`; returns its id.
pub async fn create_workspace<C: GenericClient + Sync>(
    client: &C,
    tenant_id: i64,
    name: &str,
) -> Result<i64, SchemaError> {
    let result = client
        .query_one(
            "INSERT INTO workspace (tenant_id, name) VALUES ($1, $2) RETURNING id",
            &[&tenant_id, &name],
        )
        .await;
    match result {
        Ok(row) => Ok(row.get(0)),
        Err(err) if err.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => Err(
            SchemaError::NotFound(format!("tenant {}", ids::encode(Kind::Tenant, tenant_id))),
        ),
        Err(err) => Err(SchemaError::db(format!(
            "creating workspace {name:?} (names are unique within a tenant, 1 to 200 characters)"
        ))(err)),
    }
}

/// A key just made: the only time its plaintext exists outside the client that holds it.
#[derive(Clone)]
pub struct CreatedKey {
    /// `api_key.id`.
    pub id: i64,
    /// Owning tenant.
    pub tenant_id: i64,
    /// Workspace the key writes to.
    pub workspace_id: i64,
    /// The plaintext key: show it once, never store or log it.
    pub plaintext: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("id", &self.id)
            .field("tenant_id", &self.tenant_id)
            .field("workspace_id", &self.workspace_id)
            .finish_non_exhaustive()
    }
}

/// Prefix collisions are one in 62^8 per pair of keys; a few retries make them moot.
const KEY_ATTEMPTS: usize = 4;

/// Creates a write key for `workspace_id` with the `write` scope; only its hash is stored.
pub async fn create_key<C: GenericClient + Sync>(
    client: &C,
    workspace_id: i64,
    name: Option<&str>,
) -> Result<CreatedKey, SchemaError> {
    let tenant_id: i64 = client
        .query_opt(
            "SELECT tenant_id FROM workspace WHERE id = $1",
            &[&workspace_id],
        )
        .await
        .map_err(SchemaError::db("looking up the key's workspace"))?
        .ok_or_else(|| {
            SchemaError::NotFound(format!(
                "workspace {}",
                ids::encode(Kind::Workspace, workspace_id)
            ))
        })?
        .get(0);
    for _ in 0..KEY_ATTEMPTS {
        let key = apikey::generate();
        let result = client
            .query_one(
                "INSERT INTO api_key (tenant_id, workspace_id, name, prefix, hash)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[
                    &tenant_id,
                    &workspace_id,
                    &name,
                    &key.prefix,
                    &key.hash.as_slice(),
                ],
            )
            .await;
        match result {
            Ok(row) => {
                return Ok(CreatedKey {
                    id: row.get(0),
                    tenant_id,
                    workspace_id,
                    plaintext: key.plaintext,
                })
            }
            Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => continue,
            Err(err) => return Err(SchemaError::db("creating the key")(err)),
        }
    }
    Err(SchemaError::KeyPrefixExhausted(KEY_ATTEMPTS))
}

/// Revokes a key: the collector refuses it (403) once its key cache expires. Returns false
/// when it was revoked already (revoking is idempotent; the first time is kept).
pub async fn revoke_key<C: GenericClient + Sync>(
    client: &C,
    key_id: i64,
) -> Result<bool, SchemaError> {
    let row = client
        .query_opt(
            "UPDATE api_key SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
             RETURNING revoked_at = now()",
            &[&key_id],
        )
        .await
        .map_err(SchemaError::db("revoking the key"))?
        .ok_or_else(|| SchemaError::NotFound(format!("key {}", ids::encode(Kind::Key, key_id))))?;
    Ok(row.get(0))
}
