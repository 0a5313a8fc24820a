# Stampede's container image: `docker build -t stampede .`
# The binary is built once in a Rust image (the `production` profile: link-time
# optimised) and copied into a small Debian one; the process runs as an unprivileged
# user and listens on 0.0.0.0:8080.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile production --locked -p stampede \
    && cp target/production/stampede /usr/local/bin/stampede

FROM debian:bookworm-slim
# CA certificates for TLS to the database (`?sslmode=require`, `?ssl-mode=required`).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/stampede stampede \
    && mkdir -p /var/lib/stampede \
    && chown stampede /var/lib/stampede
COPY --from=build /usr/local/bin/stampede /usr/local/bin/stampede
USER 10001
ENV STAMPEDE_LISTEN=0.0.0.0:8080 \
    STAMPEDE_DATA_DIR=/var/lib/stampede
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/stampede"]
CMD ["serve"]
