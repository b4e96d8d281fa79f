//! pod-identity-agent: a node-local credential agent for EKS Pod Identity.
//!
//! A request travels top to bottom through these modules:
//! [`server`] (listeners) → [`request`] (Host and token checks, [`token`]) → [`cache`]
//! (single-flight, refresh-ahead; inside a miss's flight, [`admission`] with [`verify`]: who the
//! token is and what it may spend) → [`eks_auth`] (the exchange) → [`credentials`] (the body),
//! with [`error`] mapping every failure to one status and JSON body, and [`metrics`] counting.

pub mod admission;
pub mod agent;
pub mod audit;
pub(crate) mod bucket;
pub mod cache;
pub mod cli;
pub mod client;
pub(crate) mod codes;
pub mod credentials;
pub(crate) mod defaults;
#[cfg(feature = "emulator")]
pub mod dev;
pub mod diagnose;
pub mod eks_auth;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod error;
pub mod explain;
#[cfg(target_os = "linux")]
pub(crate) mod files;
#[cfg(target_os = "linux")]
pub mod handover;
pub(crate) mod https;
pub(crate) mod jwt;
pub mod kube;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub(crate) mod node_credentials;
pub mod request;
pub mod server;
pub mod signal;
pub mod token;
pub mod util;
pub mod verify;
