//! Erasure (docs/operations.md, "Erasure"): `sluice-schema tenant delete` leaves no row of the
//! tenant in any table or partition and touches no other tenant; `sluice-schema erase`
//! removes one person (lead, links, visitors, their events and sessions) and the writer drops
//! their later messages, and those of a deleted tenant, counting them in a metric. Needs the
//! binaries built (`cargo build --workspace --bins`).

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::Utc;
use sluice_schema::ids::{self, Kind};
use sluice_schema::messages::{
    IdentityKind, IdentityMessage, JsonObject, IDENTITY_VERSION, VERSION,
};
use sluice_schema::pii::PiiKeys;
use sluice_schema::seed::{self, SeedConfig};
use sluice_schema::topics::message_key;
use sluice_tests::private::free_port;
use sluice_tests::writer::{
    event, http_get, visitor, wait_all_consumed, wait_for_count, RunningWriter, WriterEnv,
};
use sluice_tests::{bin_path, query_pairs, query_scalar, TestDb};

const KEYS: &str = "t1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const WAIT: Duration = Duration::from_secs(60);

/// Tables holding rows of a tenant, and the column naming it.
const TENANT_TABLES: [(&str, &str); 13] = [
    ("tenant", "id"),
    ("workspace", "tenant_id"),
    ("api_key", "tenant_id"),
    ("visitor", "tenant_id"),
    ("lead", "tenant_id"),
    ("identity_link", "tenant_id"),
    ("session", "tenant_id"),
    ("event", "tenant_id"),
    ("funnel", "tenant_id"),
    ("funnel_version", "tenant_id"),
    ("funnel_step", "tenant_id"),
    ("funnel_step_match", "tenant_id"),
    ("funnel_publication", "tenant_id"),
];

