//! The `sluice-schema` command line, as scripts use it: each command that makes something
//! prints its id or key alone on the last line of stdout, and mistakes exit non-zero with a
//! message that says what is wrong. Needs the binary built (`cargo build -p sluice-schema`;
//! `deploy/local/test` builds all binaries).

use std::process::{Command, Output};

use sluice_schema::ids::{self, Kind};
use sluice_tests::{bin_path, TestDb};

fn run(db: &TestDb, args: &[&str], pii: bool) -> Output {
    let mut cmd = Command::new(bin_path("sluice-schema").expect("sluice-schema is built"));
    cmd.args(args)
        .env("SLUICE_DATABASE_URL", &db.url)
        .env_remove("SLUICE_PII_KEYS")
        .env_remove("SLUICE_PII_ACTIVE_KEY");
    if pii {
        cmd.env(
            "SLUICE_PII_KEYS",
            "t1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
        )
        .env("SLUICE_PII_ACTIVE_KEY", "t1");
    }
    cmd.output().expect("run sluice-schema")
}

/// The last stdout line of a command that must succeed.
fn last_line(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().last().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn commands_print_what_they_made_on_the_last_line() {
    let db = TestDb::new().await.unwrap();
    // The newest migration's number, after the first run and after the second (nothing new).
    let migrations = sluice_schema::migrate::MIGRATIONS;
    let newest = format!("{:04}", migrations.last().map_or(0, |m| m.version));
    assert_eq!(last_line(&run(&db, &["migrate", "up"], false)), newest);
    assert_eq!(last_line(&run(&db, &["migrate", "up"], false)), newest);
    let status = String::from_utf8(run(&db, &["migrate", "status"], false).stdout).unwrap();
    assert_eq!(
        status.lines().filter(|l| l.contains("applied")).count(),
        migrations.len(),
        "{status}"
    );

    let tenant = last_line(&run(&db, &["tenant", "create", "Acme"], false));
    let tenant_id = ids::decode(Kind::Tenant, &tenant).unwrap();
    let ws = last_line(&run(
        &db,
        &["workspace", "create", "--tenant", &tenant, "web"],
        false,
    ));
    let ws_id = ids::decode(Kind::Workspace, &ws).unwrap();
    let out = run(
        &db,
        &["key", "create", "--workspace", &ws, "--name", "site"],
        false,
    );
    let key = last_line(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key_id = ids::decode(Kind::Key, stdout.lines().next().unwrap()).unwrap();
    assert!(sluice_schema::apikey::prefix_of(&key).is_some(), "{key}");

    let client = db.client().await.unwrap();
    let row = client
        .query_one(
            "SELECT tenant_id, workspace_id, hash FROM api_key WHERE id = $1",
            &[&key_id],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (tenant_id, ws_id)
    );
    assert!(sluice_schema::apikey::verify(
        &key,
        &row.get::<_, Vec<u8>>(2)
    ));

    let key_ext = ids::encode(Kind::Key, key_id);
    assert_eq!(
        last_line(&run(&db, &["key", "revoke", &key_ext], false)),
        key_ext
    );
    let revoked: bool = client
        .query_one(
            "SELECT revoked_at IS NOT NULL FROM api_key WHERE id = $1",
            &[&key_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(revoked);

    let list = run(
        &db,
        &[
            "partitions",
            "ensure",
            "--months-ahead",
            "1",
            "--hash-modulus",
            "2",
        ],
        false,
    );
    assert!(list.status.success());
    let listed = String::from_utf8(run(&db, &["partitions", "list"], false).stdout).unwrap();
    assert_eq!(
        listed.lines().filter(|l| l.starts_with("event_y")).count(),
        2,
        "{listed}"
    );

    let seeded = run(&db, &["seed", "--visitors", "12"], true);
    let demo = last_line(&seeded);
    let prefix = sluice_schema::apikey::prefix_of(&demo).expect("the seed prints a key last");
    let found: i64 = client
        .query_one("SELECT count(*) FROM api_key WHERE prefix = $1", &[&prefix])
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, 1);
}

#[tokio::test]
async fn mistakes_exit_non_zero_and_say_what_is_wrong() {
    let db = TestDb::migrated().await.unwrap();
    let cases: [(&[&str], bool, &str); 5] = [
        (
            &["workspace", "create", "--tenant", "ws_1ab", "x"],
            false,
            "expected an id starting with tnt_",
        ),
        (
            &["workspace", "create", "--tenant", "tnt_zz00", "x"],
            false,
            "check characters do not match",
        ),
        (
            &["key", "revoke", &ids::encode(Kind::Key, 99)],
            false,
            "not found",
        ),
        (&["seed"], false, "SLUICE_PII_KEYS"),
        (
            &["partitions", "prune", "--keep-months", "0"],
            false,
            "keep_months must be at least 1",
        ),
    ];
    for (args, pii, expected) in cases {
        let out = run(&db, args, pii);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("stack backtrace"), "{args:?}: {stderr}");
    }
}
