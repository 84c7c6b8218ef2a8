# The builder as a container: it drives the host's Docker Engine through the
# mounted socket. See README.md ("Running it in a container").
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin deployra-builder

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/deployra-builder --create-home deployra
COPY --from=build /src/target/release/deployra-builder /usr/local/bin/deployra-builder
USER deployra
ENV WORK_DIR=/var/lib/deployra-builder/builds
ENTRYPOINT ["/usr/local/bin/deployra-builder"]
