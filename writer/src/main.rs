//! `sluice-writer`: loads the configuration, starts logging and runs the writer until SIGTERM
//! or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use sluice_schema::runtime;
use sluice_writer::Config;

// Decoding allocates per message, from the consumer thread and the lanes' workers at once;
// under glibc's malloc the collector, which does the same, spent over half its CPU in
// _int_malloc, malloc_consolidate and free (perf). mimalloc's thread-local heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    runtime::init_tracing(config.log_format);
    // One line, no backtrace: the messages say what to fix.
    match sluice_writer::run(config, runtime::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {:#}", anyhow::Error::from(err));
            ExitCode::FAILURE
        }
    }
}
