//! JSON objects kept as their text (`properties`, `context`): the few fields the collector
//! reads picked out without building a tree, and entries added by writing text, so that what
//! is only passed on is copied once and never parsed into maps.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Number;
use sluice_schema::messages::RawObject;

/// An object key, borrowed from the body unless it had escapes.
pub(crate) struct Key<'a>(pub(crate) Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// A JSON value as the rules read a field: its text, when a string, is borrowed unless escaped.
#[derive(Debug, PartialEq)]
pub(crate) enum Scalar<'a> {
    Null,
    Str(Cow<'a, str>),
    Num(Number),
    /// A boolean, array or object.
    Other,
}

impl<'a> Scalar<'a> {
    /// The scalar `raw` holds.
    pub(crate) fn of(raw: &'a RawValue) -> Scalar<'a> {
        // Arrays and objects are not read: nothing asks for their contents.
        if raw.get().trim_start().starts_with(['{', '[']) {
            return Scalar::Other;
        }
        serde_json::from_str(raw.get()).unwrap_or(Scalar::Other)
    }

    /// The string, if it is one.
    pub(crate) fn into_string(self) -> Option<String> {
        match self {
            Scalar::Str(s) => Some(s.into_owned()),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar<'de>, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON scalar")
            }
            fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Other)
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Num(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Num(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
                Ok(Number::from_f64(v).map_or(Scalar::Other, Scalar::Num))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
        }
        d.deserialize_any(ScalarVisitor)
    }
}

/// The values of the `wanted` top-level keys of the object `text`, the last of a repeated key
/// winning as in a map; all `None` when `text` is not an object.
pub(crate) fn pick<'a, const N: usize>(
    text: &'a str,
    wanted: &[&str; N],
) -> [Option<&'a RawValue>; N] {
    struct Pick<'w, const N: usize>(&'w [&'w str; N]);
    impl<'de, const N: usize> Visitor<'de> for Pick<'_, N> {
        type Value = [Option<&'de RawValue>; N];
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = [None; N];
            while let Some(Key(key)) = map.next_key()? {
                match self.0.iter().position(|w| *w == key) {
                    Some(i) => found[i] = Some(map.next_value()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(found)
        }
    }
    if !text.trim_start().starts_with('{') {
        return [None; N];
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de::Deserializer::deserialize_map(&mut de, Pick(wanted)).unwrap_or([None; N])
}

/// Every top-level entry of the object `text`, in order, every one kept (the last of a repeated
/// key is the one that counts); empty when `text` is not an object.
pub(crate) fn entries(text: &str) -> Vec<(Cow<'_, str>, &RawValue)> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            // Room for a context's usual keys: growing from nothing took two allocations.
            let mut all = Vec::with_capacity(8);
            while let Some(Key(key)) = map.next_key()? {
                all.push((key, map.next_value()?));
            }
            Ok(all)
        }
    }
    if !text.trim_start().starts_with('{') {
        return Vec::new();
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de::Deserializer::deserialize_map(&mut de, Entries).unwrap_or_default()
}

/// An object of the entries `base` (an object's, as [`entries`] lists them) and then `added`.
/// The caller adds only keys `base` does not have, so no key is repeated that was not already.
/// The values are written as their text and nothing is parsed again: making the text and then
/// checking it with `RawValue::from_string` parsed every merged `context` a second time.
pub(crate) fn with_entries<'a: 'b, 'b>(
    base: &'b [(Cow<'a, str>, &'a RawValue)],
    added: impl IntoIterator<Item = (&'b str, &'b RawValue)>,
) -> RawObject {
    struct Object<'e>(Vec<(&'e str, &'e RawValue)>);
    impl Serialize for Object<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().copied())
        }
    }
    let all = base.iter().map(|(k, v)| (k.as_ref(), *v)).chain(added);
    // String keys and raw values always serialise.
    serde_json::value::to_raw_value(&Object(all.collect()))
        .ok()
        .and_then(RawObject::new)
        .unwrap_or_default()
}

/// The object text `text` as a [`RawObject`]; `{}` if it is none.
pub(crate) fn object(text: &RawValue) -> RawObject {
    RawObject::new(text.to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn picks_take_the_last_of_repeated_keys_and_read_escaped_ones() {
        let text =
            r#"{"page":{"url":"a"},"ip":"1","page":{"url":"b","url":"c"},"user\u0041gent":"x"}"#;
        let [page, ip, ua, none] = pick(text, &["page", "ip", "userAgent", "none"]);
        let [url] = pick(page.unwrap().get(), &["url"]);
        assert_eq!(url.map(RawValue::get), Some(r#""c""#));
        assert_eq!(ip.map(RawValue::get), Some(r#""1""#));
        assert_eq!(Scalar::of(ua.unwrap()), Scalar::Str("x".into()));
        assert!(none.is_none());
        assert!(pick("[1]", &["a"])[0].is_none());
        assert!(pick(r#""{""#, &["a"])[0].is_none());
        let all: BTreeMap<_, _> = entries(r#"{"a":1,"b":{"c":[2]},"a":3}"#)
            .into_iter()
            .collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all["a"].get(), "3");
        assert_eq!(all["b"].get(), r#"{"c":[2]}"#);
    }

    #[test]
    fn scalars_are_read_by_type() {
        assert_eq!(Scalar::of(raw("null")), Scalar::Null);
        assert_eq!(Scalar::of(raw("7")), Scalar::Num(7.into()));
        assert_eq!(Scalar::of(raw("-7")), Scalar::Num((-7).into()));
        assert_eq!(Scalar::of(raw("2.5")).into_string(), None);
        assert_eq!(
            Scalar::of(raw(r#""\u00e9\n""#)),
            Scalar::Str("\u{e9}\n".into())
        );
        for other in ["true", "[]", "{}", r#"{"a":"b"}"#] {
            assert_eq!(Scalar::of(raw(other)), Scalar::Other, "{other}");
        }
    }

    #[test]
    fn entries_are_added_after_the_object_own() {
        let one = raw("1");
        let s = raw(r#""x\"y""#);
        for (base, want) in [
            ("{}", json!({"a": 1, "k\"ey": "x\"y"})),
            ("{ }", json!({"a": 1, "k\"ey": "x\"y"})),
            (
                r#"{"b": [true] } "#,
                json!({"b": [true], "a": 1, "k\"ey": "x\"y"}),
            ),
        ] {
            let out = with_entries(&entries(base), [("a", one), ("k\"ey", s)]);
            let back: serde_json::Value = serde_json::from_str(out.get()).unwrap();
            assert_eq!(back, want, "{base}");
        }
        assert_eq!(
            with_entries(&entries(r#"{ "b": 2 }"#), []).get(),
            r#"{"b":2}"#
        );
        // A repeated key of the base stays repeated, in order (the last one counts).
        let repeated = entries(r#"{"b":1,"b":2}"#);
        assert_eq!(
            with_entries(&repeated, [("a", one)]).get(),
            r#"{"b":1,"b":2,"a":1}"#
        );
    }
}
