//! The collector's settings: one typed struct, every field a CLI flag and a `SLUICE_*`
//! environment variable (docs/architecture.md §8.3), with the local stack's defaults beside them.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use sluice_schema::cli::{own_words, DatabaseArgs, KafkaArgs, PiiArgs, TopicArgs};
use sluice_schema::kafka::KafkaProperties;
use sluice_schema::runtime::LogFormat;
use sluice_schema::topics::Topics;

use crate::payload::Limits;

/// Default of [`Config::rate_limit_per_key_per_second`].
pub const DEFAULT_RATE_LIMIT_PER_KEY_PER_SECOND: u32 = 5_000;

/// The collector's words for the shared flags of `sluice_schema::cli` it explains its own way
/// (argument id, help text).
const OWN_WORDS: &[(&str, &str)] = &[
    (
        "database_url",
        "PostgreSQL URL, for API key look-ups only; libpq style \
        (`sslmode`, `sslrootcert`, `sslcert`, `sslkey` apply)",
    ),
    (
        "kafka_properties",
        "librdkafka property `key=value` for the collector's \
        Kafka clients (TLS, SASL); repeatable, or comma-separated in the variable. Properties \
        the delivery guarantee rests on (idempotence, acks, message timeout) are refused",
    ),
    (
        "topic_partitions",
        "Partitions of each topic created at start-up \
        (existing topics are left as they are). The same default as the writer's, whichever \
        service starts first: it caps how many writers a consumer group can use",
    ),
    (
        "pii_keys",
        "PII keys, `id=base64,id=base64` (32 random bytes each), the \
        same list as the writer's and `sluice-schema`'s: an identify's email and phone are \
        sealed here, before they are produced, so no topic holds them in plaintext. Without \
        keys, identifies carrying an email or phone are refused (reason `pii_keys_missing`)",
    ),
    (
        "pii_keys_file",
        "A file holding `SLUICE_PII_KEYS` (a mounted secret); read when that is empty",
    ),
];

/// Everything `sluice-ingest` can be told.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "sluice-ingest",
    version,
    about = "sluice's HTTP collector",
    mut_args(own_words(OWN_WORDS))
)]
pub struct Config {
    /// Address of the collector's API (`/v1/...`).
    #[arg(long, env = "SLUICE_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of `/metrics`, `/healthz` and `/readyz`, kept off the public port so the
    /// internet cannot scrape it. Port 0 picks a free port (tests).
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,

    /// The Kafka brokers and the operator's librdkafka properties.
    #[command(flatten)]
    pub kafka_args: KafkaArgs,

    /// The Kafka properties as loaded by [`Config::load_files`] (not a flag).
    #[arg(skip)]
    pub kafka: KafkaProperties,

    /// The PostgreSQL of the API keys.
    #[command(flatten)]
    pub database_args: DatabaseArgs,

    /// Prefix before every topic name (empty: docs/architecture.md §3.1's names exactly).
    #[arg(long, env = "SLUICE_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// How the topics created at start-up are made.
    #[command(flatten)]
    pub topic_args: TopicArgs,

    /// How long a request waits for Kafka to acknowledge all its messages before it answers
    /// 503. Also librdkafka's `message.timeout.ms` (default 300000), so a message the client
    /// was told failed is not delivered minutes later by a background retry.
    #[arg(long, env = "SLUICE_PRODUCE_TIMEOUT_MS", default_value_t = 5000)]
    pub produce_timeout_ms: u64,

