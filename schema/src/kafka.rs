//! Operator-given librdkafka properties (`SLUICE_KAFKA_PROPERTIES`, `--kafka-property`,
//! `SLUICE_KAFKA_PROPERTIES_FILE`): TLS, SASL and tuning for every Kafka client of a
//! process, minus the properties sluice's guarantees rest on, which are refused.

use std::fmt;
use std::path::Path;

use rdkafka::ClientConfig;

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

/// A librdkafka error as one line, without the value of a secret property it complains
/// about (librdkafka's configuration errors quote the value), and with the setting to fix
/// when the cause is one an operator can fix.
pub fn describe_error(err: &rdkafka::error::KafkaError) -> String {
    use rdkafka::types::RDKafkaErrorCode as Code;
    if let rdkafka::error::KafkaError::ClientConfig(_, _, key, _) = err {
        if is_secret(key) {
            return format!(
                "Client config error: the value of {key} is invalid (not shown: it is a secret)"
            );
        }
    }
    let text = err.to_string();
    let fix = match err.rdkafka_error_code() {
        Some(Code::Authentication) | Some(Code::SaslAuthenticationFailed) => {
            "the broker refused the credentials: check sasl.mechanism, sasl.username and \
             sasl.password in SLUICE_KAFKA_PROPERTIES / SLUICE_KAFKA_PROPERTIES_FILE"
        }
        Some(Code::SSL) => {
            "TLS to the broker failed: check security.protocol and ssl.ca.location (the CA \
             that signed the broker's certificate) in SLUICE_KAFKA_PROPERTIES"
        }
        Some(Code::BrokerTransportFailure) | Some(Code::AllBrokersDown) => {
            "check SLUICE_KAFKA_BROKERS, and that security.protocol in SLUICE_KAFKA_PROPERTIES \
             matches the broker's listener"
        }
        _ => return text,
    };
    format!("{text}; {fix}")
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
