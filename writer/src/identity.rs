//! Identify and alias calls -> `lead` (email and phone sealed with the active PII key,
//! matched by HMAC fingerprint) and `identity_link` (anonymous id -> lead).
//!
//! Identity messages are rare next to events, so each is applied with a few statements in
//! order, inside the batch's transaction; order matters here (a later identify updates what an
//! earlier one created).

use serde_json::Value;
use sluice_schema::messages::{IdentityKind, IdentityMessage, JsonObject};
use sluice_schema::pii::PiiKeys;
use tokio_postgres::Transaction;

use crate::decode::Rejection;

/// Rows touched by applying identity messages, for the per-table metrics.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Applied {
    /// Leads inserted or updated.
    pub leads: u64,
    /// Links inserted or updated.
    pub links: u64,
}

/// Plaintext PII taken out of an identify's traits (never logged).
struct Pii {
    email: Option<String>,
    phone: Option<String>,
}

/// Splits `email` and `phone` out of traits: they are stored only encrypted.
fn take_pii(traits: &JsonObject) -> (Pii, JsonObject) {
    let mut rest = traits.clone();
    let mut take = |k: &str| match rest.remove(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let email = take("email");
    let phone = take("phone");
    (Pii { email, phone }, rest)
}

/// Checked before the transaction: an identify carrying PII cannot be stored without keys.
pub(crate) fn precheck(msg: &IdentityMessage, keys: Option<&PiiKeys>) -> Result<(), Rejection> {
    if keys.is_none() && msg.kind == IdentityKind::Identify {
        let (pii, _) = take_pii(&msg.traits);
        if pii.email.is_some() || pii.phone.is_some() {
            return Err(Rejection::new(
                "pii_key_missing",
                "identify carries email or phone but the writer has no SLUICE_PII_KEYS; set them and replay the DLQ",
            ));
        }
    }
    Ok(())
}

/// Applies identity messages in order.
pub(crate) async fn apply(
    tx: &Transaction<'_>,
    msgs: &[&IdentityMessage],
    keys: Option<&PiiKeys>,
) -> Result<Applied, tokio_postgres::Error> {
    let mut applied = Applied::default();
    for m in msgs {
        match m.kind {
            IdentityKind::Identify => identify(tx, m, keys, &mut applied).await?,
            IdentityKind::Alias => alias(tx, m, &mut applied).await?,
        }
    }
    Ok(applied)
}

/// Seals a value with the active key, if there is one.
fn seal(keys: Option<&PiiKeys>, plain: Option<&str>) -> Option<(String, Vec<u8>)> {
    let (keys, plain) = (keys?, plain?);
    let sealed = keys.encrypt(plain.as_bytes());
    Some((sealed.key_id, sealed.ciphertext))
}

async fn identify(
    tx: &Transaction<'_>,
    m: &IdentityMessage,
    keys: Option<&PiiKeys>,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
    let (pii, traits) = take_pii(&m.traits);
    let email_fp: Option<Vec<u8>> = keys
        .zip(pii.email.as_deref())
        .and_then(|(k, e)| k.fingerprint_email(e))
        .map(|f| f.to_vec());
    let phone_fp: Option<Vec<u8>> = keys
        .zip(pii.phone.as_deref())
        .and_then(|(k, p)| k.fingerprint_phone(p))
        .map(|f| f.to_vec());
    let traits = Value::Object(traits);
    // The best match: same user id, then same email, then same phone, then the lead this
    // anonymous id is already linked to.
    let found = tx
        .query_opt(
            "SELECT id, email_ciphertext, phone_ciphertext, pii_key_id FROM lead \
             WHERE tenant_id = $1 AND (user_id = $2 OR email_fingerprint = $3 \
               OR phone_fingerprint = $4 \
               OR id IN (SELECT lead_id FROM identity_link WHERE tenant_id = $1 AND anonymous_id = $5)) \
             ORDER BY (user_id = $2) DESC NULLS LAST, (email_fingerprint = $3) DESC NULLS LAST, \
               (phone_fingerprint = $4) DESC NULLS LAST, id \
             LIMIT 1",
            &[&m.tenant_id, &m.user_id, &email_fp, &phone_fp, &m.anonymous_id],
        )
        .await?;
    let lead_id: i64 = match found {
        Some(row) => {
            let id: i64 = row.get(0);
            let old_email: Option<Vec<u8>> = row.get(1);
            let old_phone: Option<Vec<u8>> = row.get(2);
            let old_key: Option<String> = row.get(3);
            // One key id covers both ciphertexts: whatever is not replaced is re-sealed under
            // the active key when the lead's key is an older one.
            let email = reseal(keys, pii.email.as_deref(), old_email, old_key.as_deref());
            let phone = reseal(keys, pii.phone.as_deref(), old_phone, old_key.as_deref());
            let key_id = email
                .as_ref()
                .or(phone.as_ref())
                .map(|(k, _)| k.clone())
                .or(old_key);
            let email_ct = email.map(|(_, c)| c);
            let phone_ct = phone.map(|(_, c)| c);
            // A fingerprint owned by another lead stays there (unique per tenant): this call
            // is attached to the best match and does not steal it.
            tx.execute(
                "UPDATE lead SET user_id = coalesce(user_id, $3), traits = traits || $4, \
                   email_ciphertext = $5, phone_ciphertext = $6, pii_key_id = $7, \
                   email_fingerprint = CASE WHEN $8::bytea IS NULL OR EXISTS (SELECT 1 FROM lead o \
                     WHERE o.tenant_id = $1 AND o.email_fingerprint = $8 AND o.id <> $2) \
                     THEN email_fingerprint ELSE $8 END, \
                   phone_fingerprint = CASE WHEN $9::bytea IS NULL OR EXISTS (SELECT 1 FROM lead o \
                     WHERE o.tenant_id = $1 AND o.phone_fingerprint = $9 AND o.id <> $2) \
                     THEN phone_fingerprint ELSE $9 END, \
                   updated_at = now() \
                 WHERE tenant_id = $1 AND id = $2",
                &[
                    &m.tenant_id,
                    &id,
                    &m.user_id,
                    &traits,
                    &email_ct,
                    &phone_ct,
                    &key_id,
                    &email_fp,
                    &phone_fp,
                ],
            )
            .await?;
            id
        }
        None => {
            let email = seal(keys, pii.email.as_deref());
            let phone = seal(keys, pii.phone.as_deref());
            let key_id = email.as_ref().or(phone.as_ref()).map(|(k, _)| k.clone());
            let row = tx
                .query_one(
                    "INSERT INTO lead (tenant_id, workspace_id, user_id, email_ciphertext, \
                       phone_ciphertext, pii_key_id, email_fingerprint, phone_fingerprint, traits) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                    &[
                        &m.tenant_id,
                        &m.workspace_id,
                        &m.user_id,
                        &email.map(|(_, c)| c),
                        &phone.map(|(_, c)| c),
                        &key_id,
                        &email_fp,
                        &phone_fp,
                        &traits,
                    ],
                )
                .await?;
            row.get(0)
        }
    };
    applied.leads += 1;
    if let Some(anon) = m.anonymous_id.as_deref().filter(|a| !a.is_empty()) {
        link(tx, m, anon, lead_id, "identify").await?;
        applied.links += 1;
    }
    Ok(())
}

