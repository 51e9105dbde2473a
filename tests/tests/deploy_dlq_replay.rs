//! The DLQ replay procedure of docs/operations.md ("Replaying the DLQ") works as written: the
//! shell block after its `<!-- dlq-replay -->` marker is run, unchanged, against the real
//! broker, and exactly the letters of the chosen reason and source topic come back on that
//! topic with their key and value byte for byte; the others stay where they are.
//!
//! The procedure uses `kcat` and `jq` (Debian packages, installed by `deploy/local/lib.sh`
//! install_prereqs); without them the test fails, saying what to install.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_schema::topics::dlq_headers;
use sluice_tests::{create_topics, kafka_config, repo_root, unique_name, Stack};

/// The replay block of the runbook.
fn replay_script() -> String {
    let doc = std::fs::read_to_string(repo_root().join("docs/operations.md"))
        .expect("docs/operations.md");
    let after_marker = doc
        .split_once("<!-- dlq-replay")
        .expect("docs/operations.md has no <!-- dlq-replay --> marker")
        .1;
    let block = after_marker
        .split_once("```sh\n")
        .expect("no ```sh block after the dlq-replay marker")
        .1;
    block
        .split_once("\n```")
        .expect("unterminated ```sh block")
        .0
        .to_owned()
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--help")
        .output()
        .map(|_| true)
        .unwrap_or(false)
}

async fn letter(
    producer: &FutureProducer,
    dlq: &str,
    key: &str,
    value: &str,
    reason: &str,
    source: &str,
) {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: dlq_headers::REASON,
            value: Some(reason),
        })
        .insert(Header {
            key: dlq_headers::DETAIL,
            value: Some("detail, with = and , in it"),
        })
        .insert(Header {
            key: dlq_headers::SOURCE_TOPIC,
            value: Some(source),
        })
        .insert(Header {
            key: dlq_headers::SOURCE_PARTITION,
            value: Some("0"),
        })
        .insert(Header {
            key: dlq_headers::SOURCE_OFFSET,
            value: Some("42"),
        });
    producer
        .send(
            FutureRecord::to(dlq)
                .key(key)
                .payload(value)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(err, _)| err)
        .expect("producing a letter");
}

#[tokio::test]
async fn runbook_replay_returns_exactly_the_chosen_letters_to_their_topic() {
    assert!(
        have("kcat") && have("jq"),
        "the DLQ replay procedure needs `kcat` and `jq`: apt-get install kcat jq \
         (deploy/local/lib.sh install_prereqs installs them)"
    );
    let dlq = unique_name("dlq");
    let source = unique_name("event");
    let other = unique_name("identity");
    create_topics(&[&dlq, &source, &other], 1).await.unwrap();

    let producer: FutureProducer = kafka_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    // Replayed: the reason and the source match. Values are compact JSON as the writer gets
    // them, with escapes, non-ASCII text and a tab inside the key.
    let wanted = [
        (
            "tnt_1/anon\tone",
            r#"{"v":1,"type":"identify","traits":{"email":"a@b.example","note":"tab\there \"q\" é 😀"}}"#,
        ),
        (
            "tnt_2/anon-two",
            r#"{"v":1,"type":"identify","traits":{"phone":"+33 1 23 45 67 89"}}"#,
        ),
    ];
    letter(
        &producer,
        &dlq,
        wanted[0].0,
        wanted[0].1,
        "pii_key_missing",
        &source,
    )
    .await;
    // Not replayed: another reason, and another source topic.
    letter(
        &producer,
        &dlq,
        "tnt_1/x",
        "not json at all",
        "undecodable",
        &source,
    )
    .await;
    letter(
        &producer,
        &dlq,
        "tnt_1/y",
        r#"{"v":1}"#,
        "pii_key_missing",
        &other,
    )
    .await;
    letter(
        &producer,
        &dlq,
        wanted[1].0,
        wanted[1].1,
        "pii_key_missing",
        &source,
    )
    .await;

    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &replay_script()])
        .env("BROKERS", &Stack::get().kafka_brokers)
        .env("DLQ_TOPIC", &dlq)
        .env("REASON", "pii_key_missing")
        .env("SOURCE_TOPIC", &source)
        .output()
        .expect("running bash");
    assert!(
        out.status.success(),
        "the runbook's replay failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let replayed = read_all(&source, wanted.len()).await;
    let expected: BTreeSet<(Vec<u8>, Vec<u8>)> = wanted
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    assert_eq!(replayed.len(), wanted.len(), "replayed {replayed:?}");
    assert_eq!(
        replayed.into_iter().collect::<BTreeSet<_>>(),
        expected,
        "the replayed letters differ from the originals"
    );
    assert!(
        read_all(&other, 0).await.is_empty(),
        "a letter of another source topic was replayed"
    );
}

/// Every message of `topic` (one partition): waits for `expected`, then a little longer so
/// that one too many shows up too.
async fn read_all(topic: &str, expected: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let consumer: StreamConsumer = kafka_config()
        .set("group.id", unique_name("replay_check"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("creating a consumer");
    consumer.subscribe(&[topic]).expect("subscribing");
    let mut stream = consumer.stream();
    let mut got = Vec::new();
    loop {
        let wait = if got.len() < expected {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(3)
        };
        match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(Ok(msg))) => got.push((
                msg.key().unwrap_or_default().to_vec(),
                msg.payload().unwrap_or_default().to_vec(),
            )),
            Ok(Some(Err(err))) => panic!("consuming {topic}: {err}"),
            Ok(None) | Err(_) => break,
        }
    }
    got
}
