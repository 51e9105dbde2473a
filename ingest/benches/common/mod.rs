//! The messages the collector's benches feed it: a track call as analytics.js sends it, and
//! the facts of the request around it.

use chrono::Utc;
use serde_json::json;
use sluice_ingest::auth::Principal;
use sluice_ingest::enrich::RequestFacts;

/// The `i`th track call of a visitor's session (17 visitors take turns).
pub fn track(i: usize) -> serde_json::Value {
    json!({
        "type": "track",
        "event": "Product Added",
        "messageId": format!("6f1c2a9e-8d4b-4e1a-9c3f-{i:012}"),
        "anonymousId": format!("anon-{}", i % 17),
        "timestamp": "2026-11-24T10:00:00.000Z",
        "sentAt": "2026-11-24T10:00:01.000Z",
        "properties": {"product_id": "sku-1042", "price": 19.99, "currency": "EUR", "quantity": 2},
        "context": {
            "page": {"url": "https://shop.example/p/1042?utm_source=news&utm_medium=email", "referrer": "https://search.example/"},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
            "library": {"name": "analytics.js", "version": "2.11.1"}
        }
    })
}

/// The first track call as `/v1/track` takes it: without `type`, which the path gives.
pub fn single_track() -> serde_json::Value {
    let mut single = track(0);
    if let Some(o) = single.as_object_mut() {
        o.remove("type");
    }
    single
}

/// The request around the messages: a write key of tenant 42, its address and agent.
pub fn facts() -> RequestFacts {
    RequestFacts {
        principal: Principal {
            key_id: 1,
            tenant_id: 42,
            workspace_id: 7,
        },
        received_at: Utc::now(),
        ip: Some("203.0.113.9".parse().expect("valid IP literal")),
        user_agent: Some("Mozilla/5.0".into()),
        max_future: chrono::TimeDelta::days(1),
    }
}
