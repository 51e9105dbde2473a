//! Defaults of the settings more than one binary reads (docs/architecture.md §8.2), defined
//! once: the binaries' clap attributes and the test constructors use these constants, so a
//! changed default cannot leave a copy behind.

/// `SLUICE_DATABASE_URL`: the local stack's PostgreSQL (`deploy/local`).
pub const DATABASE_URL: &str = "postgres://sluice@127.0.0.1:54320/sluice";
/// `SLUICE_KAFKA_BROKERS`: the local stack's Kafka.
pub const KAFKA_BROKERS: &str = "127.0.0.1:19092";
/// `SLUICE_TOPIC_PARTITIONS`: partitions of each topic created at start-up.
pub const TOPIC_PARTITIONS: i32 = 12;
/// `SLUICE_TOPIC_REPLICATION`: replication factor of topics created at start-up.
pub const TOPIC_REPLICATION: i32 = 1;
/// `SLUICE_PARTITION_MONTHS_AHEAD`: month partitions of `event` created ahead.
pub const PARTITION_MONTHS_AHEAD: u32 = 3;
/// `SLUICE_PARTITION_HASH_MODULUS`: tenant-hash partitions of each new month.
pub const PARTITION_HASH_MODULUS: u32 = 8;
