//! `sluice-loadtest`: flags and environment in, [`sluice_loadtest::run`] or
//! [`sluice_loadtest::verify`] out. Exit status: 0 success; 1 `verify` found loss or
//! duplicates, or `run` had no request acknowledged; 2 the command could not do its work.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use rdkafka::config::ClientConfig;
use sluice_loadtest::generate::{parse_batch_size, GeneratorConfig, Mix};
use sluice_loadtest::keys::Key;
use sluice_loadtest::run::{new_run_id, Mode, RunConfig};
use sluice_loadtest::verify::VerifyConfig;
use sluice_loadtest::Error;
use sluice_schema::cli::{own_words, DatabaseArgs, KafkaArgs};
use sluice_schema::runtime::{init_tracing, shutdown_signal, LogFormat};
use sluice_schema::topics::Topics;

// The load generator shares the cores of what it measures: it allocates per request, and
// glibc's malloc cost the collector, which does the same, over half its CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator and end-to-end verifier for sluice.
#[derive(Parser)]
#[command(name = "sluice-loadtest", version)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive a collector at a rate (open loop) or flat out (closed loop); record every ack.
    Run(Box<RunArgs>),
    /// Check an ack file against PostgreSQL: nothing lost, nothing twice, how long it took.
    Verify(VerifyArgs),
    /// Serve a bare HTTP server (axum, answers 200, no work): the benchmarks' ceiling.
    BareServer(BareArgs),
    /// Fill `event` and `event_dedup` with millions of rows: a steady state to benchmark on.
    Fill(FillArgs),
    /// Delete the topics of a throwaway pipeline (a benchmark's topic prefix), data and all.
    DropTopics(DropTopicsArgs),
}

#[derive(Args)]
struct DropTopicsArgs {
    /// The prefix the throwaway pipeline ran with (its SLUICE_TOPIC_PREFIX); required and not
    /// empty, so a pipeline's own unprefixed topics cannot be named.
    #[arg(long)]
    prefix: String,
    #[command(flatten)]
    kafka_args: KafkaArgs,
}

#[derive(Args)]
#[command(mut_args(own_words(&[("database_url", "PostgreSQL to fill (migrated)")])))]
struct FillArgs {
    /// Rows to add to `event`, and claims to `event_dedup` (with `--top-up`: rows to have).
    #[arg(long, default_value_t = 20_000_000)]
    rows: i64,
    /// Add only what is missing for `--rows` in the current month of `event` and the last
    /// seven days of `event_dedup` (planner estimates): a second run on the same database
    /// adds little or nothing.
    #[arg(long)]
    top_up: bool,
    #[command(flatten)]
    database_args: DatabaseArgs,
}

#[derive(Args)]
struct BareArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "SLUICE_LOADTEST_BARE_LISTEN",
        default_value = "127.0.0.1:8090"
    )]
    listen: std::net::SocketAddr,
}