/// The ciphertext to store for one PII field: the new value sealed, or the old one kept (and
/// re-sealed under the active key when it was sealed under another).
fn reseal(
    keys: Option<&PiiKeys>,
    new_plain: Option<&str>,
    old: Option<Vec<u8>>,
    old_key: Option<&str>,
) -> Option<(String, Vec<u8>)> {
    if new_plain.is_some() {
        return seal(keys, new_plain);
    }
    let (old, old_key) = (old?, old_key?);
    match keys {
        Some(keys) => match keys.decrypt(old_key, &old) {
            Ok(plain) => {
                let sealed = keys.encrypt(&plain);
                Some((sealed.key_id, sealed.ciphertext))
            }
            // Unknown old key: keep the ciphertext under its own id (decryptable once the key
            // is configured again) rather than losing it.
            Err(_) => Some((old_key.to_owned(), old)),
        },
        None => Some((old_key.to_owned(), old)),
    }
}

async fn alias(
    tx: &Transaction<'_>,
    m: &IdentityMessage,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
    let (Some(user_id), Some(previous)) = (m.user_id.as_deref(), m.previous_id.as_deref()) else {
        return Ok(()); // refused by decode::validate already
    };
    let found = tx
        .query_opt(
            "SELECT id, user_id FROM lead WHERE tenant_id = $1 AND user_id IN ($2, $3) \
             ORDER BY (user_id = $2) DESC LIMIT 1",
            &[&m.tenant_id, &user_id, &previous],
        )
        .await?;
    let lead_id: i64 = match found {
        Some(row) => {
            let id: i64 = row.get(0);
            let current: Option<String> = row.get(1);
            if current.as_deref() != Some(user_id) {
                // The previous id was the lead's user id: it is now known by the new one.
                tx.execute(
                    "UPDATE lead SET user_id = $3, updated_at = now() WHERE tenant_id = $1 AND id = $2",
                    &[&m.tenant_id, &id, &user_id],
                )
                .await?;
            }
            id
        }
        None => {
            let row = tx
                .query_one(
                    "INSERT INTO lead (tenant_id, workspace_id, user_id) VALUES ($1, $2, $3) RETURNING id",
                    &[&m.tenant_id, &m.workspace_id, &user_id],
                )
                .await?;
            row.get(0)
        }
    };
    applied.leads += 1;
    link(tx, m, previous, lead_id, "alias").await?;
    applied.links += 1;
    Ok(())
}

async fn link(
    tx: &Transaction<'_>,
    m: &IdentityMessage,
    anonymous_id: &str,
    lead_id: i64,
    kind: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO identity_link AS l (tenant_id, anonymous_id, lead_id, kind, first_seen_at, last_seen_at) \
         VALUES ($1, $2, $3, $4, $5, $5) \
         ON CONFLICT (tenant_id, anonymous_id, lead_id) DO UPDATE SET \
           first_seen_at = least(l.first_seen_at, excluded.first_seen_at), \
           last_seen_at = greatest(l.last_seen_at, excluded.last_seen_at)",
        &[&m.tenant_id, &anonymous_id, &lead_id, &kind, &m.occurred_at],
    )
    .await?;
    // The visitor row may not exist yet (its topic is consumed independently); when it does,
    // it points at its lead.
    tx.execute(
        "UPDATE visitor SET lead_id = $3 WHERE tenant_id = $1 AND anonymous_id = $2 \
         AND lead_id IS DISTINCT FROM $3",
        &[&m.tenant_id, &anonymous_id, &lead_id],
    )
    .await?;
    Ok(())
}
