//! The real parts answer: a consumer group reads back what a producer wrote through the test
//! broker, and the test database runs queries. Everything else builds on these two.

use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_tests::{create_topics, kafka_config, query_scalar, unique_name, TestDb};

#[tokio::test]
async fn consumer_group_reads_back_every_produced_message_in_order() {
    let topic = unique_name("roundtrip");
    create_topics(&[&topic], 3).await.unwrap();

    let producer: FutureProducer = kafka_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    let sent: Vec<String> = (0..100).map(|i| format!("message {i}")).collect();
    for payload in &sent {
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("tenant/visitor")
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| err)
            .unwrap();
    }

    let consumer: StreamConsumer = kafka_config()
        .set("group.id", unique_name("group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut stream = consumer.stream();
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let msg = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("no message within 60 s")
            .expect("stream ended")
            .unwrap();
        assert_eq!(msg.key(), Some(&b"tenant/visitor"[..]));
        received.push(String::from_utf8(msg.payload().unwrap().to_vec()).unwrap());
    }
    // One key, one partition: the order is the producer's.
    assert_eq!(received, sent);
}

#[tokio::test]
async fn test_databases_are_separate_and_answer_queries() {
    let a = TestDb::new().await.unwrap();
    let b = TestDb::new().await.unwrap();
    assert_ne!(a.name, b.name);
    let ca = a.client().await.unwrap();
    ca.batch_execute("CREATE TABLE only_in_a (x int); INSERT INTO only_in_a VALUES (41), (1)")
        .await
        .unwrap();
    let row = ca
        .query_one("SELECT sum(x)::int, current_database() FROM only_in_a", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), a.name);
    let cb = b.client().await.unwrap();
    let err = cb.query("SELECT * FROM only_in_a", &[]).await.unwrap_err();
    let db_err = err.as_db_error().expect("a database error");
    assert_eq!(
        db_err.code(),
        &tokio_postgres::error::SqlState::UNDEFINED_TABLE,
        "{db_err}"
    );
    let version: i32 = query_scalar(&cb, "SELECT current_setting('server_version_num')::int")
        .await
        .unwrap();
    assert!(
        (150000..160000).contains(&version),
        "expected PostgreSQL 15, got {version}"
    );
}

/// A test's database goes with its handle, even with a connection still open on it, so a
/// run leaves no databases behind on the shared cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_database_is_dropped_with_its_handle() {
    let db = TestDb::migrated().await.unwrap();
    let name = db.name.clone();
    let open = db.client().await.unwrap();
    open.query_one("SELECT 1", &[]).await.unwrap();
    let admin = sluice_tests::connect(&sluice_tests::Stack::get().database_url)
        .await
        .unwrap();
    let count = |name: String| {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_database WHERE datname = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count(name.clone()).await, 1);
    drop(db);
    assert_eq!(count(name.clone()).await, 0, "{name} is still there");
    assert!(open.is_closed() || open.query_one("SELECT 1", &[]).await.is_err());
}
