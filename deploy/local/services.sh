# Starts the sluice services on the local stack and shows them working. Sourced by `up`.

start_pipeline() {
  say "building sluice (release) into $CARGO_TARGET_DIR"
  (cd "$REPO" && cargo build --release --locked -q --bins) || die "cargo build failed"
  say "the services come with the ingest and writer issues; Kafka and PostgreSQL are up"
}
