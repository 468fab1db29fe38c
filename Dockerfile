# switchyard: one image for the service, the demo models and the load generator.
FROM rust:1.85-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libssl-dev pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY schemas schemas
COPY config config
RUN cargo build --release --locked && cp target/release/switchyard /usr/local/bin/switchyard

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/switchyard /usr/local/bin/switchyard
ENTRYPOINT ["switchyard"]
CMD ["run"]
