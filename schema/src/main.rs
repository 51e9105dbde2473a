//! `sluice-schema`: migrations, partitions, control plane and seed data.
//!
//! Every command that makes something prints its id (or key) alone on the last line of
//! stdout, so scripts can take it with `| tail -n1`; logs go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use chrono::Utc;
use clap::{Parser, Subcommand};
use sluice_schema::ids::{self, Kind};
use sluice_schema::partitions::{self, PartitionConfig};
use sluice_schema::pii::PiiKeys;
use sluice_schema::seed::{self, SeedConfig};
use sluice_schema::{control, db, erase, migrate, runtime, secrets};
use tokio_postgres::Client;

#[derive(Parser, Debug)]
#[command(
    name = "sluice-schema",
    version,
    about = "sluice's database: migrations, partitions, tenants, keys, seed data"
)]
struct Cli {
    /// PostgreSQL URL, libpq style: `sslmode`, `sslrootcert`, `sslcert`, `sslkey` apply.
    #[arg(
        long,
        global = true,
        env = "SLUICE_DATABASE_URL",
        hide_env_values = true,
        default_value = sluice_schema::defaults::DATABASE_URL
    )]
    database_url: String,
    /// File holding the PostgreSQL URL (a mounted Secret); wins over --database-url.
    #[arg(long, global = true, env = "SLUICE_DATABASE_URL_FILE")]
    database_url_file: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "SLUICE_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: runtime::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply, roll back or show the SQL migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Create, list or drop the month partitions of `event`.
    Partitions {
        #[command(subcommand)]
        action: PartitionAction,
    },
    /// Tenants.
    Tenant {
        #[command(subcommand)]
        action: TenantAction,
    },
    /// Workspaces of a tenant.
    Workspace {
        #[command(subcommand)]
        action: WorkspaceAction,
    },
    /// Write keys of a workspace.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Erase one person of a tenant: the lead, its identity links, its visitors and their
    /// events and sessions; writers drop later messages for them (suppression list). Prints
    /// the rows deleted per table, then their total alone on the last line.
    #[command(group(clap::ArgGroup::new("who").required(true).args(["user_id", "email", "anonymous_id"])))]
    Erase {
        /// The tenant (tnt_...).
        #[arg(long)]
        tenant: String,
        /// The person's user id.
        #[arg(long)]
        user_id: Option<String>,
        /// The person's email (matched by fingerprint: needs SLUICE_PII_KEYS).
        #[arg(long)]
        email: Option<String>,
        /// One of the person's anonymous ids.
        #[arg(long)]
        anonymous_id: Option<String>,
        /// PII keys, `id=base64,...`: the first one keys the email fingerprints.
        #[arg(long, env = "SLUICE_PII_KEYS", hide_env_values = true)]
        pii_keys: Option<String>,
        /// Id of the active PII key.
        #[arg(long, env = "SLUICE_PII_ACTIVE_KEY")]
        pii_active_key: Option<String>,
    },
    /// Fill a migrated database with development data (two tenants, two months of events,
    /// a funnel); prints the demo write key alone on the last line.
    Seed {
        /// PII keys, `id=base64,...` (32 bytes each), to seal the seeded emails and phones.
        #[arg(long, env = "SLUICE_PII_KEYS", hide_env_values = true)]
        pii_keys: Option<String>,
        /// File holding the PII keys (a mounted Secret); wins over --pii-keys.
        #[arg(long, env = "SLUICE_PII_KEYS_FILE")]
        pii_keys_file: Option<PathBuf>,
        /// Id of the key new PII is sealed with.
        #[arg(long, env = "SLUICE_PII_ACTIVE_KEY")]
        pii_active_key: Option<String>,
        /// Visitors of the demo tenant (the other tenant gets about a third). Bounded because
        /// the seed is one transaction.
        #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        visitors: u32,
    },
}

