//! `sluice-writer`: loads the configuration, starts logging and runs the writer until SIGTERM
//! or Ctrl-C.

use clap::Parser;
use sluice_schema::runtime;
use sluice_writer::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    runtime::init_tracing(config.log_format);
    sluice_writer::run(config, runtime::shutdown_signal()).await?;
    Ok(())
}
