//! `sluice-ingest`: parses flags, starts logs, binds, and runs the collector until SIGTERM.

use anyhow::Context;
use clap::Parser;
use sluice_ingest::Config;
use sluice_schema::runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    runtime::init_tracing(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {} (SLUICE_INGEST_LISTEN)", config.listen))?;
    sluice_ingest::serve(config, listener, runtime::shutdown_signal()).await?;
    Ok(())
}