#[derive(Subcommand, Debug)]
enum TenantAction {
    /// Create a tenant; prints its id (tnt_...).
    Create {
        /// Display name.
        name: String,
    },
    /// Delete a tenant and every row it owns, in every table and partition, in small
    /// batches (writers carry on); its keys are revoked and writers drop its later
    /// messages. Progress on stderr; prints the tenant's id alone on the last line.
    Delete {
        /// The tenant (tnt_...).
        tenant_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum WorkspaceAction {
    /// Create a workspace; prints its id (ws_...).
    Create {
        /// Owning tenant (tnt_...).
        #[arg(long)]
        tenant: String,
        /// Name, unique within the tenant.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum KeyAction {
    /// Create a write key; prints its id, then the plaintext key (shown once, only its hash
    /// is stored) alone on the last line.
    Create {
        /// Workspace the key writes to (ws_...).
        #[arg(long)]
        workspace: String,
        /// Optional label, e.g. where the key is used.
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke a key (collectors refuse it once their key cache expires); prints its id.
    Revoke {
        /// The key's id (key_...).
        key_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Roll back the newest N applied migrations (default 1).
    Down {
        /// How many to roll back.
        #[arg(default_value_t = 1)]
        steps: usize,
    },
    /// Show each migration and whether it is applied.
    Status,
}

#[derive(Subcommand, Debug)]
enum PartitionAction {
    /// Create the current month and the months ahead, when missing.
    Ensure {
        /// Months to create beyond the current one.
        #[arg(long, env = "SLUICE_PARTITION_MONTHS_AHEAD", default_value_t = sluice_schema::defaults::PARTITION_MONTHS_AHEAD)]
        months_ahead: u32,
        /// Hash leaves per new month (an existing month keeps its own).
        #[arg(long, env = "SLUICE_PARTITION_HASH_MODULUS", default_value_t = sluice_schema::defaults::PARTITION_HASH_MODULUS)]
        hash_modulus: u32,
    },
    /// Detach and drop months older than the newest N (the current month counts as one).
    /// Detaches concurrently, so writers are not held up; an interrupted prune is finished by
    /// the next one.
    Prune {
        /// Months to keep, the current one included.
        #[arg(long)]
        keep_months: u32,
    },
    /// Show months, their leaves, row estimates and sizes.
    List,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    runtime::init_tracing(cli.log_format);
    // The error chain on one line, without a backtrace: these are operator-facing messages
    // that already say what to do.
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let url = secrets::value_or_file(
        &cli.database_url,
        cli.database_url_file.as_deref(),
        "SLUICE_DATABASE_URL_FILE",
    )?;
    let mut client = db::connect(&url).await?;
    match cli.command {
        Command::Migrate { action } => run_migrate(&mut client, action).await,
        Command::Partitions { action } => run_partitions(&mut client, action).await,
        Command::Seed {
            pii_keys,
            pii_keys_file,
            pii_active_key,
            visitors,
        } => {
            let pii_keys = secrets::value_or_file(
                pii_keys.as_deref().unwrap_or_default(),
                pii_keys_file.as_deref(),
                "SLUICE_PII_KEYS_FILE",
            )?;
            // Missing settings go through the same check as malformed ones, whose message
            // says how to make keys.
            let keys = PiiKeys::from_env_strings(
                &pii_keys,
                pii_active_key.as_deref().unwrap_or_default(),
            )?;
            let cfg = SeedConfig {
                visitors,
                ..SeedConfig::default()
            };
            let report = seed::run(&mut client, &keys, Utc::now(), &cfg).await?;
            for id in &report.tenants {
                println!("tenant    {}", ids::encode(Kind::Tenant, *id));
            }
            for key in &report.keys {
                println!(
                    "workspace {} key {}",
                    ids::encode(Kind::Workspace, key.workspace_id),
                    ids::encode(Kind::Key, key.id)
                );
            }
            println!(
                "visitors {} leads {} sessions {} events {} funnel {}",
                report.visitors,
                report.leads,
                report.sessions,
                report.events,
                ids::encode(Kind::Funnel, report.funnel_id)
            );
            let demo = report.keys.first().context("the seed made no key")?;
            println!("{}", demo.plaintext);
            Ok(())
        }
        Command::Tenant {
            action: TenantAction::Create { name },
        } => {
            let id = control::create_tenant(&client, &name).await?;
            println!("{}", ids::encode(Kind::Tenant, id));
            Ok(())
        }
        Command::Tenant {
            action: TenantAction::Delete { tenant_id },
        } => {
            let id = ids::decode(Kind::Tenant, &tenant_id)?;
            let deleted = erase::delete_tenant(&client, id, |table, total| {
                eprintln!("{tenant_id}: {table}: {total} rows deleted");
            })
            .await?;
            for d in &deleted {
                println!("{} {}", d.table, d.rows);
            }
            println!("{tenant_id}");
            Ok(())
        }
        Command::Erase {
            tenant,
            user_id,
            email,
            anonymous_id,
            pii_keys,
            pii_active_key,
        } => {
            let tenant_id = ids::decode(Kind::Tenant, &tenant)?;
            let who = match (user_id, email, anonymous_id) {
                (Some(u), _, _) => erase::Person::UserId(u),
                (_, Some(e), _) => erase::Person::Email(e),
                (_, _, Some(a)) => erase::Person::AnonymousId(a),
                _ => anyhow::bail!("name the person: --user-id, --email or --anonymous-id"),
            };
            let keys = match pii_keys.as_deref().map(str::trim) {
                Some(k) if !k.is_empty() => Some(PiiKeys::from_env_strings(
                    k,
                    pii_active_key.as_deref().unwrap_or_default(),
                )?),
                _ => None,
            };
            let erased =
                erase::erase_person(&client, tenant_id, &who, keys.as_ref(), |table, total| {
                    eprintln!("{tenant}: {table}: {total} rows deleted");
                })
                .await?;
            let leads: Vec<String> = erased
                .leads
                .iter()
                .map(|l| ids::encode(Kind::Lead, *l))
                .collect();
            eprintln!(
                "leads erased: {}; identifiers suppressed: {}",
                if leads.is_empty() {
                    "none".to_owned()
                } else {
                    leads.join(", ")
                },
                erased.suppressed
            );
            for d in &erased.deleted {
                println!("{} {}", d.table, d.rows);
            }
            println!("{}", erased.deleted.iter().map(|d| d.rows).sum::<u64>());
            Ok(())
        }
        Command::Workspace {
            action: WorkspaceAction::Create { tenant, name },
        } => {
            let tenant_id = ids::decode(Kind::Tenant, &tenant)?;
            let id = control::create_workspace(&client, tenant_id, &name).await?;
            println!("{}", ids::encode(Kind::Workspace, id));
            Ok(())
        }
        Command::Key {
            action: KeyAction::Create { workspace, name },
        } => {
            let workspace_id = ids::decode(Kind::Workspace, &workspace)?;
            let key = control::create_key(&client, workspace_id, name.as_deref()).await?;
            eprintln!("the key is shown once below; only its hash is stored");
            println!("{}", ids::encode(Kind::Key, key.id));
            println!("{}", key.plaintext);
            Ok(())
        }
        Command::Key {
            action: KeyAction::Revoke { key_id },
        } => {
            let id = ids::decode(Kind::Key, &key_id)?;
            if !control::revoke_key(&client, id).await? {
                eprintln!("{key_id} was revoked already");
            }
            println!("{key_id}");
            Ok(())
        }
    }
}

async fn run_migrate(client: &mut Client, action: MigrateAction) -> Result<()> {
    match action {
        MigrateAction::Up => {
            let applied = migrate::up(client).await?;
            for m in &applied {
                println!("applied {:04} {} ({} ms)", m.version, m.name, m.duration_ms);
            }
            let current = migrate::MIGRATIONS.last().map_or(0, |m| m.version);
            if applied.is_empty() {
                println!("up to date");
            }
            println!("{current:04}");
        }
        MigrateAction::Down { steps } => {
            let done = migrate::down(client, steps).await?;
            for m in &done {
                println!(
                    "rolled back {:04} {} ({} ms)",
                    m.version, m.name, m.duration_ms
                );
            }
            let now_at = migrate::status(client)
                .await?
                .iter()
                .filter(|s| s.applied_at.is_some())
                .map(|s| s.version)
                .max()
                .unwrap_or(0);
            println!("{now_at:04}");
        }
        MigrateAction::Status => {
            let status = migrate::status(client).await?;
            for s in &status {
                let state = match (&s.applied_at, s.modified, s.unknown) {
                    (_, _, true) => "applied, UNKNOWN to this build".to_owned(),
                    (Some(at), true, _) => format!("applied {at}, FILE EDITED since"),
                    (Some(at), false, _) => format!("applied {at}"),
                    (None, _, _) => "pending".to_owned(),
                };
                println!("{:04} {:<16} {state}", s.version, s.name);
            }
            if status.iter().any(|s| s.modified || s.unknown) {
                anyhow::bail!("the database and this build disagree (see above): restore edited files, or run a matching sluice-schema");
            }
        }
    }
    Ok(())
}

async fn run_partitions(client: &mut Client, action: PartitionAction) -> Result<()> {
    match action {
        PartitionAction::Ensure {
            months_ahead,
            hash_modulus,
        } => {
            let cfg = PartitionConfig {
                hash_modulus,
                months_ahead,
            };
            for m in partitions::ensure_ahead(client, Utc::now(), &cfg).await? {
                println!(
                    "{} {}",
                    m.table,
                    if m.created { "created" } else { "exists" }
                );
            }
        }
        PartitionAction::Prune { keep_months } => {
            let dropped = partitions::prune(client, Utc::now(), keep_months).await?;
            for table in &dropped {
                println!("dropped {table}");
            }
            println!("{}", dropped.len());
        }
        PartitionAction::List => {
            for month in partitions::list(client).await? {
                let rows: f64 = month.leaves.iter().map(|l| l.estimated_rows.max(0.0)).sum();
                let bytes: i64 = month.leaves.iter().map(|l| l.total_bytes).sum();
                println!(
                    "{} {} leaves={} rows~{rows:.0} bytes={bytes}",
                    month.table,
                    month.bounds,
                    month.leaves.len()
                );
                for leaf in &month.leaves {
                    println!(
                        "  {} {} rows~{:.0} bytes={}",
                        leaf.table,
                        leaf.bounds,
                        leaf.estimated_rows.max(0.0),
                        leaf.total_bytes
                    );
                }
            }
        }
    }
    Ok(())
}
