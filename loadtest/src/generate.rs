//! The seeded traffic generator: which tenant sends (zipf-skewed), which visitor and session,
//! which call (page/track/identify/pixel), and the request body, built the way SDKs build them.
//!
//! Everything random comes from one `StdRng` seeded by `--seed`, so the same seed and settings
//! give the same sequence of requests (message ids carry the run id, so a repeated run is not
//! deduplicated away by the writer). Bodies are serialised from borrowed structs over a static
//! catalogue into one reused buffer: a few allocations per request, not per field, so the
//! generator does not steal the CPU it is measuring.

mod shapes;
#[cfg(test)]
mod tests;
mod zipf;

use std::fmt::Write as _;
use std::ops::RangeInclusive;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Error;
use shapes::*;
pub use zipf::Zipf;

/// What the generator makes, and in which proportions.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Number of write keys (one per tenant) that traffic is spread over.
    pub keys: usize,
    /// Zipf exponent of the tenants' traffic share: key rank `r` (from 1) gets a share
    /// proportional to `1 / r^s`. 0 is uniform; 1.1 gives the usual long tail.
    pub zipf_exponent: f64,
    /// Concurrent visitors kept per tenant; a visitor leaves (and a new one arrives) now and
    /// then, see [`VISITOR_CHURN`].
    pub visitors_per_tenant: usize,
    /// Messages per `POST /v1/batch`, drawn uniformly from this range. `1..=1` sends single
    /// calls (`/v1/page`, `/v1/track`, `/v1/identify`) instead of batches.
    pub batch_size: RangeInclusive<usize>,
    /// Relative weights of page, track, identify and pixel calls.
    pub mix: Mix,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 1,
            keys: 1,
            zipf_exponent: 1.1,
            visitors_per_tenant: 1000,
            batch_size: 20..=20,
            mix: Mix::default(),
        }
    }
}

/// Relative weights of the kinds of call (need not add up to anything).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    /// `page` calls.
    pub page: f64,
    /// `track` calls.
    pub track: f64,
    /// `identify` calls (no event row: they become leads and identity links).
    pub identify: f64,
    /// `GET /v1/p.gif` tracking-pixel hits (always one event per request).
    pub pixel: f64,
}

impl Default for Mix {
    /// Roughly what a marketing site with a product sends: mostly page views and actions, a
    /// few sign-ins, and pixel hits from emails and ads.
    fn default() -> Self {
        Mix {
            page: 50.0,
            track: 35.0,
            identify: 5.0,
            pixel: 10.0,
        }
    }
}

impl std::str::FromStr for Mix {
    type Err = Error;

    /// Parses `page=50,track=35,identify=5,pixel=10` (missing kinds weigh 0).
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::Usage(format!(
                "bad --mix {s:?}: write it like page=50,track=35,identify=5,pixel=10"
            ))
        };
        let mut mix = Mix {
            page: 0.0,
            track: 0.0,
            identify: 0.0,
            pixel: 0.0,
        };
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, weight) = part.split_once('=').ok_or_else(bad)?;
            let weight: f64 = weight.trim().parse().map_err(|_| bad())?;
            if !(weight >= 0.0 && weight.is_finite()) {
                return Err(bad());
            }
            match name.trim() {
                "page" => mix.page = weight,
                "track" => mix.track = weight,
                "identify" => mix.identify = weight,
                "pixel" => mix.pixel = weight,
                _ => return Err(bad()),
            }
        }
        if mix.page + mix.track + mix.identify + mix.pixel <= 0.0 {
            return Err(bad());
        }
        if mix.page + mix.track + mix.pixel <= 0.0 {
            return Err(Error::Usage(
                "--mix has only identify calls: they make no event rows to measure; give page, track or pixel a weight".into(),
            ));
        }
        Ok(mix)
    }
}

/// Parses a batch size: `20` (fixed) or `10-30` (uniform in the range), each at least 1.
pub fn parse_batch_size(s: &str) -> Result<RangeInclusive<usize>, Error> {
    let bad = || {
        Error::Usage(format!(
            "bad --batch-size {s:?}: write a count like 20, or a range like 10-30 (at least 1)"
        ))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (lo.trim(), hi.trim()),
        None => (s.trim(), s.trim()),
    };
    let lo: usize = lo.parse().map_err(|_| bad())?;
    let hi: usize = hi.parse().map_err(|_| bad())?;
    if lo == 0 || hi < lo {
        return Err(bad());
    }
    Ok(lo..=hi)
}

/// The chance that a visitor slot gets a new visitor before an event (visitors come and go).
pub const VISITOR_CHURN: f64 = 0.02;
/// The chance that a visitor starts a new session before an event (about 8 events a session).
pub const NEW_SESSION: f64 = 0.125;

