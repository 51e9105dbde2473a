//! The private instances fault tests rely on really stop and really come back.

use sluice_tests::connect;
use sluice_tests::private::{PrivateKafka, PrivatePostgres, TcpProxy};

#[tokio::test]
async fn private_postgres_stops_and_starts_again_with_its_data() {
    let pg = PrivatePostgres::start().await.unwrap();
    let client = connect(&pg.url()).await.unwrap();
    client
        .batch_execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        .await
        .unwrap();

    pg.stop().await.unwrap();
    assert!(
        connect(&pg.url()).await.is_err(),
        "a stopped cluster must refuse connections"
    );

    pg.start_again().await.unwrap();
    let client = connect(&pg.url()).await.unwrap();
    let x: i32 = client
        .query_one("SELECT x FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 7);
}

#[tokio::test]
async fn postgres_behind_a_cut_proxy_is_unreachable_until_restored() {
    let pg = PrivatePostgres::start().await.unwrap();
    let proxy = TcpProxy::start(&format!("127.0.0.1:{}", pg.port()))
        .await
        .unwrap();
    let url = format!("postgres://sluice@{}/sluice", proxy.addr());
    let client = connect(&url).await.unwrap();
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );

    proxy.cut();
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    assert!(connect(&url).await.is_err());

    proxy.restore();
    let client = connect(&url).await.unwrap();
    assert_eq!(
        client
            .query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
}

#[tokio::test]
async fn private_kafka_stops_and_starts_again() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use std::time::Duration;

    let kafka = PrivateKafka::start().await.unwrap();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let topic = NewTopic::new("kept", 1, TopicReplication::Fixed(1));
    admin.create_topics([&topic], &opts).await.unwrap()[0]
        .as_ref()
        .unwrap();

    kafka.stop().await.unwrap();
    // A new client: an old one may answer from its metadata cache.
    let fresh: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .unwrap();
    let meta = fresh.inner().fetch_metadata(None, Duration::from_secs(2));
    assert!(
        meta.is_err(),
        "a stopped broker must not answer: {:?}",
        meta.map(|m| m.brokers().len())
    );

    kafka.start_again().await.unwrap();
    let meta = admin
        .inner()
        .fetch_metadata(Some("kept"), Duration::from_secs(30))
        .unwrap();
    assert_eq!(meta.topics()[0].name(), "kept");
    assert!(
        meta.topics()[0].error().is_none(),
        "the topic survived the restart"
    );
}
