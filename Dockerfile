# syntax=docker/dockerfile:1
# sluice: both binaries in one small image (multi-stage: Rust builder, Debian slim runtime).
#   docker build -t sluice .
#   docker run --rm sluice sluice-replicator --help
# Configure with SLUICE_<SECTION>__<KEY> environment variables (see README "Configuration") or mount a
# TOML file at /etc/sluice/sluice.toml; the image ships an empty one so env-only configuration works.

# --- build -------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the crate registry and the build directory between builds, so a code
# change rebuilds only sluice's own crates. The binaries are copied out of the cached directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-replicator -p sluice-loader \
    && install -m 0755 target/release/sluice-replicator target/release/sluice-loader /usr/local/bin/

# --- run ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS to NATS/ClickHouse/Postgres with system roots; curl: container health checks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin sluice \
    && mkdir -p /etc/sluice \
    && printf '# Empty: configured by SLUICE_<SECTION>__<KEY> variables. Mount a file here instead if you like.\n' \
        > /etc/sluice/sluice.toml
COPY --from=builder /usr/local/bin/sluice-replicator /usr/local/bin/sluice-loader /usr/local/bin/
USER sluice
ENV SLUICE_CONFIG=/etc/sluice/sluice.toml \
    SLUICE_LOG_FORMAT=json \
    SLUICE_REPLICATOR__METRICS_LISTEN=0.0.0.0:9187 \
    SLUICE_LOADER__METRICS_LISTEN=0.0.0.0:9188
EXPOSE 9187 9188
# Exec form: the binary is PID 1 and receives SIGTERM from `docker stop` (clean shutdown).
CMD ["sluice-replicator", "--help"]
