//! Operator-given librdkafka properties (`SLUICE_KAFKA_PROPERTIES`, `--kafka-property`,
//! `SLUICE_KAFKA_PROPERTIES_FILE`): TLS, SASL and tuning for every Kafka client of a
//! process, minus the properties sluice's guarantees rest on, which are refused.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

use crate::SchemaError;

/// Properties sluice sets itself because a guarantee depends on them, each with the reason
/// (and the setting to use instead, where there is one).
const REFUSED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set SLUICE_KAFKA_BROKERS instead"),
    ("metadata.broker.list", "set SLUICE_KAFKA_BROKERS instead"),
    ("group.id", "the writer's group is SLUICE_WRITER_GROUP"),
    (
        "enable.idempotence",
        "the producers are idempotent so a retry never stores a message twice",
    ),
    (
        "acks",
        "acks=all is what makes the collector's 200 mean the data is replicated",
    ),
    (
        "request.required.acks",
        "acks=all is what makes the collector's 200 mean the data is replicated",
    ),
    (
        "enable.auto.commit",
        "the writer commits offsets in PostgreSQL, with the rows",
    ),
    (
        "enable.auto.offset.store",
        "the writer stores an offset only after its rows are committed",
    ),
    (
        "isolation.level",
        "the writer reads committed messages only",
    ),
    (
        "auto.offset.reset",
        "a partition without a stored position starts at its beginning so nothing is skipped",
    ),
    (
        "partition.assignment.strategy",
        "the writer relies on cooperative-sticky rebalances",
    ),
    (
        "transactional.id",
        "sluice's exactly-once effect is PostgreSQL's transaction, not Kafka's",
    ),
    (
        "message.timeout.ms",
        "it is the collector's answer deadline: set SLUICE_PRODUCE_TIMEOUT_MS",
    ),
    (
        "compression.type",
        "set SLUICE_PRODUCER_COMPRESSION instead",
    ),
    (
        "compression.codec",
        "set SLUICE_PRODUCER_COMPRESSION instead",
    ),
];

/// True for a property whose value is a secret: never printed.
pub fn is_secret(key: &str) -> bool {
    key.contains("password")
        || key.contains("secret")
        || key.ends_with(".pem")
        || key == "ssl_key"
        || key == "sasl.oauthbearer.config"
}

/// librdkafka properties given by the operator, validated, in the order given (a later
/// one wins, as in librdkafka). `Debug` and `Display` show secret values as `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(Vec<(String, String)>);

impl KafkaProperties {
    /// Parses `key=value` items (from `--kafka-property` and the comma-separated
    /// `SLUICE_KAFKA_PROPERTIES`, which clap has split already), then the file's lines.
    /// Refuses malformed items and properties sluice relies on.
    pub fn load(items: &[String], file: Option<&Path>) -> Result<KafkaProperties, SchemaError> {
        let mut props = Vec::new();
        for item in items {
            // An empty item is a trailing comma or an empty variable: nothing.
            if item.trim().is_empty() {
                continue;
            }
            props.push(parse_item(
                item,
                "SLUICE_KAFKA_PROPERTIES / --kafka-property",
            )?);
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                SchemaError::KafkaProperty(format!(
                    "cannot read SLUICE_KAFKA_PROPERTIES_FILE {}: {e}",
                    path.display()
                ))
            })?;
            props.extend(parse_lines(&text, path)?);
        }
        Ok(KafkaProperties(props))
    }

    /// Parses comma-separated `key=value` items, as `SLUICE_KAFKA_PROPERTIES` holds them.
    pub fn parse_list(list: &str) -> Result<KafkaProperties, SchemaError> {
        let items: Vec<String> = list.split(',').map(str::to_owned).collect();
        KafkaProperties::load(&items, None)
    }

    /// Sets every property on `config`, after (and so over) sluice's own tuning.
    pub fn apply(&self, config: &mut ClientConfig) {
        for (key, value) in &self.0 {
            config.set(key, value);
        }
    }

    /// True when none were given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`, when given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let value = if is_secret(key) { "***" } else { value };
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KafkaProperties({self})")
    }
}

