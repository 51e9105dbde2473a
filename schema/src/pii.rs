//! PII at rest: email and phone of a lead are stored only as AES-256-GCM ciphertext (with the
//! id of the key that sealed them) and as HMAC-SHA256 fingerprints of their normalised form,
//! which is what matching uses. Plaintext never reaches PostgreSQL or the logs: [`PiiKeys`]
//! prints no key material, and nothing here logs values.
//!
//! Keys come from `SLUICE_PII_KEYS` (`id=base64,id=base64`, each 32 random bytes, e.g.
//! `openssl rand -base64 32`) and `SLUICE_PII_ACTIVE_KEY` (the id new values are sealed
//! with). Rotation: add a new key, make it active; rows sealed under the old id still
//! decrypt as long as that id stays listed.
//!
//! Fingerprints must not change when the active key does, or matching would break at every
//! rotation. Their key is therefore derived from the FIRST key listed in `SLUICE_PII_KEYS`
//! (the "root"), whichever key is active: keep the first entry listed for as long as stored
//! fingerprints are in use.

use std::collections::HashMap;
use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::SchemaError;

/// The identify trait holding a person's email: sealed and fingerprinted into `lead`.
pub const EMAIL_TRAIT: &str = "email";
/// The identify trait holding a person's phone: sealed and fingerprinted into `lead`.
pub const PHONE_TRAIT: &str = "phone";
/// The traits that are personal data whatever `SLUICE_PII_TRAITS` says (the lead's sealed,
/// fingerprinted columns): the collector seals them on identifies and drops them from
/// events; the writer takes them out of traits.
pub const SEALED_TRAITS: [&str; 2] = [EMAIL_TRAIT, PHONE_TRAIT];

/// The key of the object that replaces a personal trait other than email and phone (see
/// [`PiiKeys::sealed_envelope`]).
pub const SEALED_ENVELOPE: &str = "$sealed";

/// Bytes of the random nonce stored in front of each ciphertext.
pub const NONCE_LEN: usize = 12;
/// Bytes of the authentication tag at the end of each ciphertext.
pub const TAG_LEN: usize = 16;

/// A sealed value: what goes into `lead.{email,phone}_ciphertext` and `lead.pii_key_id`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the key that sealed it.
    pub key_id: String,
    /// `nonce (12 bytes) || ciphertext || tag (16 bytes)`.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// The PII keys of a process: every key that may have sealed stored data, the active one
/// for new data, and the derived fingerprint key.
#[derive(Clone)]
pub struct PiiKeys {
    ciphers: HashMap<String, Aes256Gcm>,
    active: String,
    fingerprint_key: [u8; 32],
}

impl fmt::Debug for PiiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.ciphers.keys().collect();
        ids.sort();
        f.debug_struct("PiiKeys")
            .field("key_ids", &ids)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

const HOW_TO_SET: &str = "set SLUICE_PII_KEYS to id=<base64 of 32 random bytes>[,id=...] \
                          (make one with `openssl rand -base64 32`) and SLUICE_PII_ACTIVE_KEY to one of the ids";

