# syntax=docker/dockerfile:1
# Multi-stage, for machines that can pull the rust base image: build with the full toolchain,
# then ship the binary and only what it needs at run time on `scratch`. Where no base image can be
# pulled, daemonset/build-image.sh builds the same `runtime` stage from a binary built on the
# machine (README, "Installing on a cluster").
FROM rust:1.94-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild the AWS SDK.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --no-default-features --bin pod-identity-agent || true
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --no-default-features --bin pod-identity-agent
# The binary, the libraries it links and their loader, a CA bundle (EKS Auth is HTTPS): one
# layout, staged by the same script either way.
RUN daemonset/build-image.sh --rootfs target/release/pod-identity-agent /rootfs

FROM scratch AS runtime
COPY --from=build /rootfs/ /
# Non-root by default. The DaemonSet runs init and server as UID 0
# with every capability dropped but NET_ADMIN / NET_BIND_SERVICE: Kubernetes grants added
# capabilities to root only.
USER 65532:65532
ENTRYPOINT ["/pod-identity-agent"]
CMD ["--help"]