#[derive(Args)]
#[command(mut_args(own_words(&[(
    "database_url",
    "PostgreSQL to make tenants in (--create-tenants)"
)])))]
struct RunArgs {
    /// Collector base URL.
    #[arg(
        long,
        env = "SLUICE_LOADTEST_COLLECTOR_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    collector_url: String,
    /// Write key to send with (repeatable; traffic is spread over them zipf-wise, first most).
    // Secrets: `--help` names the variable, never its value.
    #[arg(
        long = "key",
        env = "SLUICE_LOADTEST_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    keys: Vec<String>,
    /// Make N tenants (one workspace and key each) through the schema crate and send with
    /// their keys, in addition to any --key.
    #[arg(long, env = "SLUICE_LOADTEST_CREATE_TENANTS", default_value_t = 0)]
    create_tenants: usize,
    /// PostgreSQL to make tenants in (--create-tenants).
    #[command(flatten)]
    database_args: DatabaseArgs,
    /// Open loop: requests per second, sent on schedule whatever the answers do.
    #[arg(
        long,
        env = "SLUICE_LOADTEST_RATE",
        default_value_t = 100.0,
        conflicts_with = "connections"
    )]
    rate: f64,
    /// Closed loop instead: this many connections, each sending as soon as answered.
    #[arg(long, env = "SLUICE_LOADTEST_CONNECTIONS")]
    connections: Option<usize>,
    /// Open loop: requests in flight at most (waits past it are charged to latency).
    #[arg(long, env = "SLUICE_LOADTEST_MAX_IN_FLIGHT", default_value_t = 4096)]
    max_in_flight: usize,
    /// How long to send, seconds.
    #[arg(long, env = "SLUICE_LOADTEST_DURATION_S", default_value_t = 10.0)]
    duration_s: f64,
    /// Stop after this many requests, if sooner.
    #[arg(long, env = "SLUICE_LOADTEST_REQUESTS")]
    requests: Option<u64>,
    /// Per-request timeout, milliseconds.
    #[arg(long, env = "SLUICE_LOADTEST_TIMEOUT_MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// Seed of the generator: the same seed and settings send the same requests.
    #[arg(long, env = "SLUICE_LOADTEST_SEED", default_value_t = 1)]
    seed: u64,
    /// Messages per request: `20`, or a range `10-30`; `1` sends single calls, not batches.
    #[arg(long, env = "SLUICE_LOADTEST_BATCH_SIZE", default_value = "20", value_parser = |s: &str| parse_batch_size(s).map_err(|e| e.to_string()))]
    batch_size: std::ops::RangeInclusive<usize>,
    /// Weights of the calls.
    #[arg(long, env = "SLUICE_LOADTEST_MIX", default_value = "page=50,track=35,identify=5,pixel=10", value_parser = |s: &str| s.parse::<Mix>().map_err(|e| e.to_string()))]
    mix: Mix,
    /// Zipf exponent of the tenants' traffic shares (0 = even).
    #[arg(long, env = "SLUICE_LOADTEST_ZIPF", default_value_t = 1.1)]
    zipf: f64,
    /// Visitors active at once per tenant.
    #[arg(long, env = "SLUICE_LOADTEST_VISITORS", default_value_t = 1000)]
    visitors_per_tenant: usize,
    /// Prefix of every message id (default: random, so runs never collide).
    #[arg(long, env = "SLUICE_LOADTEST_RUN_ID")]
    run_id: Option<String>,
    /// Where to record acknowledged events for `verify`.
    #[arg(
        long,
        env = "SLUICE_LOADTEST_ACK_FILE",
        default_value = "sluice-loadtest-acks.txt"
    )]
    ack_file: PathBuf,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