/// Which endpoint a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// `POST /v1/batch`.
    Batch,
    /// `POST /v1/page`.
    Page,
    /// `POST /v1/track`.
    Track,
    /// `POST /v1/identify`.
    Identify,
    /// `GET /v1/p.gif`.
    Pixel,
}

impl Endpoint {
    /// The request path.
    pub const fn path(self) -> &'static str {
        match self {
            Endpoint::Batch => "/v1/batch",
            Endpoint::Page => "/v1/page",
            Endpoint::Track => "/v1/track",
            Endpoint::Identify => "/v1/identify",
            Endpoint::Pixel => "/v1/p.gif",
        }
    }
}

/// One HTTP request to send.
#[derive(Debug, Clone)]
pub struct Request {
    /// Index of the write key (and so the tenant) that sends it.
    pub key_index: usize,
    /// Where it goes.
    pub endpoint: Endpoint,
    /// JSON body for POST endpoints; for the pixel, the query string (without `?` and without
    /// the key, which the sender adds).
    pub body: Bytes,
    /// Sequence numbers of the messages that become event rows, in body order; the message id
    /// of each is [`message_id`]`(run_id, seq)`.
    pub event_seqs: Vec<u64>,
    /// Sequence numbers of identify messages (no event row), in body order.
    pub identify_seqs: Vec<u64>,
}

impl Request {
    /// Messages in the request.
    pub fn messages(&self) -> usize {
        self.event_seqs.len() + self.identify_seqs.len()
    }
}

/// The `messageId` of message `seq` of run `run_id`: short, unique per run, and recognisable
/// in the database (`verify` finds a run's rows by the `run_id-` prefix).
pub fn message_id(run_id: &str, seq: u64) -> String {
    format!("{run_id}-{seq:x}")
}

/// One visitor of a tenant, as an SDK in one browser would report it.
#[derive(Debug, Clone)]
struct Visitor {
    anonymous_id: String,
    /// Set after the visitor's first identify call.
    user_id: Option<String>,
    session_id: String,
    /// The page the visitor is on (index into [`PAGES`]).
    page: usize,
    /// Where the visitor came from (index into [`CAMPAIGNS`]), kept for the visitor's life.
    campaign: usize,
    user_agent: usize,
}

/// The generator. Not `Sync`: one owner draws requests in order (a mutex around it for the
/// closed-loop mode keeps the sequence; only the interleaving differs).
pub struct Generator {
    config: GeneratorConfig,
    rng: StdRng,
    tenants: Zipf,
    /// `visitors[tenant][slot]`, filled lazily.
    visitors: Vec<Vec<Option<Visitor>>>,
    /// Next message sequence number.
    next_seq: u64,
    run_id: String,
    /// Reused serialisation buffer.
    buf: Vec<u8>,
}

impl Generator {
    /// A generator for run `run_id` (the message id prefix).
    pub fn new(config: GeneratorConfig, run_id: &str) -> Generator {
        let keys = config.keys.max(1);
        Generator {
            rng: StdRng::seed_from_u64(config.seed),
            tenants: Zipf::new(keys, config.zipf_exponent),
            visitors: vec![Vec::new(); keys],
            next_seq: 0,
            run_id: run_id.to_owned(),
            buf: Vec::with_capacity(64 * 1024),
            config,
        }
    }

    /// Messages generated so far.
    pub fn messages_generated(&self) -> u64 {
        self.next_seq
    }

