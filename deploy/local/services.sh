# Starts the sluice services on the local stack and shows them working. Sourced by `up`.

BIN_DIR=$CARGO_TARGET_DIR/release

# PII keys of this local stack: random, made once, kept in the state folder (never in the repo).
pii_env() {
  local f=$SLUICE_STATE/pii.env
  if [ ! -f "$f" ]; then
    umask 077
    printf 'SLUICE_PII_KEYS=local1=%s\nSLUICE_PII_ACTIVE_KEY=local1\n' "$(head -c 32 /dev/urandom | base64)" >"$f"
  fi
  set -a; source "$f"; set +a
}

start_pipeline() {
  say "building sluice (release) into $CARGO_TARGET_DIR (the first build takes a few minutes)"
  ensure_build_space
  (cd "$REPO" && cargo build --release --locked -q --bins) || die "cargo build failed"
  export SLUICE_DATABASE_URL=$DATABASE_URL SLUICE_KAFKA_BROKERS=$KAFKA_BROKERS
  pii_env

  "$BIN_DIR/sluice-schema" migrate up >/dev/null || die "migrations failed (see above)"
  "$BIN_DIR/sluice-schema" partitions ensure >/dev/null || die "creating partitions failed (see above)"
  local key_file=$SLUICE_STATE/demo-key
  # The key is only good in the database it was made in: one made anew (its data folder
  # deleted to free disk) is seeded again.
  if [ ! -s "$key_file" ] || [ "$(psql_q "SELECT count(*) FROM api_key WHERE hash = sha256('$(cat "$key_file")'::bytea)")" != 1 ]; then
    say "seeding demo data (two tenants, two months of events, a funnel)"
    "$BIN_DIR/sluice-schema" seed | tail -n 1 >"$key_file" || die "seeding failed (see above)"
  fi
  local key
  key=$(cat "$key_file")

  SLUICE_METRICS_LISTEN=127.0.0.1:$WRITER_METRICS_PORT \
    start_service writer "$WRITER_METRICS_PORT" "$BIN_DIR/sluice-writer"
  SLUICE_INGEST_LISTEN=127.0.0.1:$INGEST_PORT SLUICE_METRICS_LISTEN=127.0.0.1:$INGEST_METRICS_PORT \
    start_service ingest "$INGEST_PORT" "$BIN_DIR/sluice-ingest"
  demo "$key"
}

# Sends a small batch through the collector and waits until the writer has stored it.
demo() {
  local key=$1 run
  run=demo-$(date +%s)-$RANDOM
  say ""
  say "demo: POST /v1/batch with 3 events (anonymousId $run)"
  curl -fsS -u "$key:" -H 'Content-Type: application/json' "http://127.0.0.1:$INGEST_PORT/v1/batch" -d @- <<JSON || die "the collector refused the demo batch"
{"batch": [
  {"type": "page", "anonymousId": "$run", "name": "Home", "properties": {"url": "https://example.com/?utm_source=demo&utm_medium=readme"}},
  {"type": "track", "anonymousId": "$run", "event": "Signed Up", "properties": {"plan": "pro"}},
  {"type": "track", "anonymousId": "$run", "event": "Invited Teammate", "properties": {"count": 2}}
]}
JSON
  say ""
  local i n=0
  for ((i = 0; i < 60; i++)); do
    n=$(psql_q "SELECT count(*) FROM event WHERE anonymous_id = '$run'")
    [ "$n" = 3 ] && break
    sleep 0.5
  done
  [ "$n" = 3 ] || die "the writer stored $n of 3 demo events within 30 s (see $SLUICE_STATE/writer.log)"
  say "stored in PostgreSQL:"
  "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -c \
    "SELECT type, name, occurred_at, properties FROM event WHERE anonymous_id = '$run' ORDER BY occurred_at"
  say "write key:  $key"
  say "collector:  http://127.0.0.1:$INGEST_PORT  (metrics http://127.0.0.1:$INGEST_METRICS_PORT/metrics)"
  say "writer:     metrics http://127.0.0.1:$WRITER_METRICS_PORT/metrics"
  say "database:   $DATABASE_URL"
  say "stop with deploy/local/down"
}

psql_q() {
  "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -tAc "$1"
}
