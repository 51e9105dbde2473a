//! What a lead row stores of PII after an identify: both ciphertexts under one key id, the
//! kept values re-sealed when a new value comes under another key. Pure: no database.

use sluice_schema::pii::{PiiKeys, Sealed};

use crate::decode::Rejection;

/// One PII value of a message (never logged).
#[derive(Clone)]
pub(super) enum PiiValue {
    /// From a version 1 message's traits: sealed here with the active key.
    Plain(String),
    /// Sealed by the collector.
    Sealed(Sealed),
}

/// The email and phone of an identify.
#[derive(Clone, Default)]
pub(super) struct Pii {
    pub email: Option<PiiValue>,
    pub phone: Option<PiiValue>,
}

/// A lead an identify matched, with what its update needs.
pub(super) struct LeadRow {
    pub id: i64,
    pub email: Option<Vec<u8>>,
    pub phone: Option<Vec<u8>>,
    pub key_id: Option<String>,
}

/// What step 1 found.
pub(super) enum Found {
    /// Identify: the matched lead, if any.
    Identify(Option<LeadRow>),
    /// Alias: the lead known by the user id or the previous id (id, its user id), if any.
    Alias(Option<(i64, Option<String>)>),
    /// An alias without both ids (refused by decode::validate already): nothing to do.
    Nothing,
}

impl Found {
    pub fn lead_id(&self) -> Option<i64> {
        match self {
            Found::Identify(Some(row)) => Some(row.id),
            Found::Alias(Some((id, _))) => Some(*id),
            _ => None,
        }
    }
}

/// What a lead row stores of PII after an identify: both ciphertexts under one key id.
#[derive(Default)]
pub(super) struct LeadPii {
    pub email: Option<Vec<u8>>,
    pub phone: Option<Vec<u8>>,
    pub key_id: Option<String>,
}

/// Why a message is refused when a lead's values cannot share one key id.
fn key_missing(key_id: &str) -> Rejection {
    Rejection::new(
        "pii_key_missing",
        format!(
            "the lead keeps a value sealed under PII key {key_id:?} and this identify brings one under another key; the writer needs both keys to re-seal the kept value (one key id covers a lead): add {key_id:?} to the writer's SLUICE_PII_KEYS and replay the DLQ"
        ),
    )
}

/// The ciphertexts and single key id a lead stores after an identify with `new` values, over
/// the lead `old` (none: a new lead).
///
/// - New values: the key of the first one (email, else phone) is the lead's; every other value,
///   new or kept, that is under another key is re-sealed under it. A kept value whose key this
///   writer lacks (or that does not open) refuses the message: relabelling its ciphertext
///   with the new key id would make it undecryptable for ever.
/// - No new value: the kept ones move to the writer's active key when all of them open,
///   else stay as they are, under their own key id.
pub(super) fn lead_pii(
    keys: Option<&PiiKeys>,
    new: &Pii,
    old: Option<&LeadRow>,
) -> Result<LeadPii, Rejection> {
    let old_key = old.and_then(|r| r.key_id.as_deref());
    let kept = |new: &Option<PiiValue>, old_ct: Option<&Vec<u8>>| match new {
        Some(_) => None,
        None => old_ct.cloned(),
    };
    let kept_email = kept(&new.email, old.and_then(|r| r.email.as_ref()));
    let kept_phone = kept(&new.phone, old.and_then(|r| r.phone.as_ref()));
    // Plaintext values (version 1) are sealed with the writer's active key.
    let seal = |v: &PiiValue| -> Result<Sealed, Rejection> {
        match v {
            PiiValue::Sealed(s) => Ok(s.clone()),
            PiiValue::Plain(p) => keys.map(|k| k.encrypt(p.as_bytes())).ok_or_else(|| {
                Rejection::new(
                    "pii_key_missing",
                    "identify carries a plaintext email or phone but the writer has no SLUICE_PII_KEYS; set them and replay the DLQ",
                )
            }),
        }
    };
    let new_email = new.email.as_ref().map(seal).transpose()?;
    let new_phone = new.phone.as_ref().map(seal).transpose()?;
    let Some(target) = new_email
        .as_ref()
        .or(new_phone.as_ref())
        .map(|s| s.key_id.clone())
    else {
        return Ok(kept_only(keys, old_key, kept_email, kept_phone));
    };
    // Brings one value under `target`: as it is when already there, else opened and sealed.
    let under_target = |ct: Vec<u8>, from: &str| -> Result<Vec<u8>, Rejection> {
        if from == target {
            return Ok(ct);
        }
        let keys = keys.ok_or_else(|| key_missing(from))?;
        let plain = keys.decrypt(from, &ct).map_err(|_| key_missing(from))?;
        keys.encrypt_with(&target, &plain)
            .map(|s| s.ciphertext)
            .map_err(|_| key_missing(&target))
    };
    // The new value, else the kept one, under `target`.
    let one = |new: Option<Sealed>, kept: Option<Vec<u8>>| match (new, kept) {
        (Some(s), _) => under_target(s.ciphertext, &s.key_id).map(Some),
        (None, Some(ct)) => under_target(ct, old_key.unwrap_or(&target)).map(Some),
        (None, None) => Ok(None),
    };
    Ok(LeadPii {
        email: one(new_email, kept_email)?,
        phone: one(new_phone, kept_phone)?,
        key_id: Some(target.clone()),
    })
}

