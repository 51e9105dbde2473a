//! Development data: two tenants with workspaces and keys, visitors, leads (PII sealed),
//! sessions and events over the previous and the current month, and a funnel with a
//! published and a draft version. Deterministic for a given `now` (seeded RNG), written in
//! one transaction so a failed seed leaves nothing behind.

use chrono::{DateTime, Duration, Months, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

use crate::control::{self, CreatedKey};
use crate::messages::event_id;
use crate::partitions::{self, month_start, PartitionConfig};
use crate::pii::PiiKeys;
use crate::SchemaError;

/// How much to make. The defaults give a few thousand events: enough to look real in a
/// dashboard, small enough to seed in seconds.
#[derive(Debug, Clone, Copy)]
pub struct SeedConfig {
    /// Visitors of the first (larger) tenant; the second gets a third of it.
    pub visitors: u32,
    /// RNG seed: the same seed and `now` give the same data.
    pub rng_seed: u64,
    /// Hash leaves of the months the seed creates.
    pub hash_modulus: u32,
}

impl Default for SeedConfig {
    fn default() -> Self {
        SeedConfig {
            visitors: 150,
            rng_seed: 7,
            hash_modulus: PartitionConfig::default().hash_modulus,
        }
    }
}

/// What the seed made.
#[derive(Debug, Clone)]
pub struct SeedReport {
    /// Tenant ids, first the demo tenant.
    pub tenants: Vec<i64>,
    /// Workspace ids.
    pub workspaces: Vec<i64>,
    /// Keys made, one per workspace; the first is the demo key (workspace `web` of the first
    /// tenant).
    pub keys: Vec<CreatedKey>,
    /// Rows per table.
    pub visitors: u64,
    /// Leads made.
    pub leads: u64,
    /// Sessions made.
    pub sessions: u64,
    /// Events made.
    pub events: u64,
    /// The seeded funnel.
    pub funnel_id: i64,
}

struct Ws {
    tenant_id: i64,
    workspace_id: i64,
    mobile: bool,
}

const CAMPAIGNS: &[(&str, &str, &str)] = &[
    ("google", "cpc", "brand-search"),
    ("newsletter", "email", "spring-launch"),
    ("twitter", "social", "founder-thread"),
    ("partner-blog", "referral", "integration-guide"),
];
const PAGES: &[(&str, &str)] = &[
    ("/", "Home"),
    ("/pricing", "Pricing"),
    ("/features", "Features"),
    ("/blog/ingest-at-scale", "Ingesting events at scale"),
    ("/docs/quickstart", "Quickstart"),
    ("/signup", "Sign up"),
];
const SCREENS: &[&str] = &["Home", "Dashboard", "Settings", "Paywall"];
const DEVICES: &[(&str, &str, &str)] = &[
    ("desktop", "macOS", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15"),
    ("desktop", "Windows", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"),
    ("mobile", "iOS", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"),
    ("mobile", "Android", "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Mobile Safari/537.36"),
];
const GEOS: &[(&str, &str, &str)] = &[
    ("US", "San Francisco", "America/Los_Angeles"),
    ("DE", "Berlin", "Europe/Berlin"),
    ("GB", "London", "Europe/London"),
    ("BR", "São Paulo", "America/Sao_Paulo"),
    ("JP", "Tokyo", "Asia/Tokyo"),
];
const FIRST_NAMES: &[&str] = &[
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Radia", "Linus",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Perlman", "Torvalds",
];
const PLANS: &[&str] = &["free", "pro", "team"];
const COMPANIES: &[&str] = &["Initech", "Hooli", "Umbrella", "Stark Industries"];

/// Seeds the database (migrated already) with development data dated up to `now`.
pub async fn run(
    client: &mut Client,
    keys: &PiiKeys,
    now: DateTime<Utc>,
    cfg: &SeedConfig,
) -> Result<SeedReport, SchemaError> {
    // Months first, outside the data transaction: they are shared state other processes may
    // be creating too, and they are harmless to keep if the seed fails.
    let previous = month_start(now.date_naive())
        .checked_sub_months(Months::new(1))
        .unwrap_or_else(|| month_start(now.date_naive()));
    partitions::ensure_month(client, previous, cfg.hash_modulus).await?;
    partitions::ensure_month(client, now.date_naive(), cfg.hash_modulus).await?;

    let tx = client
        .transaction()
        .await
        .map_err(SchemaError::db("starting the seed transaction"))?;
    let mut rng = StdRng::seed_from_u64(cfg.rng_seed);
    let since = partitions::month_bounds(previous).0;

    let acme = control::create_tenant(&tx, "Acme Analytics").await?;
    let globex = control::create_tenant(&tx, "Globex Retail").await?;
    let mut report = SeedReport {
        tenants: vec![acme, globex],
        workspaces: Vec::new(),
        keys: Vec::new(),
        visitors: 0,
        leads: 0,
        sessions: 0,
        events: 0,
        funnel_id: 0,
    };
    let mut spaces = Vec::new();
    for (tenant_id, name, mobile, share) in [
        (acme, "web", false, 3),
        (acme, "ios-app", true, 1),
        (globex, "storefront", false, 1),
    ] {
        let workspace_id = control::create_workspace(&tx, tenant_id, name).await?;
        let key = control::create_key(&tx, workspace_id, Some(&format!("seed: {name}"))).await?;
        report.workspaces.push(workspace_id);
        report.keys.push(key);
        let ws = Ws {
            tenant_id,
            workspace_id,
            mobile,
        };
        let visitors = (cfg.visitors * share / 3).max(1);
        spaces.push((ws, visitors));
    }

    for (ws, visitors) in &spaces {
        for n in 0..*visitors {
            seed_visitor(&tx, keys, &mut rng, ws, n, since, now, &mut report).await?;
        }
    }
    report.funnel_id = seed_funnel(&tx, acme, report.workspaces[0]).await?;
    tx.commit()
        .await
        .map_err(SchemaError::db("committing the seed"))?;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn seed_visitor(
    tx: &impl GenericClient,
    keys: &PiiKeys,
    rng: &mut StdRng,
    ws: &Ws,
    n: u32,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    report: &mut SeedReport,
) -> Result<(), SchemaError> {
    let span = (now - since).num_seconds().max(7200);
    let anonymous_id = Uuid::from_u128(rng.random()).to_string();
    let (device_type, os, user_agent) = DEVICES[if ws.mobile {
        2 + rng.random_range(0..2)
    } else {
        rng.random_range(0..DEVICES.len())
    }];
    let (country, city, timezone) = GEOS[rng.random_range(0..GEOS.len())];
    let campaign = CAMPAIGNS[rng.random_range(0..CAMPAIGNS.len())];
    let utm = json!({"source": campaign.0, "medium": campaign.1, "campaign": campaign.2});
    let referrer = format!("https://{}.example/", campaign.0);
    let identified = rng.random_ratio(3, 10);
    let user_id = identified.then(|| format!("user-{}-{n}", ws.workspace_id));
    let bot = rng.random_ratio(1, 40);

    let sessions = rng.random_range(1..=3);
    let mut first_seen = now;
    let mut last_seen = since;
    let mut visitor_events = 0i64;
    let mut first_landing = String::new();
    for s in 0..sessions {
        let started = since + Duration::seconds(rng.random_range(0..span - 3600));
        let session_id = format!("{anonymous_id}-s{s}");
        let mut at = started;
        let mut events = 0i64;
        let mut pages = 0i64;
        let count = rng.random_range(2..=8);
        let mut landing = None;
        for e in 0..count {
            at += Duration::seconds(rng.random_range(5..240));
            let (kind, name, properties) = if ws.mobile {
                if e % 3 == 2 {
                    (
                        "track",
                        "Button Clicked".to_owned(),
                        json!({"button": "upgrade", "screen": "Paywall"}),
                    )
                } else {
                    let screen = SCREENS[rng.random_range(0..SCREENS.len())];
                    ("screen", screen.to_owned(), json!({"name": screen}))
                }
            } else if e > 0 && rng.random_ratio(1, 4) {
                let name = ["Signed Up", "Trial Started", "Subscription Purchased"]
                    [rng.random_range(0..3)];
                let plan = PLANS[rng.random_range(0..PLANS.len())];
                (
                    "track",
                    name.to_owned(),
                    json!({"plan": plan, "revenue": if name == "Subscription Purchased" { 49.0 } else { 0.0 }}),
                )
            } else {
                let (path, title) = PAGES[if e == 0 {
                    rng.random_range(0..3)
                } else {
                    rng.random_range(0..PAGES.len())
                }];
                let url = format!("https://www.acme.example{path}?utm_source={}", campaign.0);
                landing.get_or_insert_with(|| url.clone());
                pages += 1;
                (
                    "page",
                    title.to_owned(),
                    json!({"path": path, "url": url, "title": title, "referrer": referrer}),
                )
            };
            if kind == "screen" {
                pages += 1;
            }
            let message_id = format!("seed-{}-{n}-{s}-{e}", ws.workspace_id);
            let context = json!({
                "userAgent": user_agent,
                "locale": "en-US",
                "timezone": timezone,
                "library": {"name": if ws.mobile { "analytics-ios" } else { "analytics.js" }, "version": "5.2.0"},
                "campaign": utm,
            });
            tx.execute(
                "INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, name, anonymous_id,
                                    user_id, session_id, message_id, received_at, sent_at, original_timestamp,
                                    properties, context, ip, user_agent, bot)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $2, $2, $2, $11, $12, $13::text::inet, $14, $15)",
                &[
                    &ws.tenant_id, &at, &event_id(ws.tenant_id, &message_id), &ws.workspace_id, &kind, &name,
                    &anonymous_id, &user_id, &session_id, &message_id, &properties, &context,
                    &format!("203.0.113.{}", rng.random_range(1..255)), &user_agent, &bot,
                ],
            )
            .await
            .map_err(SchemaError::db("seeding an event"))?;
            events += 1;
        }
        let device = json!({"type": device_type, "os": os, "userAgent": user_agent});
        let geo = json!({"country": country, "city": city, "timezone": timezone});
        tx.execute(
            "INSERT INTO session (tenant_id, session_id, workspace_id, anonymous_id, user_id, started_at,
                                  last_seen_at, event_count, page_count, utm, referrer, landing_page, device, geo)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            &[
                &ws.tenant_id, &session_id, &ws.workspace_id, &anonymous_id, &user_id, &started, &at, &events,
                &pages, &utm, &referrer, &landing, &device, &geo,
            ],
        )
        .await
        .map_err(SchemaError::db("seeding a session"))?;
        if started < first_seen {
            first_seen = started;
            first_landing = landing.unwrap_or_default();
        }
        last_seen = last_seen.max(at);
        visitor_events += events;
        report.sessions += 1;
        report.events += events as u64;
    }

    let lead_id = match &user_id {
        Some(uid) => {
            Some(seed_lead(tx, keys, rng, ws, uid, &anonymous_id, first_seen, last_seen).await?)
        }
        None => None,
    };
    if lead_id.is_some() {
        report.leads += 1;
    }
    tx.execute(
        "INSERT INTO visitor (tenant_id, anonymous_id, workspace_id, user_id, first_seen_at, last_seen_at,
                              event_count, first_utm, first_referrer, first_landing_page, user_agent, bot, lead_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULLIF($10, ''), $11, $12, $13)",
        &[
            &ws.tenant_id, &anonymous_id, &ws.workspace_id, &user_id, &first_seen, &last_seen, &visitor_events,
            &utm, &referrer, &first_landing, &user_agent, &bot, &lead_id,
        ],
    )
    .await
    .map_err(SchemaError::db("seeding a visitor"))?;
    report.visitors += 1;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn seed_lead(
    tx: &impl GenericClient,
    keys: &PiiKeys,
    rng: &mut StdRng,
    ws: &Ws,
    user_id: &str,
    anonymous_id: &str,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
) -> Result<i64, SchemaError> {
    let first = FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())];
    let last = LAST_NAMES[rng.random_range(0..LAST_NAMES.len())];
    let email = format!(
        "{}.{}+{user_id}@example.com",
        first.to_lowercase(),
        last.to_lowercase()
    );
    let phone = format!("+1 415 555 {:04}", rng.random_range(0..10_000));
    let sealed_email = keys.encrypt(email.as_bytes());
    let sealed_phone = keys.encrypt(phone.as_bytes());
    let traits: Value = json!({
        "name": format!("{first} {last}"),
        "plan": PLANS[rng.random_range(0..PLANS.len())],
        "company": COMPANIES[rng.random_range(0..COMPANIES.len())],
    });
    let row = tx
        .query_one(
            "INSERT INTO lead (tenant_id, workspace_id, user_id, email_ciphertext, phone_ciphertext, pii_key_id,
                               email_fingerprint, phone_fingerprint, traits, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
            &[
                &ws.tenant_id, &ws.workspace_id, &user_id, &sealed_email.ciphertext, &sealed_phone.ciphertext,
                &sealed_email.key_id, &keys.fingerprint_email(&email).map(Vec::from),
                &keys.fingerprint_phone(&phone).map(Vec::from), &traits, &first_seen, &last_seen,
            ],
        )
        .await
        .map_err(SchemaError::db("seeding a lead"))?;
    let lead_id: i64 = row.get(0);
    tx.execute(
        "INSERT INTO identity_link (tenant_id, anonymous_id, lead_id, kind, first_seen_at, last_seen_at)
         VALUES ($1, $2, $3, 'identify', $4, $5)",
        &[&ws.tenant_id, &anonymous_id, &lead_id, &first_seen, &last_seen],
    )
    .await
    .map_err(SchemaError::db("seeding an identity link"))?;
    Ok(lead_id)
}

