//! The private instances fault tests rely on really stop and really come back.

use sluice_tests::connect;
use sluice_tests::private::{PrivateKafka, PrivatePostgres, TcpProxy};
use sluice_tests::query_scalar;

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
    let x: i32 = query_scalar(&client, "SELECT x FROM kept").await.unwrap();
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

/// The broker started behind a proxy tells clients that bootstrap through the proxy the
/// proxy's address, so after their first metadata answer they still pass the proxy: a cut
/// stops them, and only them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_behind_a_proxy_is_reached_only_through_it() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    use std::time::Duration;

    let (kafka, proxy) = PrivateKafka::start_behind_proxy().await.unwrap();
    let direct: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let topic = NewTopic::new("behind", 1, TopicReplication::Fixed(1));
    direct.create_topics([&topic], &opts).await.unwrap()[0]
        .as_ref()
        .unwrap();

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", proxy.addr().to_string())
        .set("message.timeout.ms", "3000")
        .create()
        .unwrap();
    fn advertised<C: rdkafka::client::ClientContext>(
        client: &rdkafka::client::Client<C>,
    ) -> Vec<String> {
        // A blocking call: the worker hands its tasks (the proxy's among them) to another.
        let meta =
            tokio::task::block_in_place(|| client.fetch_metadata(None, Duration::from_secs(10)))
                .unwrap();
        meta.brokers()
            .iter()
            .map(|b| format!("{}:{}", b.host(), b.port()))
            .collect()
    }
    assert_eq!(
        advertised(producer.client()),
        vec![proxy.addr().to_string()]
    );
    assert_eq!(advertised(direct.inner()), vec![kafka.brokers()]);
    let send = |payload: &'static str| {
        let producer = producer.clone();
        async move {
            producer
                .send(
                    FutureRecord::<(), _>::to("behind").payload(payload),
                    Duration::from_secs(5),
                )
                .await
        }
    };
    send("before").await.unwrap();

    proxy.cut();
    assert!(
        send("during").await.is_err(),
        "produced through a cut proxy"
    );
    assert!(
        tokio::task::block_in_place(|| direct.inner().fetch_metadata(None, Duration::from_secs(5)))
            .is_ok(),
        "a direct client is not behind the proxy"
    );

    proxy.restore();
    let accepted = proxy.accepted();
    let mut again = send("after").await;
    for _ in 0..10 {
        if again.is_ok() {
            break;
        }
        again = send("after").await;
    }
    again.unwrap();
    assert!(
        proxy.accepted() > accepted,
        "the producer reconnected through the proxy"
    );
}
