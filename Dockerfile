# syntax=docker/dockerfile:1
# One image for the four sluice binaries (sluice-ingest, sluice-writer, sluice-schema,
# sluice-loadtest); each container picks its binary with its command. Build from the repo root:
#   docker build -t sluice:dev .
# No container engine runs on the machine this was written on, so no build checks it; instead
# tests/tests/deploy_config.rs parses and lints it with BuildKit's own Dockerfile frontend
# (deploy/compose/schemacheck), runs `ldd` on the binaries against the runtime stage's
# packages, and checks that it ships every binary and runs as the manifests' user.
# See docs/operations.md.

# ---- build -------------------------------------------------------------------------------
# The workspace's rust-version is 1.85; a newer stable compiler builds it too.
ARG RUST_VERSION=1.85
FROM rust:${RUST_VERSION}-bookworm AS build
# rdkafka builds librdkafka with CMake (features cmake-build, zstd) and links libcurl (OIDC),
# OpenSSL and zlib: the same list as deploy/local/lib.sh installs on a bare machine.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake build-essential pkg-config \
      zlib1g-dev libcurl4-openssl-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target folder across builds; the binaries are copied
# out of the cache mount because it is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/sluice-ingest target/release/sluice-writer \
       target/release/sluice-schema target/release/sluice-loadtest /out/

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# Shared libraries the binaries link dynamically beyond libc6 and libgcc-s1 (in every Debian
# image): librdkafka needs zlib; librdkafka and the PostgreSQL connector share the system's
# OpenSSL (libssl3), and ca-certificates is the OS store behind `sslrootcert=system` and
# librdkafka's default CA paths (managed Kafka and PostgreSQL with public CAs). Nothing else:
# no shell tools are needed by the services. tests/tests/deploy_config.rs runs `ldd` on the
# built binaries and fails when one needs a library this list does not bring.
RUN apt-get update \
 && apt-get install -y --no-install-recommends zlib1g libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid sluice --no-create-home --shell /usr/sbin/nologin sluice
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
# No SLUICE_* defaults here: every deploy file sets what its service needs, in one place that
# tests/tests/deploy_config.rs checks against the binaries' real flags.
# 8080 collector API, 9464 collector metrics/health, 9465 writer metrics/health.
EXPOSE 8080 9464 9465
# The binaries run as PID 1 and handle SIGTERM themselves (drain, then exit).
STOPSIGNAL SIGTERM
CMD ["sluice-ingest"]
