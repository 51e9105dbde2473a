//! External ids: the BIGINT keys of the control plane and funnels shown to people and APIs as
//! `{prefix}_{body}{check}`, e.g. `tnt_1z8` or `ws_4k2q7`.
//!
//! The body is the key in lowercase Crockford base32 (no `i l o u`, so ids survive being read
//! aloud or retyped). Two check characters follow, a position-weighted sum modulo the prime
//! 1021 salted by the kind: every single mistyped character and every swap of two neighbours
//! is refused, and so is an id of one kind given where another kind is expected. Ids are not
//! secrets: anyone holding one still needs a key allowed to use it.

use crate::SchemaError;

/// What an id names; each kind has its own prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `tenant.id`, `tnt_`.
    Tenant,
    /// `workspace.id`, `ws_`.
    Workspace,
    /// `api_key.id`, `key_`.
    Key,
    /// `lead.id`, `ld_`.
    Lead,
    /// `funnel.id`, `fnl_`.
    Funnel,
}

impl Kind {
    /// Every kind, for tests and tools.
    pub const ALL: [Kind; 5] = [
        Kind::Tenant,
        Kind::Workspace,
        Kind::Key,
        Kind::Lead,
        Kind::Funnel,
    ];

    /// The prefix, without the underscore.
    pub const fn prefix(self) -> &'static str {
        match self {
            Kind::Tenant => "tnt",
            Kind::Workspace => "ws",
            Kind::Key => "key",
            Kind::Lead => "ld",
            Kind::Funnel => "fnl",
        }
    }

    /// Mixed into the check so kinds do not accept each other's ids. Distinct, below 1021.
    const fn salt(self) -> u32 {
        match self {
            Kind::Tenant => 101,
            Kind::Workspace => 307,
            Kind::Key => 503,
            Kind::Lead => 709,
            Kind::Funnel => 911,
        }
    }
}

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const CHECK_MODULUS: u32 = 1021;
/// Base32 digits of the largest u64.
const MAX_BODY: usize = 13;

/// The external id of `id`. Total: every i64 (taken as its 64-bit pattern) has an id.
pub fn encode(kind: Kind, id: i64) -> String {
    let mut value = id as u64;
    let mut digits = [0u8; MAX_BODY];
    let mut n = 0;
    loop {
        digits[n] = (value % 32) as u8;
        n += 1;
        value /= 32;
        if value == 0 {
            break;
        }
    }
    digits[..n].reverse();
    let check = check_of(kind, &digits[..n]);
    let mut out = String::with_capacity(kind.prefix().len() + 1 + n + 2);
    out.push_str(kind.prefix());
    out.push('_');
    out.extend(
        digits[..n]
            .iter()
            .map(|&d| char::from(ALPHABET[usize::from(d)])),
    );
    out.push(char::from(ALPHABET[(check / 32) as usize]));
    out.push(char::from(ALPHABET[(check % 32) as usize]));
    out
}

/// The key behind an external id of `kind`, or an error saying why the id is refused.
pub fn decode(kind: Kind, input: &str) -> Result<i64, SchemaError> {
    let refuse = |reason: String| SchemaError::InvalidId {
        input: input.chars().take(40).collect(),
        reason,
    };
    let body = input
        .strip_prefix(kind.prefix())
        .and_then(|rest| rest.strip_prefix('_'))
        .ok_or_else(|| refuse(format!("expected an id starting with {}_", kind.prefix())))?;
    let digits: Vec<u8> = body
        .bytes()
        .map(|b| ALPHABET.iter().position(|&a| a == b).map(|p| p as u8))
        .collect::<Option<_>>()
        .ok_or_else(|| refuse("contains a character that no id has (check for typos)".into()))?;
    if digits.len() < 3 || digits.len() > MAX_BODY + 2 {
        return Err(refuse(
            "wrong length (check for a truncated or pasted-twice id)".into(),
        ));
    }
    let (value_digits, check_digits) = digits.split_at(digits.len() - 2);
    if value_digits.len() > 1 && value_digits[0] == 0 {
        return Err(refuse("not in canonical form (leading zero)".into()));
    }
    let mut value: u64 = 0;
    for &d in value_digits {
        value = value
            .checked_mul(32)
            .and_then(|v| v.checked_add(u64::from(d)))
            .ok_or_else(|| refuse("too large to be an id".into()))?;
    }
    let check = u32::from(check_digits[0]) * 32 + u32::from(check_digits[1]);
    if check != check_of(kind, value_digits) {
        return Err(refuse(
            "check characters do not match (a typo, or an id of another kind)".into(),
        ));
    }
    Ok(value as i64)
}