/// What a lead keeps when an identify brings no new value: its values moved to the writer's
/// active key when all of them open, else exactly as they are, under their own key id.
fn kept_only(
    keys: Option<&PiiKeys>,
    old_key: Option<&str>,
    email: Option<Vec<u8>>,
    phone: Option<Vec<u8>>,
) -> LeadPii {
    if let (Some(keys), Some(old_key)) = (keys, old_key) {
        if old_key != keys.active_key_id() {
            let move_one = |ct: &Option<Vec<u8>>| -> Result<Option<Vec<u8>>, ()> {
                match ct {
                    Some(ct) => {
                        let plain = keys.decrypt(old_key, ct).map_err(|_| ())?;
                        Ok(Some(keys.encrypt(&plain).ciphertext))
                    }
                    None => Ok(None),
                }
            };
            if let (Ok(email), Ok(phone)) = (move_one(&email), move_one(&phone)) {
                return LeadPii {
                    email,
                    phone,
                    key_id: Some(keys.active_key_id().to_owned()),
                };
            }
        }
    }
    LeadPii {
        email,
        phone,
        key_id: old_key.map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of 32 bytes of 1 (`k1`) and of 2 (`k2`), as base64.
    fn keys(list: &[(&str, u8)], active: &str) -> PiiKeys {
        let text: Vec<String> = list
            .iter()
            .map(|(id, b)| {
                let b64 = match b {
                    1 => "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                    _ => "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
                };
                format!("{id}={b64}")
            })
            .collect();
        PiiKeys::from_env_strings(&text.join(","), active).unwrap()
    }

    fn lead(keys: &PiiKeys, email: &str, phone: &str) -> LeadRow {
        LeadRow {
            id: 1,
            email: Some(keys.encrypt(email.as_bytes()).ciphertext),
            phone: Some(keys.encrypt(phone.as_bytes()).ciphertext),
            key_id: Some(keys.active_key_id().to_owned()),
        }
    }

    fn sealed_phone(keys: &PiiKeys, phone: &str) -> Pii {
        Pii {
            email: None,
            phone: Some(PiiValue::Sealed(keys.encrypt(phone.as_bytes()))),
        }
    }

    fn open(keys: &PiiKeys, pii: &LeadPii, ct: &Option<Vec<u8>>) -> String {
        let key = pii.key_id.as_deref().unwrap();
        String::from_utf8(keys.decrypt(key, ct.as_ref().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn a_kept_value_is_resealed_under_the_new_values_key() {
        let old = keys(&[("k1", 1)], "k1");
        let row = lead(&old, "ada@example.com", "+441");
        // The collector seals under k2; the writer knows both keys.
        let collector = keys(&[("k1", 1), ("k2", 2)], "k2");
        let writer = keys(&[("k1", 1), ("k2", 2)], "k1");
        let pii = lead_pii(Some(&writer), &sealed_phone(&collector, "+442"), Some(&row)).unwrap();
        assert_eq!(pii.key_id.as_deref(), Some("k2"));
        assert_eq!(open(&writer, &pii, &pii.email), "ada@example.com");
        assert_eq!(open(&writer, &pii, &pii.phone), "+442");
    }

    #[test]
    fn a_kept_value_whose_key_is_missing_refuses_instead_of_relabelling() {
        let old = keys(&[("k1", 1)], "k1");
        let row = lead(&old, "ada@example.com", "+441");
        let collector = keys(&[("k1", 1), ("k2", 2)], "k2");
        // Writer lost k1: relabelling the kept email as k2 would orphan it.
        let writer = keys(&[("k2", 2)], "k2");
        let refused = lead_pii(Some(&writer), &sealed_phone(&collector, "+442"), Some(&row))
            .err()
            .unwrap();
        assert_eq!(refused.reason, "pii_key_missing");
        assert!(refused.detail.contains("k1"), "{}", refused.detail);
        // No keys at all: refused the same way.
        assert!(lead_pii(None, &sealed_phone(&collector, "+442"), Some(&row)).is_err());
        // The same key, or both values new: nothing to re-seal, stored as they came.
        let same = lead_pii(None, &sealed_phone(&old, "+443"), Some(&row)).unwrap();
        assert_eq!(same.key_id.as_deref(), Some("k1"));
        assert_eq!(same.email, row.email);
        let both = Pii {
            email: Some(PiiValue::Sealed(collector.encrypt(b"new@example.com"))),
            phone: Some(PiiValue::Sealed(collector.encrypt(b"+444"))),
        };
        let both = lead_pii(None, &both, Some(&row)).unwrap();
        assert_eq!(both.key_id.as_deref(), Some("k2"));
        assert_eq!(open(&collector, &both, &both.email), "new@example.com");
    }

    #[test]
    fn without_new_values_the_lead_moves_to_the_active_key_only_when_all_open() {
        let old = keys(&[("k1", 1)], "k1");
        let row = lead(&old, "ada@example.com", "+441");
        let writer = keys(&[("k1", 1), ("k2", 2)], "k2");
        let moved = lead_pii(Some(&writer), &Pii::default(), Some(&row)).unwrap();
        assert_eq!(moved.key_id.as_deref(), Some("k2"));
        assert_eq!(open(&writer, &moved, &moved.phone), "+441");
        // k1 unknown: left exactly as it was, under its own id.
        let lost = keys(&[("k2", 2)], "k2");
        let kept = lead_pii(Some(&lost), &Pii::default(), Some(&row)).unwrap();
        assert_eq!(kept.key_id.as_deref(), Some("k1"));
        assert_eq!((kept.email, kept.phone), (row.email, row.phone));
    }

    #[test]
    fn plaintext_values_of_version_1_are_sealed_with_the_writers_active_key() {
        let writer = keys(&[("k1", 1), ("k2", 2)], "k2");
        let pii = Pii {
            email: Some(PiiValue::Plain("ada@example.com".into())),
            phone: None,
        };
        let new = lead_pii(Some(&writer), &pii, None).unwrap();
        assert_eq!(new.key_id.as_deref(), Some("k2"));
        assert_eq!(open(&writer, &new, &new.email), "ada@example.com");
        assert!(new.phone.is_none());
        assert!(lead_pii(None, &pii, None).is_err());
    }
}