    /// The next request, with `now` as its `timestamp`/`sentAt`.
    pub fn next_request(&mut self, now: DateTime<Utc>) -> Request {
        let key_index = self.tenants.sample(&mut self.rng);
        let ts = now.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mix = self.config.mix;
        let total = mix.page + mix.track + mix.identify + mix.pixel;
        if self.rng.random::<f64>() * total < mix.pixel {
            return self.pixel(key_index);
        }
        let lo = *self.config.batch_size.start();
        let hi = *self.config.batch_size.end();
        let n = if lo == hi {
            lo
        } else {
            self.rng.random_range(lo..=hi)
        };
        // An SDK batches the queue of one browser: one visitor per batch.
        let slot = self.visitor_slot(key_index);
        let mut event_seqs = Vec::with_capacity(n);
        let mut identify_seqs = Vec::new();
        let mut kinds = Vec::with_capacity(n);
        let non_pixel = mix.page + mix.track + mix.identify;
        for _ in 0..n {
            let x = self.rng.random::<f64>() * non_pixel;
            let kind = if x < mix.page {
                Endpoint::Page
            } else if x < mix.page + mix.track || mix.identify == 0.0 {
                Endpoint::Track
            } else {
                Endpoint::Identify
            };
            kinds.push((kind, self.rng.random::<u32>()));
        }
        self.buf.clear();
        if n > 1 {
            self.buf.extend_from_slice(b"{\"batch\":[");
        }
        for (i, (kind, pick)) in kinds.into_iter().enumerate() {
            if i > 0 {
                self.buf.push(b',');
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            match kind {
                Endpoint::Identify => identify_seqs.push(seq),
                _ => event_seqs.push(seq),
            }
            self.write_message(key_index, slot, kind, pick, seq, &ts, n == 1);
        }
        let endpoint = if n > 1 {
            let _ = write!(
                Sink(&mut self.buf),
                "],\"sentAt\":\"{ts}\",\"context\":{{\"library\":{{\"name\":\"sluice-loadtest\",\"version\":\"{}\"}}}}}}",
                env!("CARGO_PKG_VERSION")
            );
            Endpoint::Batch
        } else {
            match (event_seqs.is_empty(), identify_seqs.is_empty()) {
                (true, _) => Endpoint::Identify,
                _ => self.single_kind_of_last(),
            }
        };
        Request {
            key_index,
            endpoint,
            body: Bytes::copy_from_slice(&self.buf),
            event_seqs,
            identify_seqs,
        }
    }

    /// For a single call: the endpoint of the message just written (its `type` field).
    fn single_kind_of_last(&self) -> Endpoint {
        if self.buf.starts_with(b"{\"type\":\"page\"") {
            Endpoint::Page
        } else {
            Endpoint::Track
        }
    }

    /// Picks a visitor slot of a tenant, making or replacing visitors and sessions as they
    /// come and go.
    fn visitor_slot(&mut self, tenant: usize) -> usize {
        let pool = self.config.visitors_per_tenant.max(1);
        let slot = self.rng.random_range(0..pool);
        let visitors = &mut self.visitors[tenant];
        if visitors.len() < pool {
            visitors.resize(pool, None);
        }
        let churn = self.rng.random::<f64>() < VISITOR_CHURN;
        let rng = &mut self.rng;
        match &mut visitors[slot] {
            Some(v) if !churn => {
                if rng.random::<f64>() < NEW_SESSION {
                    v.session_id = random_id(rng, 's');
                    v.page = 0;
                }
            }
            place => {
                *place = Some(Visitor {
                    anonymous_id: random_id(rng, 'a'),
                    user_id: None,
                    session_id: random_id(rng, 's'),
                    page: 0,
                    campaign: rng.random_range(0..CAMPAIGNS.len()),
                    user_agent: rng.random_range(0..USER_AGENTS.len()),
                });
            }
        }
        slot
    }

    /// Serialises one message into the buffer.
    #[allow(clippy::too_many_arguments)]
    fn write_message(
        &mut self,
        tenant: usize,
        slot: usize,
        kind: Endpoint,
        pick: u32,
        seq: u64,
        ts: &str,
        single: bool,
    ) {
        let message_id = message_id(&self.run_id, seq);
        let Some(visitor) = self.visitors[tenant][slot].as_mut() else {
            return;
        };
        let pick = pick as usize;
        if kind == Endpoint::Page {
            // Walk the site: mostly onwards, sometimes back to the start.
            visitor.page = if pick % 5 == 0 {
                0
            } else {
                (visitor.page + 1 + pick % 3) % PAGES.len()
            };
        }
        if kind == Endpoint::Identify && visitor.user_id.is_none() {
            visitor.user_id = Some(format!("u_{}", &visitor.anonymous_id[2..]));
        }
        let (path, title) = PAGES[visitor.page];
        let first_page = visitor.page == 0;
        let campaign = &CAMPAIGNS[visitor.campaign];
        let url = PageUrl {
            path,
            campaign: first_page.then_some(campaign),
        };
        let page = PageContext {
            path,
            title,
            url: &url,
            referrer: if first_page { campaign.referrer } else { "" },
            search: if first_page { campaign.search } else { "" },
        };
        let context = Context {
            session_id: &visitor.session_id,
            page: &page,
            user_agent: USER_AGENTS[visitor.user_agent],
            locale: LOCALES[pick % LOCALES.len()],
            timezone: TIMEZONES[pick % TIMEZONES.len()],
            campaign: first_page.then_some(campaign),
            library: single.then_some(Library {
                name: "sluice-loadtest",
                version: env!("CARGO_PKG_VERSION"),
            }),
        };
        let base = Base {
            message_id: &message_id,
            anonymous_id: &visitor.anonymous_id,
            user_id: visitor.user_id.as_deref(),
            timestamp: ts,
            sent_at: single.then_some(ts),
            context: &context,
        };
        let result = match kind {
            Endpoint::Page => serde_json::to_writer(
                &mut self.buf,
                &PageMsg {
                    kind: "page",
                    name: title,
                    properties: &page,
                    base: &base,
                },
            ),
            Endpoint::Identify => {
                let user = visitor.user_id.as_deref().unwrap_or_default();
                let email = format!("{user}@example.com");
                serde_json::to_writer(
                    &mut self.buf,
                    &IdentifyMsg {
                        kind: "identify",
                        traits: Traits {
                            email: &email,
                            name: NAMES[pick % NAMES.len()],
                            plan: PLANS[pick % PLANS.len()],
                            company: COMPANIES[pick % COMPANIES.len()],
                            logins: pick % 40,
                        },
                        base: &base,
                    },
                )
            }
            _ => {
                let product = &PRODUCTS[pick % PRODUCTS.len()];
                let other = &PRODUCTS[(pick / 7) % PRODUCTS.len()];
                let order_id = format!("o_{seq:x}");
                let (event, properties) = match pick % 6 {
                    0 | 1 => ("Product Viewed", TrackProps::Product(product)),
                    2 => ("Product Added", TrackProps::Product(product)),
                    3 => (
                        "Button Clicked",
                        TrackProps::Button {
                            button_id: BUTTONS[pick % BUTTONS.len()].0,
                            label: BUTTONS[pick % BUTTONS.len()].1,
                            location: path,
                        },
                    ),
                    4 => (
                        "Signed Up",
                        TrackProps::SignUp {
                            plan: PLANS[pick % PLANS.len()],
                            method: METHODS[pick % METHODS.len()],
                        },
                    ),
                    _ => (
                        "Order Completed",
                        TrackProps::Order {
                            order_id: &order_id,
                            total: product.price + other.price,
                            currency: "EUR",
                            products: [product, other],
                        },
                    ),
                };
                serde_json::to_writer(
                    &mut self.buf,
                    &TrackMsg {
                        kind: "track",
                        event,
                        properties,
                        base: &base,
                    },
                )
            }
        };
        // Writing to a Vec cannot fail, and the structs have only string keys.
        debug_assert!(result.is_ok());
    }

    /// A pixel hit (an email open or an ad impression) as the query string the collector's
    /// `GET /v1/p.gif` reads: `m` messageId, `a` anonymousId, `s` sessionId, `e` event name,
    /// `url`, `t` title, `r` referrer; other parameters become properties.
    fn pixel(&mut self, key_index: usize) -> Request {
        let slot = self.visitor_slot(key_index);
        let seq = self.next_seq;
        self.next_seq += 1;
        let message_id = message_id(&self.run_id, seq);
        let open_email = self.rng.random::<f64>() < 0.3;
        let page = self.rng.random_range(0..PAGES.len());
        let Some(visitor) = self.visitors[key_index][slot].as_ref() else {
            return Request {
                key_index,
                endpoint: Endpoint::Pixel,
                body: Bytes::new(),
                event_seqs: vec![],
                identify_seqs: vec![],
            };
        };
        let mut query = String::with_capacity(256);
        append_pair(&mut query, "m", &message_id);
        append_pair(&mut query, "a", &visitor.anonymous_id);
        append_pair(&mut query, "s", &visitor.session_id);
        if open_email {
            append_pair(&mut query, "e", "Email Opened");
            append_pair(&mut query, "campaign", CAMPAIGNS[visitor.campaign].name);
        } else {
            let (path, title) = PAGES[page];
            append_pair(&mut query, "e", "Ad Impression");
            append_pair(
                &mut query,
                "url",
                &format!("https://shop.example.com{path}"),
            );
            append_pair(&mut query, "t", title);
            append_pair(&mut query, "r", CAMPAIGNS[visitor.campaign].referrer);
        }
        Request {
            key_index,
            endpoint: Endpoint::Pixel,
            body: Bytes::from(query),
            event_seqs: vec![seq],
            identify_seqs: vec![],
        }
    }
}

/// Appends `k=v` to a query string, percent-encoded as `application/x-www-form-urlencoded`
/// (small enough to keep here rather than pull in a crate for it).
fn append_pair(out: &mut String, k: &str, v: &str) {
    if !out.is_empty() {
        out.push('&');
    }
    encode_component(out, k);
    out.push('=');
    encode_component(out, v);
}

fn encode_component(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 15)]));
            }
        }
    }
}

/// A short random id like an SDK's (`a_` / `s_` and 16 hex digits), from the seeded rng.
fn random_id(rng: &mut StdRng, tag: char) -> String {
    format!("{tag}_{:016x}", rng.random::<u64>())
}

/// `fmt::Write` into a byte buffer.
struct Sink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Sink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