#[command(mut_args(own_words(&[("database_url", "PostgreSQL the writer writes to")])))]
struct VerifyArgs {
    /// The ack file `run` wrote.
    #[arg(
        long,
        env = "SLUICE_LOADTEST_ACK_FILE",
        default_value = "sluice-loadtest-acks.txt"
    )]
    ack_file: PathBuf,
    /// PostgreSQL the writer writes to.
    #[command(flatten)]
    database_args: DatabaseArgs,
    /// Follow the ack file while `run` is still writing it (for true ack -> visible latency).
    #[arg(long)]
    follow: bool,
    /// Pause between visibility polls, milliseconds: the latency measurement's resolution.
    #[arg(long, env = "SLUICE_LOADTEST_POLL_INTERVAL_MS", default_value_t = 100)]
    poll_interval_ms: u64,
    /// Time the visibility of one acknowledged event in this many (1: every event). Every
    /// event is still checked for loss and duplicates; timing all of them costs the database
    /// CPU that the writer being measured would otherwise have.
    #[arg(long, env = "SLUICE_LOADTEST_LATENCY_SAMPLE", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    latency_sample: u32,
    /// How long to wait for missing rows after the last ack, seconds.
    #[arg(long, env = "SLUICE_LOADTEST_VERIFY_TIMEOUT_S", default_value_t = 60)]
    timeout_s: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Verify(args) => verify(args).await,
        Command::BareServer(args) => bare_server(args).await,
        Command::Fill(args) => fill(args).await,
        Command::DropTopics(args) => drop_topics(args).await,
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // Our errors carry their causes in their messages already.
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut keys = args
        .keys
        .iter()
        .map(|k| Key::given(k))
        .collect::<Result<Vec<_>, Error>>()?;
    let run_id = args.run_id.unwrap_or_else(new_run_id);
    let collector_url = args.collector_url;
    if args.create_tenants > 0 {
        let url = args.database_args.url()?;
        let client = sluice_loadtest::keys::connect(&url).await?;
        let name_prefix = format!("loadtest-{run_id}");
        let made =
            sluice_loadtest::keys::create_tenants(&client, args.create_tenants, &name_prefix)
                .await?;
        tracing::info!(
            tenants = made.len(),
            "created load-test tenants, workspaces and keys"
        );
        keys.extend(made);
    }
    if !(args.duration_s.is_finite() && args.duration_s > 0.0) {
        anyhow::bail!("--duration-s must be a positive number of seconds");
    }
    let mode = match args.connections {
        Some(connections) => Mode::Closed {
            connections: connections.max(1),
        },
        None => Mode::Open {
            rate_rps: args.rate,
            max_in_flight: args.max_in_flight,
        },
    };
    let config = RunConfig {
        collector_url: collector_url.clone(),
        mode,
        duration: Duration::from_secs_f64(args.duration_s),
        max_requests: args.requests,
        timeout: Duration::from_millis(args.timeout_ms),
        generator: GeneratorConfig {
            seed: args.seed,
            keys: keys.len(),
            zipf_exponent: args.zipf,
            visitors_per_tenant: args.visitors_per_tenant,
            batch_size: args.batch_size,
            mix: args.mix,
        },
        run_id,
        ack_file: Some(args.ack_file),
        progress: !args.quiet,
    };
    let report = sluice_loadtest::run::run(config, keys, shutdown_signal()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if report.requests_acked == 0 {
        eprintln!(
            "error: the collector acknowledged no request (errors: {:?}); is it running at {}, and are the keys valid there?",
            report.errors, collector_url
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let config = VerifyConfig {
        ack_file: args.ack_file,
        database_url: args.database_args.url()?,
        follow: args.follow,
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(1)),
        timeout: Duration::from_secs(args.timeout_s),
        progress: !args.quiet,
        latency_sample: args.latency_sample,
    };
    let report = sluice_loadtest::verify::verify(&config).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn fill(args: FillArgs) -> anyhow::Result<ExitCode> {
    let url = args.database_args.url()?;
    let client = sluice_loadtest::keys::connect(&url).await?;
    let rows = args.rows;
    let progress = |done: i64, s: f64| eprintln!("fill: {done} rows added, {s:.0} s");
    let report = if args.top_up {
        sluice_loadtest::fill::top_up(&client, rows, progress).await?
    } else {
        sluice_loadtest::fill::fill(&client, rows, progress).await?
    };
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

async fn drop_topics(args: DropTopicsArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !args.prefix.is_empty(),
        "--prefix is empty: give the throwaway pipeline's topic prefix (its SLUICE_TOPIC_PREFIX)"
    );
    let topics = Topics::with_prefix(&args.prefix);
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &args.kafka_args.kafka_brokers);
    args.kafka_args.properties()?.apply(&mut client);
    sluice_schema::topics::delete(&client, &topics.all(), Duration::from_secs(30)).await?;
    println!("deleted {}", topics.all().join(" "));
    Ok(ExitCode::SUCCESS)
}

async fn bare_server(args: BareArgs) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot listen on {}: {err}; pick a free --listen address",
                args.listen
            )
        })?;
    tracing::info!(listen = %args.listen, "bare server answering 200");
    sluice_loadtest::bare::serve(listener, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