/// The last client-wide error of a Kafka client (refused SASL credentials, a failed TLS
/// handshake), kept for readiness answers: a request that fails for those reasons fails
/// only with "broker transport failure" or a timeout, saying nothing of why.
#[derive(Clone, Default)]
pub struct ErrorTap {
    last: Arc<Mutex<Option<(Instant, String)>>>,
}

impl ErrorTap {
    /// How long an error counts as the current one. librdkafka suppresses repeats of an
    /// identical error for about 30 s, so a persisting failure is reported at least this often.
    pub const FRESH: Duration = Duration::from_secs(60);

    fn record(&self, error: &KafkaError, reason: &str) -> bool {
        let text = describe_reason(error.rdkafka_error_code(), reason);
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        let repeat = last
            .as_ref()
            .is_some_and(|(at, prev)| *prev == text && at.elapsed() < Self::FRESH);
        *last = Some((Instant::now(), text));
        !repeat
    }

    /// The last error of the past [`ErrorTap::FRESH`], described with what to fix.
    pub fn recent(&self) -> Option<String> {
        let last = self.last.lock().ok()?;
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < Self::FRESH)
            .map(|(_, text)| text.clone())
    }
}

/// A client context that keeps client-wide errors in an [`ErrorTap`] and logs each new
/// one once (librdkafka's own log line says the same again on every retry).
#[derive(Clone, Default)]
pub struct TapContext {
    /// Where the errors go.
    pub tap: ErrorTap,
}

impl ClientContext for TapContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if self.tap.record(&error, reason) {
            tracing::error!(cause = %describe_reason(error.rdkafka_error_code(), reason), "Kafka client error");
        }
    }
}

/// A failed request's error, or the client-wide error behind it when there is a fresh one
/// (a metadata timeout caused by refused credentials is reported as the refusal).
pub fn describe_with_tap(err: &KafkaError, tap: &ErrorTap) -> String {
    match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::BrokerTransportFailure)
        | Some(RDKafkaErrorCode::AllBrokersDown)
        | Some(RDKafkaErrorCode::OperationTimedOut)
        | Some(RDKafkaErrorCode::RequestTimedOut) => match tap.recent() {
            Some(cause) => format!("{}: {cause}", err),
            None => describe_error(err),
        },
        _ => describe_error(err),
    }
}

fn describe_reason(code: Option<RDKafkaErrorCode>, reason: &str) -> String {
    match fix_for(code) {
        Some(fix) => format!("{reason}; {fix}"),
        None => reason.to_owned(),
    }
}

fn fix_for(code: Option<RDKafkaErrorCode>) -> Option<&'static str> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    Some(match code? {
        Code::Authentication | Code::SaslAuthenticationFailed => {
            "the broker refused the credentials: check sasl.mechanism, sasl.username and \
             sasl.password in SLUICE_KAFKA_PROPERTIES / SLUICE_KAFKA_PROPERTIES_FILE"
        }
        Code::SSL => {
            "TLS to the broker failed: check security.protocol and ssl.ca.location (the CA \
             that signed the broker's certificate) in SLUICE_KAFKA_PROPERTIES"
        }
        Code::BrokerTransportFailure | Code::AllBrokersDown => {
            "check SLUICE_KAFKA_BROKERS, and that security.protocol in SLUICE_KAFKA_PROPERTIES \
             matches the broker's listener"
        }
        _ => return None,
    })
}

