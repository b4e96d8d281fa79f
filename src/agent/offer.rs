//! This agent as a predecessor: its offer to a successor, when handover is on.
//!
//! Contract: [`Handover::offer`] listens for a successor with this server's cache, listening
//! sockets, verifier and retirement ([`crate::handover::Predecessor`]); a listener that cannot
//! start is logged and handover is off (the next agent binds fresh). With handover off, or on
//! other systems, every method is a no-op and [`Handover::lost`] never resolves.

use super::AgentSettings;
use crate::metrics::Metrics;
use crate::server::RunningServer;
use std::sync::Arc;

/// The socket an agent that serves again offers itself on (see [`Handover::stop_keeping_socket`]).
#[cfg(target_os = "linux")]
pub(super) type Named = Option<crate::handover::rendezvous::Published>;
#[cfg(not(target_os = "linux"))]
pub(super) type Named = ();

/// This agent's side as a predecessor, when handover is on.
pub(super) enum Handover {
    Off,
    #[cfg(target_os = "linux")]
    On(crate::handover::Predecessor, std::time::Duration),
}

impl Handover {
    /// Offer this agent to a successor, when handover is on (on `named`, if given).
    pub(super) fn offer(
        settings: &AgentSettings,
        running: &RunningServer,
        metrics: Arc<Metrics>,
        named: Named,
    ) -> Handover {
        #[cfg(target_os = "linux")]
        if let Some(h) = &settings.handover {
            let offer = crate::handover::Offer {
                cache: running.cache.clone(),
                listeners: running.sockets.clone(),
                verifier: running.verifier.clone(),
                retire: Arc::new(running.retirer()),
            };
            return match crate::handover::Predecessor::listen(h, offer, metrics, named) {
                Ok(p) => Handover::On(p, h.wait),
                Err(e) => {
                    tracing::warn!(error = %e, "handover unavailable: \
                        the next agent will bind fresh after this one stops");
                    Handover::Off
                }
            };
        }
        let _ = (settings, running, metrics, named);
        Handover::Off
    }

    /// Stop, keeping the handover socket open and named for the next [`Handover::offer`] of an
    /// agent that serves again.
    pub(super) async fn stop_keeping_socket(self) -> Named {
        match self {
            #[cfg(target_os = "linux")]
            Handover::On(p, _) => p.stop_keeping_socket().await,
            #[cfg(target_os = "linux")]
            Handover::Off => None,
            #[cfg(not(target_os = "linux"))]
            Handover::Off => (),
        }
    }

    pub(super) async fn lost(&self) {
        match self {
            #[cfg(target_os = "linux")]
            Handover::On(p, _) => p.lost().await,
            Handover::Off => std::future::pending().await,
        }
    }

    pub(super) async fn wait_for_successor(&mut self) -> bool {
        match self {
            #[cfg(target_os = "linux")]
            Handover::On(p, wait) => p.wait_for_successor(*wait).await,
            Handover::Off => false,
        }
    }

    pub(super) async fn stop(self) {
        match self {
            #[cfg(target_os = "linux")]
            Handover::On(p, _) => p.stop().await,
            Handover::Off => {}
        }
    }
}
