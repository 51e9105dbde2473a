//! Write keys: how they look, how they are stored, and how a presented key is checked.
//!
//! A key is `sk_` followed by an 8-character lookup prefix and a 32-character secret, all
//! base62: `sk_AbC123xy…`. The database keeps only the prefix (to find the row in one index
//! probe) and the SHA-256 of the whole key; a presented key is checked by hashing it and
//! comparing hashes in constant time, so neither the key nor its timing leaks.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every key starts with, so a leaked key is recognisable by secret scanners.
pub const KEY_MARKER: &str = "sk_";
/// Length of the lookup prefix that follows the marker.
pub const PREFIX_LEN: usize = 8;
/// Length of the secret that follows the prefix.
pub const SECRET_LEN: usize = 32;
/// Total length of a well-formed key.
pub const KEY_LEN: usize = KEY_MARKER.len() + PREFIX_LEN + SECRET_LEN;

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A freshly made key: the plaintext (shown once, never stored) and what is stored.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The plaintext key, to hand to the user once.
    pub plaintext: String,
    /// The lookup prefix, stored in `api_key.prefix`.
    pub prefix: String,
    /// SHA-256 of the plaintext, stored in `api_key.hash`.
    pub hash: [u8; 32],
}

/// Makes a new random key from the operating system's CSPRNG.
pub fn generate() -> NewKey {
    let mut rng = rand::rng();
    let body: String = (0..PREFIX_LEN + SECRET_LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    let plaintext = format!("{KEY_MARKER}{body}");
    let prefix = body[..PREFIX_LEN].to_owned();
    let hash = hash(&plaintext);
    NewKey {
        plaintext,
        prefix,
        hash,
    }
}

/// The lookup prefix of a presented key, or `None` when it is not of the key's form (such a
/// key is refused without a database look-up).
pub fn prefix_of(presented: &str) -> Option<&str> {
    let body = presented.strip_prefix(KEY_MARKER)?;
    if presented.len() != KEY_LEN || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(&body[..PREFIX_LEN])
}

/// SHA-256 of a key, as stored in `api_key.hash`.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// True when `presented` hashes to `stored`, compared in constant time.
pub fn verify(presented: &str, stored: &[u8]) -> bool {
    hash(presented).ct_eq(stored).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_verify_and_have_their_prefix() {
        let key = generate();
        assert_eq!(key.plaintext.len(), KEY_LEN);
        assert_eq!(prefix_of(&key.plaintext), Some(key.prefix.as_str()));
        assert!(verify(&key.plaintext, &key.hash));
        assert_ne!(generate().plaintext, key.plaintext);
    }

    #[test]
    fn a_changed_key_does_not_verify() {
        let key = generate();
        let mut other = key.plaintext.clone().into_bytes();
        let last = other.len() - 1;
        other[last] = if other[last] == b'a' { b'b' } else { b'a' };
        assert!(!verify(std::str::from_utf8(&other).unwrap(), &key.hash));
        assert!(!verify(&key.plaintext, &key.hash[..31]));
    }

    #[test]
    fn malformed_keys_have_no_prefix() {
        assert_eq!(prefix_of(""), None);
        assert_eq!(prefix_of("sk_short"), None);
        assert_eq!(prefix_of(&format!("pk_{}", "a".repeat(40))), None);
        assert_eq!(prefix_of(&format!("sk_{}!", "a".repeat(39))), None);
        assert_eq!(prefix_of(&format!("sk_{}é", "a".repeat(38))), None);
    }
}
