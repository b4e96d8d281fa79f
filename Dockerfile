# syntax=docker/dockerfile:1
# Multi-stage: build with the full toolchain, ship the binary on a minimal glibc base.
FROM rust:1.94-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild the AWS SDK.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin pod-identity-agent || true
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin pod-identity-agent

# distroless/cc: glibc and CA certificates (EKS Auth is HTTPS), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/pod-identity-agent /pod-identity-agent
# Non-root by default (dev, emulate-eks-auth). The DaemonSet runs init and server as UID 0
# with every capability dropped but NET_ADMIN / NET_BIND_SERVICE: Kubernetes grants added
# capabilities to root only.
USER 65532:65532
ENTRYPOINT ["/pod-identity-agent"]
CMD ["--help"]