fn schema_cli(db_url: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(bin_path("sluice-schema")?)
        .args(args)
        .env("SLUICE_DATABASE_URL", db_url)
        .env("SLUICE_PII_KEYS", KEYS)
        .env("SLUICE_PII_ACTIVE_KEY", "t1")
        .output()
        .context("running sluice-schema")?;
    if !out.status.success() {
        bail!(
            "sluice-schema {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Commits one event of `tenant` (workspace 1) now; returns how long that took, a measure of
/// the locks a concurrent statement holds.
async fn probe_insert(c: &tokio_postgres::Client, tenant: i64) -> Result<Duration> {
    let t = std::time::Instant::now();
    c.execute(
        "INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, message_id, received_at) \
         VALUES ($1, now(), gen_random_uuid(), 1, 'track', 'probe', now())",
        &[&tenant],
    )
    .await?;
    Ok(t.elapsed())
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// The one count `sql` finds for `tenant` (its `$1`).
async fn count_of(c: &tokio_postgres::Client, sql: &str, tenant: i64) -> Result<i64> {
    Ok(c.query_one(sql, &[&tenant]).await?.get(0))
}

async fn rows_of(c: &tokio_postgres::Client, tenant: i64) -> Result<Vec<(&'static str, i64)>> {
    let mut out = Vec::new();
    for (table, col) in TENANT_TABLES {
        let sql = format!("SELECT count(*) FROM {table} WHERE {col} = $1");
        out.push((table, count_of(c, &sql, tenant).await?));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_delete_removes_every_row_of_the_tenant_in_every_partition_and_no_other(
) -> Result<()> {
    let db = TestDb::migrated().await?;
    let mut c = db.client().await?;
    let keys = PiiKeys::from_env_strings(KEYS, "t1")?;
    let report = seed::run(&mut c, &keys, Utc::now(), &SeedConfig::default()).await?;
    let (gone, kept) = (report.tenants[0], report.tenants[1]);
    // Enough events that the delete takes several batches.
    sluice_schema::partitions::ensure_month(&c, Utc::now().date_naive(), 8).await?;
    c.execute(
        "INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, message_id, received_at) \
         SELECT $1, now() - make_interval(secs => i), gen_random_uuid(), 1, 'track', 'bulk-' || i, now() \
         FROM generate_series(1, 30000) AS i",
        &[&gone],
    )
    .await?;
    let before_gone = rows_of(&c, gone).await?;
    let before_kept = rows_of(&c, kept).await?;
    for (table, n) in &before_gone {
        assert!(*n > 0, "the seed gave the tenant rows in {table}");
    }
    let months = count_of(
        &c,
        "SELECT count(DISTINCT date_trunc('month', occurred_at)) FROM event WHERE tenant_id = $1",
        gone,
    )
    .await?;
    assert!(months >= 2, "events in several month partitions");

    let tnt = ids::encode(Kind::Tenant, gone);
    let (url, arg) = (db.url.clone(), tnt.clone());
    let delete = tokio::task::spawn_blocking(move || schema_cli(&url, &["tenant", "delete", &arg]));
    // Meanwhile another tenant's writes commit as usual: the delete holds row locks only.
    let mut worst = Duration::ZERO;
    let mut probes = 0;
    while !delete.is_finished() {
        worst = worst.max(probe_insert(&c, 424242).await?);
        probes += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = delete.await??;
    eprintln!("{probes} inserts of another tenant during the delete, the slowest {worst:?}");
    assert!(worst < Duration::from_secs(1), "an insert waited {worst:?}");
    c.execute("DELETE FROM event WHERE tenant_id = 424242", &[])
        .await?;
    assert_eq!(
        last_line(&out),
        tnt,
        "the deleted tenant's id on the last line"
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    let event_batches = progress
        .lines()
        .filter(|l| l.contains(": event (event_y") && l.ends_with("rows deleted"))
        .count();
    assert!(
        event_batches >= 6,
        "30,000+ events deleted in batches of 5,000, each shown on stderr: {progress}"
    );

    let after_gone = rows_of(&c, gone).await?;
    assert!(
        after_gone.iter().all(|(_, n)| *n == 0),
        "rows of the deleted tenant left: {after_gone:?}"
    );
    assert_eq!(
        rows_of(&c, kept).await?,
        before_kept,
        "the other tenant untouched"
    );
    let suppressed = count_of(
        &c,
        "SELECT count(*) FROM erasure_suppression WHERE tenant_id = $1 AND kind = 'tenant'",
        gone,
    )
    .await?;
    assert_eq!(
        suppressed, 1,
        "the tenant's tombstone keeps writers from storing it again"
    );
    // Idempotent: running it again (an interrupted delete is finished so) changes nothing.
    let again = schema_cli(&db.url, &["tenant", "delete", &tnt])?;
    assert_eq!(last_line(&again), tnt);
    assert_eq!(rows_of(&c, kept).await?, before_kept);
    Ok(())
}

fn identify(tenant: i64, anon: &str, user: Option<&str>, email: &str, id: &str) -> IdentityMessage {
    let now = Utc::now();
    let mut traits = JsonObject::new();
    traits.insert("email".into(), email.into());
    traits.insert("plan".into(), "pro".into());
    IdentityMessage {
        v: VERSION,
        tenant_id: tenant,
        workspace_id: tenant * 10,
        kind: IdentityKind::Identify,
        message_id: id.into(),
        anonymous_id: Some(anon.into()),
        user_id: user.map(str::to_owned),
        previous_id: None,
        traits,
        context: JsonObject::new(),
        occurred_at: now,
        received_at: now,
        pii: None,
    }
}

async fn metrics(port: u16) -> Result<String> {
    http_get(port, "/metrics").await
}

/// The sum of a counter's series in a scrape.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One person of tenant 1 (anonymous id `p-anon`, user `p-user`, an email) is erased by
/// `how`, another (`q-anon`) is kept, and tenant 2 is deleted; then each sends again. With
/// `sealed`, the later identify comes as today's collectors send it (version 2: the email
/// sealed, matched by the fingerprint the collector made), else as older ones did (plaintext).
async fn erase_and_send_again(how: &[&str], cache_max_entries: usize, sealed: bool) -> Result<()> {
    let env = WriterEnv::new(2).await?;
    let port = free_port()?;
    let mut config = env.config();
    config.pii_args.pii_keys = KEYS.into();
    config.pii_args.pii_active_key = "t1".into();
    config.metrics_listen = ([127, 0, 0, 1], port).into();
    config.suppression_cache_max_entries = cache_max_entries;
    let writer = RunningWriter::start(config);
    let db = env.db.client().await?;
    let now = Utc::now();
    let send = |tenant: i64, anon: &str, id: &str| {
        let mut e = event(tenant, anon, id, now);
        e.user_id = (anon == "p-anon").then(|| "p-user".to_owned());
        e
    };
    env.produce_json(
        &env.topics.identity,
        &message_key(1, Some("p-anon"), None),
        &identify(1, "p-anon", Some("p-user"), "Pat@Example.com", "p-id"),
    )
    .await?;
    env.produce_events(&[
        send(1, "p-anon", "p1"),
        send(1, "p-anon", "p2"),
        send(1, "q-anon", "q1"),
        send(2, "r-anon", "r1"),
    ])
    .await?;
    for (t, a) in [(1, "p-anon"), (1, "q-anon"), (2, "r-anon")] {
        env.produce_json(
            &env.topics.visitor,
            &message_key(t, Some(a), None),
            &visitor(t, a, now, now, 1, "web"),
        )
        .await?;
    }
    wait_for_count(&db, "SELECT count(*) FROM event", 4, WAIT).await?;
    wait_for_count(&db, "SELECT count(*) FROM identity_link", 1, WAIT).await?;
    let (group, topics) = (env.group.clone(), env.topics.clone());
    tokio::task::spawn_blocking(move || wait_all_consumed(&group, &topics)).await??;

    let tnt1 = ids::encode(Kind::Tenant, 1);
    let mut args = vec!["erase", "--tenant", &tnt1];
    args.extend_from_slice(how);
    let out = schema_cli(&env.db.url, &args)?;
    // Two events, the visitor, the session (counted from the events), the link, the lead.
    assert_eq!(
        last_line(&out),
        "6",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    schema_cli(
        &env.db.url,
        &["tenant", "delete", &ids::encode(Kind::Tenant, 2)],
    )?;
    let person = "SELECT (SELECT count(*) FROM event WHERE tenant_id = 1 AND (anonymous_id LIKE 'p-%' OR user_id = 'p-user')) \
                  + (SELECT count(*) FROM visitor WHERE tenant_id = 1 AND anonymous_id LIKE 'p-%') \
                  + (SELECT count(*) FROM session WHERE tenant_id = 1 AND session_id LIKE 's-p-%') \
                  + (SELECT count(*) FROM lead WHERE tenant_id = 1) \
                  + (SELECT count(*) FROM identity_link WHERE tenant_id = 1)";
    let left: i64 = db.query_one(person, &[]).await?.get(0);
    assert_eq!(left, 0, "nothing of the erased person is left");
    let kept: i64 = query_scalar(
        &db,
        "SELECT count(*) FROM event WHERE tenant_id = 1 AND anonymous_id = 'q-anon'",
    )
    .await?;
    assert_eq!(kept, 1, "the other person of the tenant is kept");
    let before = counter(
        &metrics(port).await?,
        "sluice_writer_suppressed_messages_total",
    );

    // Later messages: the same anonymous id, the user id on a new device, the email on a new
    // device with no user id, and the deleted tenant; and the kept person once more.
    let mut new_device = send(1, "p-anon", "p3");
    new_device.anonymous_id = Some("p-other-device".into());
    env.produce_events(&[
        send(1, "p-anon", "p4"),
        new_device,
        send(2, "r-anon", "r2"),
        send(1, "q-anon", "q2"),
    ])
    .await?;
    let mut later = identify(1, "p-third", None, " pat@example.COM ", "p-id-2");
    if sealed {
        let keys = PiiKeys::from_env_strings(KEYS, "t1")?;
        later.pii = keys.seal_identity_traits(&mut later.traits, &[]);
        later.v = IDENTITY_VERSION;
        assert!(later.pii.is_some() && !later.traits.contains_key("email"));
    }
    env.produce_json(
        &env.topics.identity,
        &message_key(1, Some("p-third"), None),
        &later,
    )
    .await?;
    env.produce_json(
        &env.topics.visitor,
        &message_key(1, Some("p-anon"), None),
        &visitor(1, "p-anon", now, now, 1, "web"),
    )
    .await?;
    wait_for_count(
        &db,
        "SELECT count(*) FROM event WHERE tenant_id = 1 AND anonymous_id = 'q-anon'",
        2,
        WAIT,
    )
    .await?;
    let (group, topics) = (env.group.clone(), env.topics.clone());
    tokio::task::spawn_blocking(move || wait_all_consumed(&group, &topics)).await??;
    let left: i64 = db.query_one(person, &[]).await?.get(0);
    assert_eq!(left, 0, "later messages of the erased person are dropped");
    let tenant2: i64 = query_scalar(&db, "SELECT (SELECT count(*) FROM event WHERE tenant_id = 2) + (SELECT count(*) FROM visitor WHERE tenant_id = 2)").await?;
    assert_eq!(
        tenant2, 0,
        "later messages of the deleted tenant are dropped"
    );
    let text = metrics(port).await?;
    let dropped = counter(&text, "sluice_writer_suppressed_messages_total") - before;
    // 3 events, an identify, a visitor message; the sessions of those events are not
    // messages of their own here.
    assert_eq!(dropped, 5.0, "suppressed messages counted:\n{text}");
    let overflow = counter(&text, "sluice_writer_suppression_cache_overflow");
    assert_eq!(overflow, if cache_max_entries < 3 { 1.0 } else { 0.0 });
    writer.stop().await
}

/// By email with the list in memory (the later identify sealed), then by user id with the
/// in-memory list bounded below its size (batches ask the database; the identify plaintext). One after the other: the metrics are the process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_removes_the_person_and_the_writer_drops_their_later_messages() -> Result<()> {
    erase_and_send_again(&["--email", "pat@example.com"], 1_000_000, true).await?;
    erase_and_send_again(&["--user-id", "p-user"], 1, false).await
}

/// By anonymous id, on seeded data: the visitor's lead is found through its link, and every
/// identifier of that person (the lead's user id and fingerprints, its anonymous ids) is put on
/// the suppression list, hashed; nothing of the person is left, everyone else is.
#[tokio::test]
async fn erase_by_anonymous_id_finds_the_lead_and_suppresses_every_identifier_hashed() -> Result<()>
{
    let db = TestDb::migrated().await?;
    let mut c = db.client().await?;
    let keys = PiiKeys::from_env_strings(KEYS, "t1")?;
    let report = seed::run(&mut c, &keys, Utc::now(), &SeedConfig::default()).await?;
    let tenant = report.tenants[0];
    let row = c
        .query_one(
            "SELECT v.anonymous_id, l.id, l.user_id, l.email_fingerprint FROM visitor v \
             JOIN lead l ON l.tenant_id = v.tenant_id AND l.id = v.lead_id \
             WHERE v.tenant_id = $1 ORDER BY v.anonymous_id LIMIT 1",
            &[&tenant],
        )
        .await?;
    let (anon, lead, user, email_fp): (String, i64, String, Vec<u8>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let count = |sql: &'static str| {
        let c = &c;
        let (anon, user) = (anon.clone(), user.clone());
        async move {
            let n: i64 = c
                .query_one(sql, &[&tenant, &anon, &user, &lead])
                .await?
                .get(0);
            anyhow::Ok(n)
        }
    };
    let person = "SELECT (SELECT count(*) FROM event WHERE tenant_id = $1 AND (anonymous_id = $2 OR user_id = $3)) \
                  + (SELECT count(*) FROM session WHERE tenant_id = $1 AND (anonymous_id = $2 OR user_id = $3)) \
                  + (SELECT count(*) FROM visitor WHERE tenant_id = $1 AND (anonymous_id = $2 OR lead_id = $4)) \
                  + (SELECT count(*) FROM identity_link WHERE tenant_id = $1 AND lead_id = $4) \
                  + (SELECT count(*) FROM lead WHERE tenant_id = $1 AND id = $4)";
    // Every row of those tables; `count` binds the person's values, unused here.
    let everyone = "SELECT (SELECT count(*) FROM event) + (SELECT count(*) FROM session) \
                    + (SELECT count(*) FROM visitor) + (SELECT count(*) FROM identity_link) \
                    + (SELECT count(*) FROM lead) + $1::bigint * 0 + length($2) * 0 + length($3) * 0 \
                    + $4::bigint * 0";
    let before = count(person).await?;
    let all_before = count(everyone).await?;
    assert!(before >= 4, "the seeded person has rows: {before}");

    let out = schema_cli(
        &db.url,
        &[
            "erase",
            "--tenant",
            &ids::encode(Kind::Tenant, tenant),
            "--anonymous-id",
            &anon,
        ],
    )?;
    assert_eq!(last_line(&out).parse::<i64>()?, before, "the total deleted");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&ids::encode(Kind::Lead, lead)));
    assert_eq!(count(person).await?, 0, "nothing of the person is left");
    assert_eq!(
        count(everyone).await?,
        all_before - before,
        "no one else was touched"
    );

    let entries: Vec<(String, Vec<u8>)> = query_pairs(
        &c,
        "SELECT kind, fingerprint FROM erasure_suppression WHERE tenant_id = $1 ORDER BY kind",
        &[&tenant],
    )
    .await?;
    use sluice_schema::erase::{id_fingerprint, SuppressionKind};
    let has = |kind: &str, fp: &[u8]| entries.iter().any(|(k, f)| k == kind && f == fp);
    assert!(has(
        "anonymous_id",
        &id_fingerprint(SuppressionKind::AnonymousId, &anon)
    ));
    assert!(has(
        "user_id",
        &id_fingerprint(SuppressionKind::UserId, &user)
    ));
    assert!(has("email", &email_fp));
    assert!(entries.iter().any(|(k, _)| k == "phone"), "{entries:?}");
    // No plaintext: no stored value contains the ids.
    for (_, f) in &entries {
        assert_eq!(f.len(), 32);
        let text = String::from_utf8_lossy(f);
        assert!(!text.contains(&anon) && !text.contains(&user));
    }
    Ok(())
}
