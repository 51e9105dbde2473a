//! `sluice-schema`: migrations, partitions, control plane and seed data.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "sluice-schema",
    version,
    about = "sluice's database: migrations, partitions, tenants, keys, seed data"
)]
struct Cli {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "SLUICE_DATABASE_URL",
        default_value = "postgres://sluice@127.0.0.1:54320/sluice"
    )]
    database_url: String,
}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("not implemented yet")
}
