//! Personal data sealed before it leaves the collector: an identify's email and phone become
//! AES-256-GCM ciphertexts with HMAC fingerprints (the keys and formats of
//! `sluice_schema::pii`), the other traits configured as personal data become sealed
//! envelopes, and personal traits riding along on events are dropped, so that no topic (and
//! no dead letter made from one) holds them in plaintext.

use serde_json::Value;
use sluice_schema::messages::{IdentityKind, JsonObject, IDENTITY_VERSION};
use sluice_schema::pii::{PiiKeys, SEALED_TRAITS};

use crate::enrich::{strip_traits, Outgoing};
use crate::payload::{Kind, Message};

/// The collector's PII settings: keys, and which traits are personal data.
#[derive(Debug, Clone)]
pub struct Sealer {
    /// Keys, as the writer's and `sluice-schema`'s (the first one keys the fingerprints).
    keys: PiiKeys,
    /// Personal traits other than email and phone (`SLUICE_PII_TRAITS` less those two).
    others: Vec<String>,
}

impl Sealer {
    /// Seals with `keys`; `traits` names the personal traits (email and phone are always).
    pub fn new(keys: PiiKeys, traits: &[String]) -> Sealer {
        let mut others: Vec<String> = traits
            .iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty() && !SEALED_TRAITS.contains(&t.as_str()))
            .collect();
        others.sort();
        others.dedup();
        Sealer { keys, others }
    }

    /// Seals every identify of `out` (version [`IDENTITY_VERSION`]) and drops personal traits
    /// from what events and identities carry besides: `context.traits` (analytics.js copies
    /// the user's traits there on every call) and a group call's traits.
    pub fn seal(&self, out: &mut Outgoing) {
        let names = personal(self.others.iter().map(String::as_str));
        for m in &mut out.identities {
            if m.kind == IdentityKind::Identify {
                m.pii = self.keys.seal_identity_traits(&mut m.traits, &self.others);
            }
            m.v = IDENTITY_VERSION;
            strip_context(&mut m.context, &names);
        }
        strip_events(out, &names);
    }
}

/// True when `m` carries personal data that only a [`Sealer`] may let through: an identify
/// with an email or phone trait. (Other personal traits, and those on `context.traits`, are
/// dropped without keys, since no column needs them.)
pub fn needs_keys(m: &Message) -> bool {
    m.kind == Kind::Identify && SEALED_TRAITS.iter().any(|k| m.traits.contains_key(*k))
}

/// Drops every personal trait from `out` when the collector has no keys (email and phone of
/// identifies were refused before): the extra personal traits cannot be sealed, so they are
/// not sent.
pub fn strip_without_keys(out: &mut Outgoing, traits: &[String]) {
    let names = personal(traits.iter().map(|s| s.trim()));
    for m in &mut out.identities {
        remove_all(&mut m.traits, &names);
        strip_context(&mut m.context, &names);
    }
    strip_events(out, &names);
}

/// The personal trait names: email, phone and `others`.
fn personal<'a>(others: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    SEALED_TRAITS.iter().copied().chain(others).collect()
}

fn remove_all(traits: &mut JsonObject, names: &[&str]) {
    for name in names {
        traits.remove(*name);
    }
}

fn strip_context(context: &mut JsonObject, names: &[&str]) {
    if let Some(Value::Object(traits)) = context.get_mut("traits") {
        remove_all(traits, names);
    }
}

/// Drops `names` from every event's `context.traits` and `properties.traits` (a group call's).
fn strip_events(out: &mut Outgoing, names: &[&str]) {
    for e in &mut out.events {
        strip_traits(&mut e.context, names);
        strip_traits(&mut e.properties, names);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use chrono::Utc;
    use serde_json::json;
    use sluice_schema::messages::{EventMessage, EventType, IdentityMessage, RawObject};

    fn keys() -> PiiKeys {
        let k = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        PiiKeys::from_env_strings(&format!("c1={k}"), "c1").unwrap()
    }

    fn obj(v: Value) -> JsonObject {
        v.as_object().cloned().unwrap()
    }

    fn outgoing() -> Outgoing {
        let now = Utc::now();
        let traits = obj(json!({"email": "ada@example.com", "name": "Ada", "plan": "pro"}));
        let context = obj(json!({"traits": traits.clone(), "ip": "127.0.0.1"}));
        Outgoing {
            identities: vec![IdentityMessage {
                v: 1,
                tenant_id: 1,
                workspace_id: 1,
                kind: IdentityKind::Identify,
                message_id: "m".into(),
                anonymous_id: Some("a".into()),
                user_id: None,
                previous_id: None,
                traits,
                context: context.clone(),
                occurred_at: now,
                received_at: now,
                pii: None,
            }],
            events: vec![EventMessage {
                v: 1,
                tenant_id: 1,
                workspace_id: 1,
                event_id: uuid::Uuid::nil(),
                message_id: "e".into(),
                kind: EventType::Track,
                name: Some("x".into()),
                anonymous_id: Some("a".into()),
                user_id: None,
                session_id: None,
                occurred_at: now,
                timestamp: None,
                sent_at: None,
                received_at: now,
                properties: RawObject::of(&obj(json!({"traits": {"name": "Ada", "plan": "pro"}}))),
                context: RawObject::of(&context),
                ip: None,
                user_agent: None,
                bot: false,
            }],
            visitors: Vec::new(),
            sessions: Vec::new(),
        }
    }

    #[test]
    fn no_personal_trait_leaves_in_plaintext() {
        let mut out = outgoing();
        Sealer::new(keys(), &["email".into(), "phone".into(), "name".into()]).seal(&mut out);
        let text = serde_json::to_string(&(&out.identities, &out.events)).unwrap();
        assert!(!text.contains("ada@example.com"), "{text}");
        assert!(!text.contains("Ada"), "{text}");
        assert!(text.contains("pro"), "non-personal traits stay: {text}");
        let id = &out.identities[0];
        assert_eq!(id.v, IDENTITY_VERSION);
        assert_eq!(id.pii.as_ref().unwrap().key_id, "c1");
        assert!(id.traits["name"]
            .get(sluice_schema::pii::SEALED_ENVELOPE)
            .is_some());
    }

    #[test]
    fn without_keys_personal_traits_are_dropped() {
        let mut out = outgoing();
        strip_without_keys(&mut out, &["name".into()]);
        let text = serde_json::to_string(&(&out.identities, &out.events)).unwrap();
        assert!(
            !text.contains("ada@example.com") && !text.contains("Ada"),
            "{text}"
        );
    }
}