/// A librdkafka error as one line, without the value of a secret property it complains
/// about (librdkafka's configuration errors quote the value), and with the setting to fix
/// when the cause is one an operator can fix.
pub fn describe_error(err: &KafkaError) -> String {
    if let KafkaError::ClientConfig(_, _, key, _) = err {
        if is_secret(key) {
            return format!(
                "Client config error: the value of {key} is invalid (not shown: it is a secret)"
            );
        }
    }
    describe_reason(err.rdkafka_error_code(), &err.to_string())
}

fn parse_lines(text: &str, path: &Path) -> Result<Vec<(String, String)>, SchemaError> {
    let mut props = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let origin = format!(
            "SLUICE_KAFKA_PROPERTIES_FILE {} line {}",
            path.display(),
            n + 1
        );
        props.push(parse_item(line, &origin)?);
    }
    Ok(props)
}

fn parse_item(item: &str, origin: &str) -> Result<(String, String), SchemaError> {
    let Some((key, value)) = item.split_once('=') else {
        // The item may be a secret typed without its key: do not echo it.
        return Err(SchemaError::KafkaProperty(format!(
            "{origin}: an item is not key=value (e.g. security.protocol=SASL_SSL)"
        )));
    };
    let key = key.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(SchemaError::KafkaProperty(format!(
            "{origin}: {key:?} is not a librdkafka property name"
        )));
    }
    if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
        return Err(SchemaError::KafkaProperty(format!(
            "{origin}: {key} cannot be set: {why}"
        )));
    }
    Ok((key.to_owned(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_and_a_file_are_read_in_order_and_applied() {
        let dir = std::env::temp_dir().join(format!("sluice-kprops-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kafka.properties");
        std::fs::write(
            &file,
            "# from the Secret\n\nsasl.username = svc\nsasl.password=p=w,d\n  # indented comment\n",
        )
        .unwrap();
        let items = vec![
            "security.protocol=SASL_SSL".to_owned(),
            "sasl.mechanism=SCRAM-SHA-512".to_owned(),
            String::new(),
        ];
        let props = KafkaProperties::load(&items, Some(&file)).unwrap();
        assert_eq!(props.get("sasl.username"), Some("svc"));
        assert_eq!(props.get("sasl.password"), Some("p=w,d"));
        assert_eq!(props.get("security.protocol"), Some("SASL_SSL"));
        let mut config = ClientConfig::new();
        props.apply(&mut config);
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        let _ = std::fs::remove_dir_all(&dir);

        let list = KafkaProperties::parse_list("a.b=1,c.d=2,").unwrap();
        assert_eq!(list.get("c.d"), Some("2"));
        assert!(KafkaProperties::parse_list("").unwrap().is_empty());
    }

    #[test]
    fn properties_sluice_relies_on_are_refused_with_the_reason() {
        for key in [
            "enable.idempotence",
            "acks",
            "enable.auto.commit",
            "isolation.level",
            "group.id",
            "bootstrap.servers",
        ] {
            let err = KafkaProperties::parse_list(&format!("{key}=x"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("cannot be set"), "{err}");
        }
        let err = KafkaProperties::parse_list("bootstrap.servers=h:9092")
            .unwrap_err()
            .to_string();
        assert!(err.contains("SLUICE_KAFKA_BROKERS"), "{err}");
    }

    #[test]
    fn config_errors_about_secrets_do_not_quote_them() {
        let err = rdkafka::error::KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"hunter2\"".into(),
            "sasl.password".into(),
            "hunter2".into(),
        );
        let shown = describe_error(&err);
        assert!(
            shown.contains("sasl.password") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn secrets_are_never_shown() {
        let props = KafkaProperties::parse_list(
            "sasl.username=u,sasl.password=hunter2,ssl.key.password=k3y,sasl.oauthbearer.client.secret=s3",
        )
        .unwrap();
        let shown = format!("{props} {props:?}");
        assert!(shown.contains("sasl.username=u"), "{shown}");
        for secret in ["hunter2", "k3y", "s3"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        // A malformed item may be a bare secret: it is not echoed.
        let err = KafkaProperties::parse_list("hunter2")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