impl PiiKeys {
    /// Reads keys as given in `SLUICE_PII_KEYS` and `SLUICE_PII_ACTIVE_KEY`.
    pub fn from_env_strings(keys: &str, active: &str) -> Result<PiiKeys, SchemaError> {
        let config = |msg: String| SchemaError::PiiConfig(format!("{msg}; {HOW_TO_SET}"));
        let mut ciphers = HashMap::new();
        let mut root: Option<[u8; 32]> = None;
        for entry in keys.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, b64) = entry
                .split_once('=')
                .ok_or_else(|| config("an entry of SLUICE_PII_KEYS has no `=`".into()))?;
            let id = id.trim();
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(config(format!(
                    "key id {id:?} must be letters, digits, - or _"
                )));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| config(format!("key {id} is not valid base64")))?;
            let key: [u8; 32] = bytes
                .try_into()
                .map_err(|b: Vec<u8>| config(format!("key {id} is {} bytes, not 32", b.len())))?;
            if ciphers
                .insert(id.to_owned(), Aes256Gcm::new(&key.into()))
                .is_some()
            {
                return Err(config(format!("key id {id} is listed twice")));
            }
            root.get_or_insert(key);
        }
        let root = root.ok_or_else(|| config("SLUICE_PII_KEYS is empty".into()))?;
        let active = active.trim();
        if !ciphers.contains_key(active) {
            return Err(config(format!(
                "active key {active:?} is not among SLUICE_PII_KEYS"
            )));
        }
        Ok(PiiKeys {
            ciphers,
            active: active.to_owned(),
            fingerprint_key: derive(&root, b"sluice pii fingerprint v1"),
        })
    }

    /// Reads `SLUICE_PII_KEYS` and `SLUICE_PII_ACTIVE_KEY` from the environment.
    pub fn from_env() -> Result<PiiKeys, SchemaError> {
        let get = |name: &str| {
            std::env::var(name)
                .map_err(|_| SchemaError::PiiConfig(format!("{name} is not set; {HOW_TO_SET}")))
        };
        PiiKeys::from_env_strings(&get("SLUICE_PII_KEYS")?, &get("SLUICE_PII_ACTIVE_KEY")?)
    }

    /// Id of the key new values are sealed with.
    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    /// Seals `plaintext` under the active key with a fresh random nonce.
    pub fn encrypt(&self, plaintext: &[u8]) -> Sealed {
        // The active id was checked to be present when the keys were read; AES-GCM refuses
        // only plaintexts over 64 GiB, and PII values are bounded far below that by the
        // collector's 32 KB message limit.
        #[allow(clippy::expect_used)]
        let sealed = self
            .encrypt_with(&self.active, plaintext)
            .expect("the active key is configured");
        sealed
    }

    /// Seals the personal data of an identify's `traits` in place, as the collector does
    /// before producing it (`IdentityMessage` version 2): `email` and `phone` are taken out
    /// and returned sealed with their fingerprints (a string, or a number as its text; any
    /// other value of those names is dropped, as the writer always did), and every other
    /// trait named in `others` is replaced by [`sealed_envelope`]. Nothing is logged.
    pub fn seal_identity_traits(
        &self,
        traits: &mut serde_json::Map<String, serde_json::Value>,
        others: &[String],
    ) -> Option<crate::messages::SealedPii> {
        use crate::messages::{SealedField, SealedPii};
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut take = |name: &str| -> Option<String> {
            match traits.remove(name)? {
                serde_json::Value::String(s) if !s.trim().is_empty() => Some(s),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let (email, phone) = (take(EMAIL_TRAIT), take(PHONE_TRAIT));
        for name in others {
            if let Some(value) = traits.get_mut(name.as_str()) {
                if !value.is_null() {
                    *value = self.sealed_envelope(value);
                }
            }
        }
        if email.is_none() && phone.is_none() {
            return None;
        }
        let field = |plain: String, fingerprint: Option<[u8; 32]>| SealedField {
            ciphertext: b64(&self.encrypt(plain.as_bytes()).ciphertext),
            fingerprint: fingerprint.map(|f| b64(&f)),
        };
        Some(SealedPii {
            key_id: self.active.clone(),
            email: email.map(|e| {
                let fp = self.fingerprint_email(&e);
                field(e, fp)
            }),
            phone: phone.map(|p| {
                let fp = self.fingerprint_phone(&p);
                field(p, fp)
            }),
        })
    }

    /// `value` (any JSON) sealed under the active key, as the JSON that takes its place:
    /// `{"$sealed": {"key_id": "k2", "ciphertext": "<base64 of nonce || ciphertext || tag>"}}`;
    /// the plaintext is the value's JSON text. [`PiiKeys::open_envelope`] reverses it.
    pub fn sealed_envelope(&self, value: &serde_json::Value) -> serde_json::Value {
        let sealed = self.encrypt(value.to_string().as_bytes());
        serde_json::json!({ SEALED_ENVELOPE: {
            "key_id": sealed.key_id,
            "ciphertext": base64::engine::general_purpose::STANDARD.encode(&sealed.ciphertext),
        }})
    }

    /// The value inside a [`PiiKeys::sealed_envelope`], or an error saying why not.
    pub fn open_envelope(
        &self,
        envelope: &serde_json::Value,
    ) -> Result<serde_json::Value, SchemaError> {
        let inner = envelope.get(SEALED_ENVELOPE);
        let field = |name: &str| inner.and_then(|i| i.get(name)).and_then(|v| v.as_str());
        let (Some(key_id), Some(ct)) = (field("key_id"), field("ciphertext")) else {
            return Err(SchemaError::PiiDecrypt(format!(
                "not a sealed value (an object with {SEALED_ENVELOPE}.key_id and .ciphertext)"
            )));
        };
        let ct = base64::engine::general_purpose::STANDARD
            .decode(ct)
            .map_err(|_| {
                SchemaError::PiiDecrypt("the sealed value's ciphertext is not base64".into())
            })?;
        let plain = self.decrypt(key_id, &ct)?;
        serde_json::from_slice(&plain)
            .map_err(|_| SchemaError::PiiDecrypt("the sealed value is not JSON once opened".into()))
    }

    /// True when `key_id` is one of the configured keys.
    pub fn has_key(&self, key_id: &str) -> bool {
        self.ciphers.contains_key(key_id)
    }

    /// Seals `plaintext` under `key_id` (which must be configured) instead of the active key:
    /// re-sealing a lead's untouched value under the key of a value sealed elsewhere (the
    /// collector), so one key id covers the lead's ciphertexts.
    pub fn encrypt_with(&self, key_id: &str, plaintext: &[u8]) -> Result<Sealed, SchemaError> {
        let cipher = self.ciphers.get(key_id).ok_or_else(|| {
            SchemaError::PiiConfig(format!(
                "cannot seal under key {key_id:?}, which is not in SLUICE_PII_KEYS: list it there (the collectors seal with it)"
            ))
        })?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // As in `encrypt`: only plaintexts over 64 GiB are refused.
        #[allow(clippy::expect_used)]
        let sealed = cipher
            .encrypt(&nonce, plaintext)
            .expect("AES-GCM plaintext under 64 GiB");
        let mut ciphertext = Vec::with_capacity(NONCE_LEN + sealed.len());
        ciphertext.extend_from_slice(&nonce);
        ciphertext.extend_from_slice(&sealed);
        Ok(Sealed {
            key_id: key_id.to_owned(),
            ciphertext,
        })
    }

    /// Opens a value sealed under `key_id` (active or retired).
    pub fn decrypt(&self, key_id: &str, ciphertext: &[u8]) -> Result<Vec<u8>, SchemaError> {
        let cipher = self.ciphers.get(key_id).ok_or_else(|| {
            SchemaError::PiiConfig(format!(
                "data was sealed with key {key_id:?}, which is not in SLUICE_PII_KEYS: add that retired key back to the list"
            ))
        })?;
        if ciphertext.len() < NONCE_LEN + TAG_LEN {
            return Err(SchemaError::PiiDecrypt(format!(
                "ciphertext is {} bytes, shorter than nonce and tag",
                ciphertext.len()
            )));
        }
        let (nonce, body) = ciphertext.split_at(NONCE_LEN);
        cipher.decrypt(Nonce::from_slice(nonce), body).map_err(|_| {
            SchemaError::PiiDecrypt(format!(
                "authentication failed under key {key_id:?}: the ciphertext was altered or the key's bytes are wrong"
            ))
        })
    }

    /// Fingerprint of an email address (trimmed, lowercased), or `None` when `raw` is not
    /// shaped like one.
    pub fn fingerprint_email(&self, raw: &str) -> Option<[u8; 32]> {
        normalize_email(raw).map(|e| self.fingerprint(b"email", &e))
    }

    /// Fingerprint of a phone number in E.164 form, or `None` when `raw` is not one.
    pub fn fingerprint_phone(&self, raw: &str) -> Option<[u8; 32]> {
        normalize_phone(raw).map(|p| self.fingerprint(b"phone", &p))
    }

    fn fingerprint(&self, domain: &[u8], value: &str) -> [u8; 32] {
        // The domain keeps an email and a phone with the same text from sharing a fingerprint.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.fingerprint_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(domain);
        mac.update(b":");
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// An email address trimmed and lowercased, or `None` unless it has one `@` with text on
/// both sides and no whitespace.
pub fn normalize_email(raw: &str) -> Option<String> {
    let email = raw.trim().to_lowercase();
    let (local, domain) = email.split_once('@')?;
    if local.is_empty()
        || domain.is_empty()
        || domain.contains('@')
        || email.chars().any(char::is_whitespace)
    {
        return None;
    }
    Some(email)
}

/// A phone number in E.164 form (`+` and 8 to 15 digits), or `None`. Spaces, dots, dashes
/// and brackets are dropped; a leading `00` is the international prefix. A number without
/// `+` or `00` is taken to include its country code already (sluice cannot guess a country).
pub fn normalize_phone(raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    if trimmed
        .chars()
        .any(|c| !(c.is_ascii_digit() || " .-()/+".contains(c)))
        || trimmed.rfind('+').is_some_and(|i| i != 0)
    {
        return None;
    }
    let mut digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    if !trimmed.starts_with('+') {
        if let Some(rest) = digits.strip_prefix("00") {
            digits = rest.to_owned();
        }
    }
    if !(8..=15).contains(&digits.len()) || digits.starts_with('0') {
        return None;
    }
    Some(format!("+{digits}"))
}

fn derive(root: &[u8; 32], label: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(root)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(label);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn round_trip_and_rotation() {
        let old = PiiKeys::from_env_strings(&format!("k1={}", b64(1)), "k1").unwrap();
        let sealed = old.encrypt(b"ada@example.com");
        assert_eq!(sealed.key_id, "k1");
        assert_eq!(sealed.ciphertext.len(), NONCE_LEN + 15 + TAG_LEN);
        assert!(!sealed.ciphertext.windows(3).any(|w| w == b"ada"));
        // Same plaintext twice: different nonces, different ciphertexts.
        assert_ne!(
            old.encrypt(b"ada@example.com").ciphertext,
            sealed.ciphertext
        );

        let rotated =
            PiiKeys::from_env_strings(&format!("k1={}, k2={}", b64(1), b64(2)), "k2").unwrap();
        assert_eq!(
            rotated.decrypt("k1", &sealed.ciphertext).unwrap(),
            b"ada@example.com"
        );
        let new = rotated.encrypt(b"x");
        assert_eq!(new.key_id, "k2");
        assert!(old.decrypt("k2", &new.ciphertext).is_err());
        // Fingerprints survive the rotation.
        assert_eq!(
            old.fingerprint_email("Ada@Example.com "),
            rotated.fingerprint_email("ada@example.com")
        );
    }

    #[test]
    fn identity_traits_are_sealed_with_fingerprints_and_envelopes() {
        let keys =
            PiiKeys::from_env_strings(&format!("k1={},k2={}", b64(1), b64(2)), "k2").unwrap();
        let mut traits = serde_json::json!({
            "email": "Ada@Example.com", "phone": 4155550100u64, "plan": "pro",
            "name": "Ada Lovelace", "address": {"city": "London"}, "nickname": null,
        })
        .as_object()
        .cloned()
        .unwrap();
        let others = vec![
            "name".to_owned(),
            "address".to_owned(),
            "nickname".to_owned(),
        ];
        let sealed = keys.seal_identity_traits(&mut traits, &others).unwrap();
        let text = serde_json::to_string(&(&traits, &sealed)).unwrap();
        for needle in ["Ada", "ada@", "London", "4155550100"] {
            assert!(!text.contains(needle), "{needle} in {text}");
        }
        assert_eq!(sealed.key_id, "k2");
        assert_eq!(traits["plan"], "pro");
        assert!(traits["nickname"].is_null());
        let open = |f: &crate::messages::SealedField| {
            let ct = base64::engine::general_purpose::STANDARD
                .decode(&f.ciphertext)
                .unwrap();
            String::from_utf8(keys.decrypt("k2", &ct).unwrap()).unwrap()
        };
        let email = sealed.email.as_ref().unwrap();
        assert_eq!(open(email), "Ada@Example.com");
        assert_eq!(
            email.fingerprint.as_deref().unwrap(),
            base64::engine::general_purpose::STANDARD
                .encode(keys.fingerprint_email("ada@example.com").unwrap())
        );
        assert_eq!(open(sealed.phone.as_ref().unwrap()), "4155550100");
        assert_eq!(keys.open_envelope(&traits["name"]).unwrap(), "Ada Lovelace");
        assert_eq!(
            keys.open_envelope(&traits["address"]).unwrap(),
            serde_json::json!({"city": "London"})
        );
        // Nothing personal: nothing sealed, the other traits untouched.
        let mut plain = serde_json::json!({"plan": "pro"})
            .as_object()
            .cloned()
            .unwrap();
        assert!(keys.seal_identity_traits(&mut plain, &others).is_none());
        assert_eq!(plain["plan"], "pro");
    }

    #[test]
    fn tampering_and_wrong_keys_are_refused() {
        let keys = PiiKeys::from_env_strings(&format!("a={},b={}", b64(1), b64(2)), "a").unwrap();
        let mut sealed = keys.encrypt(b"+14155550100");
        assert!(keys.decrypt("b", &sealed.ciphertext).is_err());
        assert!(keys.decrypt("c", &sealed.ciphertext).is_err());
        assert!(keys.decrypt("a", &sealed.ciphertext[..20]).is_err());
        let last = sealed.ciphertext.len() - 1;
        sealed.ciphertext[last] ^= 1;
        assert!(matches!(
            keys.decrypt("a", &sealed.ciphertext),
            Err(SchemaError::PiiDecrypt(_))
        ));
    }

    #[test]
    fn bad_configuration_says_what_to_set() {
        for (keys, active) in [
            ("", "k1"),
            ("k1", "k1"),
            ("k1=notbase64!", "k1"),
            (
                &*format!(
                    "k1={}",
                    base64::engine::general_purpose::STANDARD.encode([0u8; 16])
                ),
                "k1",
            ),
            (&*format!("k1={}", b64(1)), "k2"),
            (&*format!("k1={0},k1={0}", b64(1)), "k1"),
        ] {
            let err = PiiKeys::from_env_strings(keys, active)
                .unwrap_err()
                .to_string();
            assert!(err.contains("SLUICE_PII_KEYS"), "{err}");
        }
        let keys = PiiKeys::from_env_strings(&format!("k1={}", b64(9)), "k1").unwrap();
        assert!(!format!("{keys:?}").contains(&b64(9)));
    }

    #[test]
    fn normalisation() {
        assert_eq!(
            normalize_email("  Ada.Lovelace@Example.COM "),
            Some("ada.lovelace@example.com".into())
        );
        assert_eq!(normalize_email("no-at-sign"), None);
        assert_eq!(normalize_email("a@b@c"), None);
        assert_eq!(normalize_email("a b@c.d"), None);
        assert_eq!(
            normalize_phone("+1 (415) 555-0100"),
            Some("+14155550100".into())
        );
        assert_eq!(
            normalize_phone("0044 20 7946 0958"),
            Some("+442079460958".into())
        );
        assert_eq!(
            normalize_phone("44.20.7946.0958"),
            Some("+442079460958".into())
        );
        assert_eq!(normalize_phone("12345"), None);
        assert_eq!(normalize_phone("+1 415 555 0100 ext 2"), None);
        assert_eq!(normalize_phone("1+4155550100"), None);
        let keys = PiiKeys::from_env_strings(&format!("k={}", b64(3)), "k").unwrap();
        assert_eq!(
            keys.fingerprint_phone("+1 415-555-0100"),
            keys.fingerprint_phone("001 4155550100")
        );
        assert_ne!(
            keys.fingerprint_phone("+14155550100"),
            keys.fingerprint_phone("+14155550101")
        );
        assert_eq!(keys.fingerprint_email("x"), None);
    }
}
