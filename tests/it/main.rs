//! The integration tests, one binary: a module per feature, each driving the real agent (in this
//! process or as the built binary) over real sockets, with the fakes and helpers in `support`.
//! One binary links the AWS SDK once and compiles `support` once, so a helper no test uses is a
//! warning. `cargo test --test it abuse::` runs one feature's tests.
//!
//! The modules share this process, so none changes what the others see: no test sets the
//! process environment or working directory here (one that must, for `aws-config`'s providers,
//! runs in a process of its own through `support::alone`); network namespaces are named by
//! module and process id, ports are free ones, directories are temporary; and the floods, which
//! time a pod beside thousands of requests, hold `support::FLOODS`, so no two run at once.

mod abuse;
mod audit;
mod binary;
mod cache_behaviour;
mod dev_mode;
mod diagnose;
mod eks_identity;
mod emulator;
mod handover;
mod handover_trust;
mod hygiene;
mod identity;
mod image;
mod kube_native;
mod manifests;
mod netns;
mod netns_clients;
mod netns_handover;
mod parsers;
mod prometheus;
mod sdk_python;
mod sdk_rust;
mod serving;
mod sts;
mod sts_rust;
mod support;
