//! The integration tests, one binary: a module per feature, each driving the real agent (in this
//! process or as the built binary) over real sockets, with the fakes and helpers in `support`.
//!
//! One binary links the AWS SDK once, and `support` is compiled once, so what it holds that no
//! test uses is a warning. `cargo test --test it abuse::` runs one feature.
//!
//! Every module shares this process: none sets the environment or the working directory, nor
//! takes a fixed name or port, except through `support` (`support::alone` runs a test that must
//! set the environment in a process of its own).

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
