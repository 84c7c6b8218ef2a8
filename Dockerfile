# The builder as a container: it drives the host's Docker Engine through the
# mounted socket. See README.md ("Running it in a container").
#
# The base images are build arguments, so that a fleet can pin digests or
# use its own mirror:
#   docker build --build-arg RUNTIME_IMAGE=debian:bookworm-slim@sha256:... .
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The dependencies first, in a layer of their own: a change to src/ alone
# then recompiles only this crate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' >src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin deployra-builder \
 && rm -rf src
COPY src ./src
# COPY keeps the files' times, which may be older than the stub's build.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin deployra-builder

# pack builds the repositories that have no Dockerfile (Cloud Native
# Buildpacks). PACK_URL may point at a mirror of the release archive.
FROM ${RUNTIME_IMAGE} AS pack
ARG PACK_VERSION=0.39.1
ARG PACK_URL=https://github.com/buildpacks/pack/releases/download/v${PACK_VERSION}/pack-v${PACK_VERSION}-linux.tgz
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && curl -fsSL --retry 3 "$PACK_URL" | tar -xz -C /usr/local/bin --no-same-owner pack \
 && /usr/local/bin/pack --version

FROM ${RUNTIME_IMAGE}
# libssl3: libgit2's HTTPS; ca-certificates: every TLS peer (git hosts,
# ECR, the dashboard). The builder's user gets the uid and gid 10001; the
# Docker socket's group is added at `docker run` (--group-add).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 deployra \
 && useradd --system --uid 10001 --gid deployra --home-dir /var/lib/deployra-builder --create-home deployra
COPY --from=pack /usr/local/bin/pack /usr/local/bin/pack
COPY --from=build /src/target/release/deployra-builder /usr/local/bin/deployra-builder
USER deployra
WORKDIR /var/lib/deployra-builder
ENV WORK_DIR=/var/lib/deployra-builder/builds
ENTRYPOINT ["/usr/local/bin/deployra-builder"]
