//! sluice ingest.
