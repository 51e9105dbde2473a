# Shared by deploy/local/{up,down,status,test}: where things live, and how to start and stop
# the real parts (Apache Kafka in KRaft mode, PostgreSQL 15) on one machine without containers.
# Source it; do not run it.
#
# Everything is overridable from the environment. SLUICE_PROFILE picks a set of ports and a
# state folder, so the test suite's stack (profile `test`) never meets the demo stack (`dev`).

set -euo pipefail

DEPLOY_LOCAL=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$DEPLOY_LOCAL/../.." && pwd)

SLUICE_PROFILE=${SLUICE_PROFILE:-dev}
case "$SLUICE_PROFILE" in
  dev)  _pg=54320; _kafka=19092; _ctl=19093; _ingest=8080; _ingest_m=9464; _writer_m=9465 ;;
  test) _pg=54330; _kafka=19192; _ctl=19193; _ingest=8180; _ingest_m=9564; _writer_m=9565 ;;
  *) echo "SLUICE_PROFILE must be dev or test, not '$SLUICE_PROFILE'" >&2; exit 2 ;;
esac

# PostgreSQL refuses to run as root, and its server user must reach the data folder: root's
# state therefore lives under /var/lib, everyone else's under their home.
if [ "$(id -u)" = 0 ]; then _state_root=/var/lib/sluice; else _state_root=${XDG_DATA_HOME:-$HOME/.local/share}/sluice; fi
SLUICE_STATE=${SLUICE_STATE:-$_state_root/$SLUICE_PROFILE}
SLUICE_CACHE=${SLUICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_PORT=${SLUICE_PG_PORT:-$_pg}
PG_DATA=$SLUICE_STATE/postgres
PG_LOG=$SLUICE_STATE/postgres.log
PG_USER=sluice
PG_DB=sluice
# Optional TLS-only PostgreSQL (the connectivity tests): a folder holding server.crt and
# server.key, and the password of user sluice. With them the cluster has ssl=on, pg_hba
# allows only hostssl with SCRAM passwords, and plain TCP is refused.
PG_SSL_DIR=${SLUICE_PG_SSL_DIR:-}
PG_PASSWORD=${SLUICE_PG_PASSWORD:-}

KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$DEPLOY_LOCAL/pom.xml")
KAFKA_HOME=$SLUICE_CACHE/kafka-$KAFKA_VERSION
KAFKA_PORT=${SLUICE_KAFKA_PORT:-$_kafka}
KAFKA_CONTROLLER_PORT=${SLUICE_KAFKA_CONTROLLER_PORT:-$_ctl}
KAFKA_HEAP=${SLUICE_KAFKA_HEAP:-512m}
KAFKA_DIR=$SLUICE_STATE/kafka
KAFKA_LOG=$SLUICE_STATE/kafka.log
KAFKA_PID=$SLUICE_STATE/kafka.pid
# An optional second client listener, for fault tests that put a TCP proxy between a client and
# the broker. A Kafka client connects to its bootstrap address first, then to the address the
# broker advertises, so a proxy in front of the one listener would be bypassed. The broker
# answers each listener's clients with that listener's advertised address: clients that
# bootstrap through a proxy forwarding to KAFKA_PROXIED_PORT are told the proxy's address and
# stay behind it. The broker itself and direct clients keep the first listener, so cutting the
# proxy cuts only the clients behind it.
KAFKA_PROXIED_PORT=${SLUICE_KAFKA_PROXIED_PORT:-}
KAFKA_PROXIED_ADVERTISED=${SLUICE_KAFKA_PROXIED_ADVERTISED:-}
# An optional SASL_SSL client listener (the connectivity tests): its port, a PEM file with the
# broker's unencrypted PKCS#8 key and certificate chain, PLAIN users as a JAAS fragment
# (`user_NAME="PASSWORD" ...`), and SCRAM users for the storage format, each an --add-scram
# argument (`SCRAM-SHA-256=[name=NAME,password=PASSWORD]`), separated by spaces.
KAFKA_SASL_SSL_PORT=${SLUICE_KAFKA_SASL_SSL_PORT:-}
KAFKA_SSL_KEYSTORE_PEM=${SLUICE_KAFKA_SSL_KEYSTORE_PEM:-}
KAFKA_PLAIN_USERS=${SLUICE_KAFKA_PLAIN_USERS:-}
KAFKA_SCRAM_USERS=${SLUICE_KAFKA_SCRAM_USERS:-}
# With it, also an SSL listener that requires client certificates signed by the CA in
# SLUICE_KAFKA_SSL_TRUSTSTORE_PEM (mutual TLS, same keystore).
KAFKA_SSL_PORT=${SLUICE_KAFKA_SSL_PORT:-}
KAFKA_SSL_TRUSTSTORE_PEM=${SLUICE_KAFKA_SSL_TRUSTSTORE_PEM:-}
# One node of a cluster (the replication tests run three): its id, every controller as
# `id@host:port,...`, the cluster id all nodes are formatted with, and the replicas of the
# internal topics (consumer offsets: a group must outlive a broker). One node by default.
KAFKA_NODE_ID=${SLUICE_KAFKA_NODE_ID:-1}
KAFKA_QUORUM_VOTERS=${SLUICE_KAFKA_QUORUM_VOTERS:-1@127.0.0.1:$KAFKA_CONTROLLER_PORT}
KAFKA_CLUSTER_ID=${SLUICE_KAFKA_CLUSTER_ID:-}
KAFKA_INTERNAL_REPLICATION=${SLUICE_KAFKA_INTERNAL_REPLICATION:-1}

INGEST_PORT=${SLUICE_INGEST_PORT:-$_ingest}
INGEST_METRICS_PORT=${SLUICE_INGEST_METRICS_PORT:-$_ingest_m}
WRITER_METRICS_PORT=${SLUICE_WRITER_METRICS_PORT:-$_writer_m}

DATABASE_URL="postgres://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to $2 seconds for port $1 (while the process in pid file $5, if given, lives); on
# failure prints the tail of log $3 and exits.
wait_port() {
  local port=$1 secs=$2 log=$3 what=$4 pidf=${5:-} i
  for ((i = 0; i < secs * 5; i++)); do
    port_open "$port" && return 0
    if [ -n "$pidf" ] && ! pid_alive "$pidf"; then
      printf 'error: %s exited during start-up. Last lines of %s:\n' "$what" "$log" >&2
      tail -n 30 "$log" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
  printf 'error: %s did not open 127.0.0.1:%s within %ss. Last lines of %s:\n' "$what" "$port" "$secs" "$log" >&2
  tail -n 30 "$log" >&2 || true
  exit 1
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Installs, idempotently, what a fresh machine of this kind lacks.
# A debug build of the workspace with its test binaries takes about 2 GiB; the build cache
# grows past that as versions pile up. With less than SLUICE_BUILD_SPACE_GIB free beside it,
# the cache's debug half goes (rebuilt in about 4 minutes) rather than a link failing halfway.
ensure_build_space() {
  local need=${SLUICE_BUILD_SPACE_GIB:-5} free
  free_gib() { df -Pk "$CARGO_TARGET_DIR" | awk 'NR == 2 { print int($4 / 1048576) }'; }
  mkdir -p "$CARGO_TARGET_DIR"
  free=$(free_gib)
  if [ "$free" -lt "$need" ] && [ -d "$CARGO_TARGET_DIR/debug" ]; then
    say "only $free GiB free on the disk of $CARGO_TARGET_DIR; removing its debug build cache"
    rm -rf "$CARGO_TARGET_DIR/debug"
    free=$(free_gib)
  fi
  [ "$free" -ge "$need" ] || die "only $free GiB free on the disk of $CARGO_TARGET_DIR; the build needs about $need GiB: free some space or set CARGO_TARGET_DIR to a roomier disk"
}

install_prereqs() {
  local missing=()
  [ -x "$PG_BIN/initdb" ] || missing+=(postgresql-15 postgresql-client-15)
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  command -v cmake >/dev/null || missing+=(cmake)
  command -v c++ >/dev/null || missing+=(build-essential)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  [ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
  # librdkafka's CMake build (rdkafka-sys) compiles its OIDC support against libcurl.
  [ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] || missing+=(libcurl4-openssl-dev)
  [ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
  # The connectivity tests make their CA and certificates with the openssl CLI.
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  # The test suite: promtool checks the Prometheus files, deploy/local/prometheus runs the
  # server, and the runbook's DLQ replay uses kcat and jq.
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v kcat >/dev/null || missing+=(kcat)
  command -v jq >/dev/null || missing+=(jq)
  # The Segment SDK compatibility test runs Segment's official Node SDK (npm ci on first use).
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  # The PostHog SDK tests run posthog-python in a venv, the browser test Debian's Chromium.
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  command -v chromium >/dev/null || missing+=(chromium)
  # deploy_dlq_replay.rs and deploy_config.rs fail without these (a check that cannot run is
  # not a pass). ldd comes with libc-bin, on every Debian system.
  command -v ldd >/dev/null || missing+=(libc-bin)
  command -v promtool >/dev/null || missing+=(prometheus)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} (apt)"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian's package starts a system cluster on 5432; sluice runs its own and needs none.
  fi
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and run this again"
  # deploy_config.rs checks the compose and k8s files with Go programs (go.mod: Go 1.26);
  # Debian 12's golang-go (1.19) is too old to build them, so Go is not installed from apt.
  command -v go >/dev/null \
    || say "warning: Go not found; tests/tests/deploy_config.rs fails without Go >= 1.26 (install the Go toolchain)"
  install_kafka
}

# Resolves the broker's jars from Maven Central into the cache (first run only).
install_kafka() {
  if [ -f "$KAFKA_HOME/libs/kafka_2.13-$KAFKA_VERSION.jar" ]; then return 0; fi
  say "fetching Apache Kafka $KAFKA_VERSION jars with mvn into $KAFKA_HOME/libs (first run only)"
  mkdir -p "$KAFKA_HOME"
  mvn -q -B -f "$DEPLOY_LOCAL/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_HOME/libs.partial" >"$KAFKA_HOME/mvn.log" 2>&1 \
    || { tail -n 30 "$KAFKA_HOME/mvn.log" >&2; die "mvn could not fetch the Kafka jars (log above)"; }
  rm -rf "$KAFKA_HOME/libs" && mv "$KAFKA_HOME/libs.partial" "$KAFKA_HOME/libs"
}

# Runs a PostgreSQL binary as the server's user (root may not).
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
  if as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    say "postgres   already running  127.0.0.1:$PG_PORT  ($PG_DATA)"
    return 0
  fi
  port_open "$PG_PORT" && die "port $PG_PORT is taken by another process; set SLUICE_PG_PORT"
  mkdir -p "$SLUICE_STATE"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DATA" "$SLUICE_STATE"
    local auth=(--auth=trust)
    if [ -n "$PG_SSL_DIR" ]; then
      [ -n "$PG_PASSWORD" ] || die "SLUICE_PG_SSL_DIR needs SLUICE_PG_PASSWORD"
      printf '%s\n' "$PG_PASSWORD" >"$SLUICE_STATE/pgpass.init"
      [ "$(id -u)" = 0 ] && chown postgres:postgres "$SLUICE_STATE/pgpass.init"
      auth=(--auth=scram-sha-256 "--pwfile=$SLUICE_STATE/pgpass.init")
    fi
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" "${auth[@]}" --encoding=UTF8 --locale=C.UTF-8 >"$PG_LOG" 2>&1 \
      || { tail -n 20 "$PG_LOG" >&2; die "initdb failed"; }
    rm -f "$SLUICE_STATE/pgpass.init"
    cat >>"$PG_DATA/postgresql.conf" <<CONF
# sluice local stack: loopback TCP only, sized for a small shared machine.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''
max_connections = 300
shared_buffers = 512MB
work_mem = 16MB
maintenance_work_mem = 256MB
# 4GB meant a checkpoint every 30 s under the benchmark's load, each followed by full-page
# images of the random-key index pages touched next; 16GB of WAL, with the suite's 30 M rows
# and its raw COPY file, filled the disk this machine shares. The disk needs room for 8GB.
max_wal_size = 8GB
checkpoint_timeout = 15min
wal_compression = lz4
max_locks_per_transaction = 256
CONF
    if [ -n "$PG_SSL_DIR" ]; then
      # The server reads its key only when owned by it and private.
      install -m 600 "$PG_SSL_DIR/server.key" "$PG_DATA/server.key"
      install -m 644 "$PG_SSL_DIR/server.crt" "$PG_DATA/server.crt"
      [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DATA/server.key" "$PG_DATA/server.crt"
      cat >>"$PG_DATA/postgresql.conf" <<CONF
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
password_encryption = 'scram-sha-256'
CONF
      cat >"$PG_DATA/pg_hba.conf" <<HBA
# sluice, TLS only: encrypted TCP with SCRAM passwords; nothing else is allowed.
hostssl all all 127.0.0.1/32 scram-sha-256
hostssl all all ::1/128 scram-sha-256
HBA
      if [ -f "$PG_SSL_DIR/ca.crt" ]; then
        # Client certificates signed by this CA are checked; database sluice_certauth takes
        # nothing else (the certificate's CN is the user name), for the client-certificate test.
        install -m 644 "$PG_SSL_DIR/ca.crt" "$PG_DATA/ca.crt"
        [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DATA/ca.crt"
        echo "ssl_ca_file = 'ca.crt'" >>"$PG_DATA/postgresql.conf"
        sed -i '1a hostssl sluice_certauth all 127.0.0.1/32 cert' "$PG_DATA/pg_hba.conf"
      fi
    fi
  fi
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$SLUICE_STATE" && touch "$PG_LOG" && chown postgres:postgres "$PG_LOG"
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null \
    || { tail -n 20 "$PG_LOG" >&2; die "PostgreSQL did not start (log above: $PG_LOG)"; }
  # psql and createdb take the password (TLS-only clusters) from the environment, not argv.
  PGPASSWORD=$PG_PASSWORD "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1 \
    || PGPASSWORD=$PG_PASSWORD "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$PG_DB"
  say "postgres   started          127.0.0.1:$PG_PORT  ($PG_DATA)"
}

stop_postgres() {
  if [ -f "$PG_DATA/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
    say "postgres   stopped"
  else
    say "postgres   not running"
  fi
}

# The broker's JVM: small heap, short GC pauses (it shares two cores with everything else).
# Its temporary files go under the broker's own folder: lz4-java unpacks its native library
# into the JVM's temporary folder at every start and a stopped broker leaves it there, 150 KB a
# start in /tmp on a shared disk (a hundred after a day of test runs).
KAFKA_JAVA=(java -Xms128m "-Xmx$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
  "-Djava.io.tmpdir=$KAFKA_DIR/tmp" "-Dlog4j2.configurationFile=$DEPLOY_LOCAL/log4j2.properties"
  -cp "$KAFKA_HOME/libs/*")

# Runs "$@" in the background as a daemon: HUP ignored, and a background job of a script
# ignores SIGINT, so it outlives this script and the terminal's Ctrl-C. The subshell execs,
# so $! is the process itself and its pid file stays true.
daemon() {
  local pidf=$1 log=$2; shift 2
  (trap '' HUP; exec "$@") >>"$log" 2>&1 </dev/null &
  echo $! >"$pidf"
}

start_kafka() {
  if pid_alive "$KAFKA_PID"; then
    say "kafka      already running  127.0.0.1:$KAFKA_PORT  (pid $(cat "$KAFKA_PID"))"
    return 0
  fi
  port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is taken by another process; set SLUICE_KAFKA_PORT"
  mkdir -p "$KAFKA_DIR/tmp"
  local listener='' advertised='' protocol=''
  if [ -n "$KAFKA_PROXIED_PORT" ]; then
    [ -n "$KAFKA_PROXIED_ADVERTISED" ] \
      || die "SLUICE_KAFKA_PROXIED_PORT needs SLUICE_KAFKA_PROXIED_ADVERTISED (the proxy's host:port)"
    listener=",PROXIED://127.0.0.1:$KAFKA_PROXIED_PORT"
    advertised=",PROXIED://$KAFKA_PROXIED_ADVERTISED"
    protocol=",PROXIED:PLAINTEXT"
  fi
  if [ -n "$KAFKA_SASL_SSL_PORT" ]; then
    [ -n "$KAFKA_SSL_KEYSTORE_PEM" ] || die "SLUICE_KAFKA_SASL_SSL_PORT needs SLUICE_KAFKA_SSL_KEYSTORE_PEM"
    listener="$listener,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT"
    advertised="$advertised,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT"
    protocol="$protocol,SASL_SSL:SASL_SSL"
  fi
  if [ -n "$KAFKA_SSL_PORT" ]; then
    [ -n "$KAFKA_SSL_KEYSTORE_PEM" ] && [ -n "$KAFKA_SSL_TRUSTSTORE_PEM" ] \
      || die "SLUICE_KAFKA_SSL_PORT needs SLUICE_KAFKA_SSL_KEYSTORE_PEM and SLUICE_KAFKA_SSL_TRUSTSTORE_PEM"
    listener="$listener,SSL://127.0.0.1:$KAFKA_SSL_PORT"
    advertised="$advertised,SSL://127.0.0.1:$KAFKA_SSL_PORT"
    protocol="$protocol,SSL:SSL"
  fi
  sed -e "s|@PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
    -e "s|@DATA@|$KAFKA_DIR/data|g" \
    -e "/^listeners=/s|\$|$listener|" -e "/^advertised.listeners=/s|\$|$advertised|" \
    -e "/^listener.security.protocol.map=/s|\$|$protocol|" \
    -e "s|^node.id=.*|node.id=$KAFKA_NODE_ID|" \
    -e "s|^controller.quorum.voters=.*|controller.quorum.voters=$KAFKA_QUORUM_VOTERS|" \
    -e "s|^offsets.topic.replication.factor=.*|offsets.topic.replication.factor=$KAFKA_INTERNAL_REPLICATION|" \
    "$DEPLOY_LOCAL/server.properties" >"$KAFKA_DIR/server.properties"
  if [ -n "$KAFKA_SASL_SSL_PORT" ]; then
    # The broker's own traffic stays on PLAINTEXT; clients of this listener need TLS and one
    # of the three mechanisms. SCRAM credentials live in the metadata log (format below).
    cat >>"$KAFKA_DIR/server.properties" <<PROPS
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$KAFKA_SSL_KEYSTORE_PEM
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required $KAFKA_PLAIN_USERS;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
PROPS
    chmod 600 "$KAFKA_DIR/server.properties"
  fi
  if [ -n "$KAFKA_SSL_PORT" ]; then
    cat >>"$KAFKA_DIR/server.properties" <<PROPS
listener.name.ssl.ssl.keystore.type=PEM
listener.name.ssl.ssl.keystore.location=$KAFKA_SSL_KEYSTORE_PEM
listener.name.ssl.ssl.truststore.type=PEM
listener.name.ssl.ssl.truststore.location=$KAFKA_SSL_TRUSTSTORE_PEM
listener.name.ssl.ssl.client.auth=required
PROPS
  fi
  if [ ! -f "$KAFKA_DIR/data/meta.properties" ]; then
    local cluster_id=$KAFKA_CLUSTER_ID scram=() user
    for user in $KAFKA_SCRAM_USERS; do scram+=(--add-scram "$user"); done
    [ -n "$cluster_id" ] || cluster_id=$("${KAFKA_JAVA[@]}" kafka.tools.StorageTool random-uuid 2>>"$KAFKA_LOG" | tail -n 1)
    # `--cluster-id=ID` in one word: a base64url id may begin with `-`, which as a separate
    # word the tool reads as a flag ("expected one argument"; one private cluster in 64 failed so).
    "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format "--cluster-id=$cluster_id" -c "$KAFKA_DIR/server.properties" "${scram[@]}" >>"$KAFKA_LOG" 2>&1 \
      || { tail -n 20 "$KAFKA_LOG" >&2; die "Kafka storage format failed (log above: $KAFKA_LOG)"; }
  fi
  daemon "$KAFKA_PID" "$KAFKA_LOG" "${KAFKA_JAVA[@]}" kafka.Kafka "$KAFKA_DIR/server.properties"
  wait_port "$KAFKA_PORT" 90 "$KAFKA_LOG" "Kafka" "$KAFKA_PID"
  say "kafka      started          127.0.0.1:$KAFKA_PORT  (pid $(cat "$KAFKA_PID"), log $KAFKA_LOG)"
}

# Kills the broker at once (SIGKILL): a broker lost, not one shut down.
kill_kafka() {
  if pid_alive "$KAFKA_PID"; then
    kill -KILL "$(cat "$KAFKA_PID")"
    rm -f "$KAFKA_PID"
    say "kafka      killed"
  fi
}

stop_kafka() {
  if pid_alive "$KAFKA_PID"; then
    local pid i
    pid=$(cat "$KAFKA_PID")
    kill -TERM "$pid"
    for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f "$KAFKA_PID"
    say "kafka      stopped"
  else
    say "kafka      not running"
  fi
}

# Starts one of our binaries in the background with its pid and log in the state folder.
start_service() {
  local name=$1 port=$2; shift 2
  local pidf="$SLUICE_STATE/$name.pid" log="$SLUICE_STATE/$name.log"
  if pid_alive "$pidf"; then
    say "$(printf '%-10s' "$name") already running  (pid $(cat "$pidf"))"
    return 0
  fi
  daemon "$pidf" "$log" "$@"
  wait_port "$port" 30 "$log" "$name" "$pidf"
  say "$(printf '%-10s' "$name") started          127.0.0.1:$port  (pid $(cat "$pidf"), log $log)"
}

stop_service() {
  local name=$1 pidf="$SLUICE_STATE/$1.pid" pid i
  if pid_alive "$pidf"; then
    pid=$(cat "$pidf")
    kill -TERM "$pid"
    for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f "$pidf"
    say "$(printf '%-10s' "$name") stopped"
  fi
}