/// The signup funnel: version 1 published, version 2 a draft adding a trial step.
async fn seed_funnel(
    tx: &impl GenericClient,
    tenant_id: i64,
    workspace_id: i64,
) -> Result<i64, SchemaError> {
    let funnel_id: i64 = tx
        .query_one(
            "INSERT INTO funnel (tenant_id, workspace_id, name, description)
             VALUES ($1, $2, 'Signup to paid', 'Landing page to first payment') RETURNING id",
            &[&tenant_id, &workspace_id],
        )
        .await
        .map_err(SchemaError::db("seeding the funnel"))?
        .get(0);
    let landing = json!({"event_type": "page", "where": [{"field": "properties.path", "op": "in", "value": ["/", "/features"]}]});
    let pricing = json!({"event_type": "page", "where": [{"field": "properties.path", "op": "starts_with", "value": "/pricing"}]});
    let signup = json!({"event_type": "track", "name": "Signed Up"});
    let signup_page = json!({"event_type": "page", "where": [{"field": "properties.path", "op": "eq", "value": "/signup"}]});
    let trial = json!({"event_type": "track", "name": "Trial Started"});
    let paid = json!({"event_type": "track", "name": "Subscription Purchased",
                      "where": [{"field": "properties.plan", "op": "in", "value": ["pro", "team"]}]});
    let v1: Vec<(&str, Vec<&Value>)> = vec![
        ("Landing", vec![&landing]),
        ("Pricing", vec![&pricing]),
        ("Signed up", vec![&signup, &signup_page]),
        ("Paid", vec![&paid]),
    ];
    let v2: Vec<(&str, Vec<&Value>)> = vec![
        ("Landing", vec![&landing]),
        ("Pricing", vec![&pricing]),
        ("Signed up", vec![&signup, &signup_page]),
        ("Trial", vec![&trial]),
        ("Paid", vec![&paid]),
    ];
    for (version, steps) in [(1i32, v1), (2, v2)] {
        tx.execute(
            "INSERT INTO funnel_version (tenant_id, funnel_id, version, conversion_window_seconds)
             VALUES ($1, $2, $3, 1209600)",
            &[&tenant_id, &funnel_id, &version],
        )
        .await
        .map_err(SchemaError::db("seeding a funnel version"))?;
        for (i, (name, rules)) in steps.iter().enumerate() {
            let position = i as i32 + 1;
            tx.execute(
                "INSERT INTO funnel_step (tenant_id, funnel_id, version, position, name) VALUES ($1, $2, $3, $4, $5)",
                &[&tenant_id, &funnel_id, &version, &position, name],
            )
            .await
            .map_err(SchemaError::db("seeding a funnel step"))?;
            for (j, rule) in rules.iter().enumerate() {
                tx.execute(
                    "INSERT INTO funnel_step_match (tenant_id, funnel_id, version, position, ordinal, rule)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&tenant_id, &funnel_id, &version, &position, &(j as i32 + 1), rule],
                )
                .await
                .map_err(SchemaError::db("seeding a funnel rule"))?;
            }
        }
        if version == 1 {
            tx.execute(
                "SELECT funnel_publish($1, $2, $3, 'seed')",
                &[&tenant_id, &funnel_id, &version],
            )
            .await
            .map_err(SchemaError::db("publishing the seeded funnel"))?;
        }
    }
    Ok(funnel_id)
}
