# Helpers of the load-test scripts (loadtest/bench, loadtest/ab-collector), sourced after
# deploy/local/lib.sh.

# `proc_ticks PID...`: CPU time (user + system, clock ticks) of these processes: fields 14 and
# 15 of /proc/PID/stat, counted after the command name's closing parenthesis.
proc_ticks() {
  local p
  for p in "$@"; do sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null; done | awk '{ s += $12 + $13 } END { printf "%d", s + 0 }'
}

# `kafka_ticks PID`: the part of proc_ticks spent in PID's librdkafka threads (named `rdk:`,
# e.g. rdk:broker1, the thread that builds, compresses and sends the produce requests).
kafka_ticks() {
  cat /proc/"$1"/task/*/stat 2>/dev/null | awk '
    { name = $0; sub(/^[^(]*\(/, "", name); sub(/\).*$/, "", name)
      rest = $0; sub(/^.*\) /, "", rest); split(rest, f, " ")
      if (name ~ /^rdk:/) s += f[12] + f[13] }
    END { printf "%d", s + 0 }'
}

# `make_keys N LABEL`: N new tenants with a workspace and write key each; prints the keys,
# comma-separated (SLUICE_LOADTEST_KEYS). Needs SLUICE_DATABASE_URL and BIN_DIR.
make_keys() {
  local n=$1 label=$2 i tnt ws key keys=()
  for ((i = 1; i <= n; i++)); do
    tnt=$("$BIN_DIR/sluice-schema" tenant create "$label-$(date +%s)-$i" | tail -n 1) || return 1
    ws=$("$BIN_DIR/sluice-schema" workspace create --tenant "$tnt" main | tail -n 1) || return 1
    # `key create`'s notice that a key is shown only once is dropped: these keys go to the load
    # generator's environment, never to the screen. Its errors still reach stderr.
    key=$("$BIN_DIR/sluice-schema" key create --workspace "$ws" 2> >(grep -v 'shown once' >&2) | tail -n 1) || return 1
    keys+=("$key")
  done
  (IFS=,; echo "${keys[*]}")
}
