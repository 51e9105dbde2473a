//! `sluice-ingest`: parses flags, starts logs, binds, and runs the collector until SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sluice_ingest::Config;
use sluice_schema::runtime;

// glibc's malloc took more than half of the collector's CPU under load (perf: _int_malloc,
// malloc_consolidate and free above its own code); mimalloc's thread-local heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // One line, no backtrace: the messages say what to fix.
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let config = Config::parse();
    runtime::init_tracing(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {} (SLUICE_INGEST_LISTEN)", config.listen))?;
    sluice_ingest::serve(config, listener, runtime::shutdown_signal()).await?;
    Ok(())
}
