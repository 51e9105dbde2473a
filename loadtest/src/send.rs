//! One HTTP request to the collector, and what its answer means for the ack file.
//!
//! Auth is HTTP Basic with the write key as user name and an empty password (Segment's way);
//! the pixel carries the key as `k=` in its query. A 2xx answer acknowledges every message of
//! the request except those its body lists under `rejected` (by `index` or `messageId`); when
//! a rejection names neither, no message of that request is counted as acknowledged, so
//! `verify` can only under-claim, never report a false loss.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};

use crate::generate::{Endpoint, Request};
use crate::Error;

/// Sends requests to one collector.
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    /// Collector base URL without a trailing slash.
    base: String,
    /// `Authorization` header of each key, by key index.
    auth: Vec<HeaderValue>,
    /// The keys themselves, for the pixel's query.
    keys: Vec<String>,
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: acknowledged, except the listed messages.
    Acked(Rejections),
    /// Any other status.
    Status(u16),
    /// No full answer within the request timeout.
    Timeout,
    /// The connection could not be made.
    Connect,
    /// The connection failed mid-request.
    Transport,
}

impl Outcome {
    /// The error label of a failed request (`503`, `timeout`, ...), `None` when acknowledged.
    pub fn error_label(&self) -> Option<String> {
        match self {
            Outcome::Acked(_) => None,
            Outcome::Status(code) => Some(code.to_string()),
            Outcome::Timeout => Some("timeout".into()),
            Outcome::Connect => Some("connect".into()),
            Outcome::Transport => Some("transport".into()),
        }
    }
}

/// Messages of an acknowledged request that the collector refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejections {
    /// Positions in the batch.
    pub indexes: Vec<usize>,
    /// Message ids.
    pub message_ids: Vec<String>,
    /// Rejections naming neither: then no message of the request counts as acknowledged.
    pub unattributed: usize,
}

impl Rejections {
    /// Rejections in total.
    pub fn len(&self) -> usize {
        self.indexes.len() + self.message_ids.len() + self.unattributed
    }

    /// True when nothing was rejected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the `rejected` list of a 2xx answer body; a body without one rejects nothing.
    pub fn parse(body: &[u8]) -> Rejections {
        let mut out = Rejections::default();
        // Cheap test first: almost every answer rejects nothing.
        if !body.windows(8).any(|w| w == b"rejected") {
            return out;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
            return out;
        };
        let Some(list) = value.get("rejected").and_then(|r| r.as_array()) else {
            return out;
        };
        for item in list {
            if let Some(i) = item.get("index").and_then(serde_json::Value::as_u64) {
                out.indexes.push(i as usize);
            } else if let Some(id) = item.get("messageId").and_then(|m| m.as_str()) {
                out.message_ids.push(id.to_owned());
            } else {
                out.unattributed += 1;
            }
        }
        out
    }
}

impl Sender {
    /// A sender to `base_url` with the given write keys, giving up on a request after
    /// `timeout`, keeping up to `max_idle` connections open.
    pub fn new(
        base_url: &str,
        keys: &[String],
        timeout: Duration,
        max_idle: usize,
    ) -> Result<Sender, Error> {
        let client = reqwest::Client::builder()
            .http1_only()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(max_idle)
            // The collector closes a connection idle for its header-read timeout (10 s by
            // default: hyper starts that clock when it waits for the next request); a request
            // sent on it at that moment fails in transport without an answer. Dropping idle
            // connections first keeps those races out of the figures.
            .pool_idle_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .map_err(Error::Client)?;
        let auth = keys
            .iter()
            .map(|key| {
                let token = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
                HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| {
                    Error::Usage(format!(
                        "write key {key:?} holds characters a header cannot carry"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Sender {
            client,
            base: base_url.trim_end_matches('/').to_owned(),
            auth,
            keys: keys.to_vec(),
        })
    }

    /// Sends one request and waits for its full answer.
    pub async fn send(&self, req: &Request) -> Outcome {
        let Some(auth) = self.auth.get(req.key_index) else {
            return Outcome::Status(401);
        };
        let builder = match req.endpoint {
            Endpoint::Pixel => {
                let query = std::str::from_utf8(&req.body).unwrap_or_default();
                let key = self.keys.get(req.key_index).map_or("", String::as_str);
                self.client.get(format!(
                    "{}{}?k={key}&{query}",
                    self.base,
                    req.endpoint.path()
                ))
            }
            _ => self
                .client
                .post(format!("{}{}", self.base, req.endpoint.path()))
                .header(AUTHORIZATION, auth.clone())
                .header(CONTENT_TYPE, "application/json")
                .body(req.body.clone()),
        };
        let response = match builder.send().await {
            Ok(r) => r,
            Err(err) => return classify(&err),
        };
        let status = response.status();
        // Read the whole body: the answer is complete only then, and the connection is reused.
        let body: Bytes = match response.bytes().await {
            Ok(b) => b,
            Err(err) => return classify(&err),
        };
        if status.is_success() {
            Outcome::Acked(Rejections::parse(&body))
        } else {
            Outcome::Status(status.as_u16())
        }
    }
}

fn classify(err: &reqwest::Error) -> Outcome {
    if err.is_timeout() {
        Outcome::Timeout
    } else if err.is_connect() {
        Outcome::Connect
    } else {
        Outcome::Transport
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_read_by_index_or_message_id() {
        assert!(Rejections::parse(b"{\"ok\":true}").is_empty());
        assert!(Rejections::parse(b"").is_empty());
        let r = Rejections::parse(
            br#"{"rejected":[{"index":2,"reason":"too big"},{"messageId":"m-9"},{"reason":"?"}]}"#,
        );
        assert_eq!(r.indexes, vec![2]);
        assert_eq!(r.message_ids, vec!["m-9".to_owned()]);
        assert_eq!(r.unattributed, 1);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn failures_have_labels() {
        assert_eq!(Outcome::Status(503).error_label().as_deref(), Some("503"));
        assert_eq!(Outcome::Timeout.error_label().as_deref(), Some("timeout"));
        assert_eq!(Outcome::Acked(Rejections::default()).error_label(), None);
    }
}