    /// Producer queue bound, in messages (librdkafka `queue.buffering.max.messages`, default
    /// 100000). A full queue answers 503 at once instead of queueing without end.
    #[arg(
        long,
        env = "SLUICE_PRODUCER_QUEUE_MAX_MESSAGES",
        default_value_t = 100_000
    )]
    pub producer_queue_max_messages: u32,

    /// Producer queue bound, in kibibytes (librdkafka `queue.buffering.max.kbytes`, default
    /// 1048576).
    #[arg(
        long,
        env = "SLUICE_PRODUCER_QUEUE_MAX_KBYTES",
        default_value_t = 262_144
    )]
    pub producer_queue_max_kbytes: u32,

    /// How long the producer waits to fill a batch (librdkafka `linger.ms`, default 5).
    #[arg(long, env = "SLUICE_PRODUCER_LINGER_MS", default_value_t = 5)]
    pub producer_linger_ms: u32,

    /// Compression of produced batches: `lz4` or `zstd` (docs/architecture.md §3.4).
    #[arg(long, env = "SLUICE_PRODUCER_COMPRESSION", default_value = "lz4")]
    pub producer_compression: String,

    /// Largest single message, in bytes of its JSON (Segment's limit: 32 KB).
    #[arg(long, env = "SLUICE_MAX_MESSAGE_BYTES", default_value_t = Limits::DEFAULT.max_message_bytes)]
    pub max_message_bytes: usize,

    /// Largest request body, in bytes, both as sent and after gzip decompression
    /// (Segment's limit: 500 KB).
    #[arg(long, env = "SLUICE_MAX_REQUEST_BYTES", default_value_t = Limits::DEFAULT.max_request_bytes)]
    pub max_request_bytes: usize,

    /// Deepest nesting of JSON objects and arrays in a body. Bounds the parser's stack.
    #[arg(long, env = "SLUICE_MAX_JSON_DEPTH", default_value_t = Limits::DEFAULT.max_json_depth)]
    pub max_json_depth: usize,

    /// Longest id (`messageId`, `anonymousId`, `userId`, `sessionId`, `groupId`), in bytes.
    #[arg(long, env = "SLUICE_MAX_ID_BYTES", default_value_t = Limits::DEFAULT.max_id_bytes)]
    pub max_id_bytes: usize,

    /// Longest event, page or screen name, in bytes.
    #[arg(long, env = "SLUICE_MAX_NAME_BYTES", default_value_t = Limits::DEFAULT.max_name_bytes)]
    pub max_name_bytes: usize,

    /// How far in the future (after receipt, after skew correction) an event may be, in
    /// milliseconds; a later one is stored at its receive time, its `timestamp` kept as sent.
    /// Stops a broken client clock from making the writer create partitions for year 9999.
    #[arg(long, env = "SLUICE_MAX_FUTURE_MS", default_value_t = 86_400_000)]
    pub max_future_ms: u64,

    /// Most messages in one batch request.
    #[arg(long, env = "SLUICE_MAX_BATCH_MESSAGES", default_value_t = Limits::DEFAULT.max_batch_messages)]
    pub max_batch_messages: usize,

    /// Sustained messages per second one write key may send THROUGH THIS COLLECTOR (token
    /// bucket refill rate); 0 turns rate limiting off. Each collector process keeps its own
    /// buckets, so N collectors behind a load balancer let a key send up to N times this:
    /// set the fleet-wide figure instead with `SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND_FLEET`.
    /// `SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND`, the name before this one, is still read.
    #[arg(
        long = "rate-limit-per-key-per-second-per-collector",
        alias = "rate-limit-per-key-per-second",
        env = "SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND_PER_COLLECTOR",
        default_value_t = DEFAULT_RATE_LIMIT_PER_KEY_PER_SECOND
    )]
    pub rate_limit_per_key_per_second: u32,

    /// The former name of the per-collector rate (it never was fleet-wide); read when the
    /// per-collector setting is left at its default.
    #[arg(
        long = "rate-limit-per-key-per-second-legacy",
        env = "SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND",
        hide = true
    )]
    pub rate_limit_per_key_per_second_legacy: Option<u32>,

    /// Sustained messages per second one write key may send across the whole fleet of
    /// collectors. When set, each collector enforces its share, this divided by
    /// `SLUICE_COLLECTORS` (rounded up), and the per-collector setting is ignored. The share
    /// is exact when the load balancer spreads a key's requests evenly (round robin, least
    /// connections); keep `SLUICE_COLLECTORS` equal to the replicas (an autoscaler that adds
    /// collectors raises the effective fleet limit until it is updated).
    #[arg(long, env = "SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND_FLEET")]
    pub rate_limit_per_key_per_second_fleet: Option<u32>,

    /// How many collectors share the fleet-wide rate (`SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND_FLEET`).
    #[arg(long, env = "SLUICE_COLLECTORS", default_value_t = 1)]
    pub collectors: u32,

    /// Burst of messages one write key may send at once through this collector (token bucket
    /// size, per collector process like the rate).
    #[arg(
        long,
        env = "SLUICE_RATE_LIMIT_BURST_MESSAGES",
        default_value_t = 10_000
    )]
    pub rate_limit_burst_messages: u32,

    /// Peers whose `X-Forwarded-For` is believed, as addresses or CIDR blocks, comma
    /// separated (`10.0.0.0/8,127.0.0.1`). Empty: the socket's address is the client's.
    #[arg(long, env = "SLUICE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = Cidr::from_str)]
    pub trusted_proxies: Vec<Cidr>,

    /// How long a found key is cached, in milliseconds: a revoked key stops working within it.
    #[arg(long, env = "SLUICE_KEY_CACHE_TTL_MS", default_value_t = 30_000)]
    pub key_cache_ttl_ms: u64,

    /// How long an unknown key is cached, in milliseconds: shorter, so a key made a moment
    /// ago works soon, while a flood of bad keys still costs one look-up per prefix.
    #[arg(
        long,
        env = "SLUICE_KEY_CACHE_NEGATIVE_TTL_MS",
        default_value_t = 5_000
    )]
    pub key_cache_negative_ttl_ms: u64,

    /// Most cached keys (found and unknown); expired entries are dropped first when full.
    #[arg(long, env = "SLUICE_KEY_CACHE_MAX_ENTRIES", default_value_t = 100_000)]
    pub key_cache_max_entries: usize,

    /// How often `api_key.last_used_at` is written for the keys used since, in milliseconds.
    #[arg(long, env = "SLUICE_KEY_LAST_USED_FLUSH_MS", default_value_t = 60_000)]
    pub key_last_used_flush_ms: u64,

    /// Connections in the PostgreSQL pool (key look-ups only).
    #[arg(long, env = "SLUICE_DATABASE_POOL_SIZE", default_value_t = 4)]
    pub database_pool_size: usize,

    /// How often `/readyz`'s view of Kafka and PostgreSQL is refreshed, in milliseconds.
    #[arg(
        long,
        env = "SLUICE_READINESS_INTERVAL_MS",
        default_value_t = sluice_schema::readiness::DEFAULT_INTERVAL_MS
    )]
    pub readiness_interval_ms: u64,

    /// How long a drain (SIGTERM) may take to flush the producer, in milliseconds.
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,

    /// Most requests handled at once; more wait for a slot (a bound on memory).
    #[arg(long, env = "SLUICE_MAX_CONCURRENT_REQUESTS", default_value_t = 1_024)]
    pub max_concurrent_requests: usize,

    /// Most open client connections; further ones wait in the listen backlog.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// How long a client may take to send a request's headers, in milliseconds; slower
    /// connections (slow-loris) are closed.
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,

    /// How long a client may take to send a request's body, in milliseconds (408 after).
    #[arg(long, env = "SLUICE_BODY_READ_TIMEOUT_MS", default_value_t = 15_000)]
    pub body_read_timeout_ms: u64,

    /// Largest request head (request line and headers), in bytes; 431 over it.
    #[arg(long, env = "SLUICE_MAX_HEADER_BYTES", default_value_t = 65_536)]
    pub max_header_bytes: usize,

    /// The PII keys an identify's email and phone are sealed with.
    #[command(flatten)]
    pub pii_args: PiiArgs,

    /// Traits that are personal data, comma separated: sealed in an identify (email and phone
    /// into the lead's columns, others in place as `{"$sealed": ...}`), dropped from the
    /// traits events carry. Email and phone are personal data even when not listed.
    #[arg(
        long,
        env = "SLUICE_PII_TRAITS",
        value_delimiter = ',',
        default_value = "email,phone"
    )]
    pub pii_traits: Vec<String>,

    /// Log format: `text` or `json`.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// The defaults, as the binary would have them with no flags and no environment.
    pub fn local() -> Config {
        // Parsing an empty command line only yields the declared defaults (environment
        // variables aside), which are all valid, so this cannot fail in practice; fall back
        // to clap's own error exit if it ever did.
        Config::try_parse_from(["sluice-ingest"]).unwrap_or_else(|err| err.exit())
    }

    /// Reads what the settings name in files (`SLUICE_DATABASE_URL_FILE`,
    /// `SLUICE_KAFKA_PROPERTIES_FILE`) and checks the Kafka properties: done once by
    /// [`crate::serve_on`], so a bad file stops the collector at start-up.
    pub fn load_files(mut self) -> Result<Config, sluice_schema::SchemaError> {
        self.database_args.database_url = self.database_args.url()?;
        self.kafka = self.kafka_args.properties()?;
        Ok(self)
    }

    /// The topic names this collector produces to.
    pub fn topics(&self) -> Topics {
        Topics::with_prefix(&self.topic_prefix)
    }

    /// [`Config::produce_timeout_ms`] as a duration.
    pub fn produce_timeout(&self) -> Duration {
        Duration::from_millis(self.produce_timeout_ms)
    }

    /// The rate this collector enforces per key, messages per second (0: no limit): the
    /// fleet-wide figure's share when one is set, else the per-collector setting (or its
    /// former name when the new one is left at its default).
    pub fn rate_limit_per_collector(&self) -> u32 {
        if let Some(fleet) = self.rate_limit_per_key_per_second_fleet {
            return fleet.div_ceil(self.collectors.max(1));
        }
        match self.rate_limit_per_key_per_second_legacy {
            Some(old)
                if self.rate_limit_per_key_per_second == DEFAULT_RATE_LIMIT_PER_KEY_PER_SECOND =>
            {
                old
            }
            _ => self.rate_limit_per_key_per_second,
        }
    }

    /// The PII keys, when configured (from `pii_keys`, else `pii_keys_file`).
    pub fn pii(&self) -> Result<Option<sluice_schema::pii::PiiKeys>, String> {
        let mut keys = self.pii_args.pii_keys.trim().to_owned();
        if keys.is_empty() {
            if let Some(path) = &self.pii_args.pii_keys_file {
                keys = std::fs::read_to_string(path)
                    .map_err(|e| {
                        format!(
                            "cannot read SLUICE_PII_KEYS_FILE {}: {e}; mount the key list there or unset it",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_owned();
            }
        }
        if keys.is_empty() {
            return Ok(None);
        }
        sluice_schema::pii::PiiKeys::from_env_strings(&keys, &self.pii_args.pii_active_key)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// A `Retry-After` (whole seconds, at least 1) for 503 answers.
    pub fn retry_after_secs(&self) -> u64 {
        self.produce_timeout_ms.div_ceil(1000).max(1)
    }
}

/// An IP address block, `addr/len` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// First address of the block.
    addr: IpAddr,
    /// Prefix length in bits.
    len: u8,
}

impl Cidr {
    /// True when `ip` lies inside the block. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                32,
                self.len,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), 128, self.len)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, bits: u8, len: u8) -> bool {
    if len == 0 {
        return true;
    }
    let shift = u32::from(bits - len);
    (a >> shift) == (b >> shift)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_limits_are_the_payload_defaults() {
        let parsed = Config::try_parse_from(["sluice-ingest"]).unwrap();
        assert_eq!(
            format!("{:?}", Limits::from_config(&parsed)),
            format!("{:?}", Limits::default())
        );
        assert_eq!(parsed.readiness_interval_ms, 2_000);
    }

    #[test]
    fn cidr_blocks_contain_their_addresses() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.9.9.9".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::try_parse_from(["x"]).unwrap();
        assert_eq!(c.max_message_bytes, 32_768);
        assert_eq!(c.max_request_bytes, 512_000);
        assert_eq!(c.topics().event, "sluice.event.v1");
        assert_eq!(c.retry_after_secs(), 5);
        assert_eq!(c.rate_limit_per_collector(), 5_000);
    }

    #[test]
    fn the_fleet_rate_is_shared_among_the_collectors() {
        let c = Config::try_parse_from([
            "x",
            "--rate-limit-per-key-per-second-fleet",
            "10000",
            "--collectors",
            "3",
        ])
        .unwrap();
        assert_eq!(c.rate_limit_per_collector(), 3_334);
        let c = Config::try_parse_from([
            "x",
            "--rate-limit-per-key-per-second-per-collector",
            "7",
            "--rate-limit-per-key-per-second-fleet",
            "100",
        ])
        .unwrap();
        assert_eq!(c.rate_limit_per_collector(), 100, "the fleet figure wins");
        let c = Config::try_parse_from(["x", "--rate-limit-per-key-per-second", "9"]).unwrap();
        assert_eq!(c.rate_limit_per_collector(), 9, "the old flag is an alias");
        let c =
            Config::try_parse_from(["x", "--rate-limit-per-key-per-second-legacy", "11"]).unwrap();
        assert_eq!(
            c.rate_limit_per_collector(),
            11,
            "the old variable is still read"
        );
        let c = Config::try_parse_from([
            "x",
            "--rate-limit-per-key-per-second-legacy",
            "11",
            "--rate-limit-per-key-per-second-per-collector",
            "12",
        ])
        .unwrap();
        assert_eq!(
            c.rate_limit_per_collector(),
            12,
            "the new name wins over the old"
        );
    }

    #[test]
    fn own_words_name_real_flags() {
        let command = <Config as clap::CommandFactory>::command();
        let unknown = sluice_schema::cli::unknown_words(&command, OWN_WORDS);
        assert!(unknown.is_empty(), "{unknown:?}");
    }
}