fn check_of(kind: Kind, digits: &[u8]) -> u32 {
    // Weights 1..=13 and digits < 32 keep every single-digit change below the prime modulus,
    // so it always changes the sum modulo 1021.
    let sum: u32 = digits
        .iter()
        .enumerate()
        .map(|(i, &d)| (i as u32 + 1) * u32::from(d))
        .sum();
    (sum + kind.salt()) % CHECK_MODULUS
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = Kind> {
        prop::sample::select(Kind::ALL.to_vec())
    }

    #[test]
    fn ids_look_like_their_kind() {
        assert!(encode(Kind::Tenant, 1).starts_with("tnt_"));
        assert!(encode(Kind::Workspace, 42).starts_with("ws_"));
        assert_eq!(decode(Kind::Key, &encode(Kind::Key, 7)).unwrap(), 7);
        assert!(decode(Kind::Tenant, "tnt_").is_err());
        assert!(decode(Kind::Tenant, "").is_err());
        assert!(decode(Kind::Tenant, "tnt_0zzzzzzzzzzzzzzz").is_err());
    }

    proptest! {
        #[test]
        fn every_id_round_trips(k in kind(), id in any::<i64>()) {
            prop_assert_eq!(decode(k, &encode(k, id)).unwrap(), id);
        }

        #[test]
        fn an_id_of_another_kind_is_refused(a in kind(), b in kind(), id in any::<i64>()) {
            prop_assume!(a != b);
            let other = encode(b, id);
            prop_assert!(decode(a, &other).is_err());
            // Even with the prefix swapped, the check refuses it.
            let relabelled = format!("{}_{}", a.prefix(), other.split_once('_').unwrap().1);
            prop_assert!(decode(a, &relabelled).is_err());
        }

        #[test]
        fn any_single_mistyped_character_is_refused(
            k in kind(), id in any::<i64>(), pos in any::<prop::sample::Index>(), c in 0usize..32
        ) {
            let good = encode(k, id);
            let start = k.prefix().len() + 1;
            let mut bytes = good.clone().into_bytes();
            let i = start + pos.index(bytes.len() - start);
            prop_assume!(bytes[i] != ALPHABET[c]);
            bytes[i] = ALPHABET[c];
            let bad = String::from_utf8(bytes).unwrap();
            prop_assert!(decode(k, &bad).is_err(), "{} accepted as {}", bad, good);
        }

        #[test]
        fn swapped_neighbours_are_refused(k in kind(), id in any::<i64>(), pos in any::<prop::sample::Index>()) {
            let good = encode(k, id);
            let start = k.prefix().len() + 1;
            let mut bytes = good.clone().into_bytes();
            let i = start + pos.index(bytes.len() - start - 1);
            prop_assume!(bytes[i] != bytes[i + 1]);
            bytes.swap(i, i + 1);
            let bad = String::from_utf8(bytes).unwrap();
            prop_assert!(decode(k, &bad).is_err(), "{} accepted as {}", bad, good);
        }

        #[test]
        fn arbitrary_text_never_panics(k in kind(), s in ".{0,24}") {
            let _ = decode(k, &s);
        }
    }
}
