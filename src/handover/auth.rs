//! Who may be the other end of a handover: proof, both ways, that a peer read this agent's name
//! file.
//!
//! Contract: an agent makes a fresh 256-bit [`Secret`] when it first listens for a successor
//! (kept, with its socket, while it serves again after a failed successor) and writes it beside
//! its socket's name in `<dir>/agent.name` (0600, in the agent's own 0700 directory: only a
//! process with that directory mounted, as this user, reads it). A successor
//! sends a fresh [`Nonce`] and [`Secret::successor_proof`] in its `Hello`; the predecessor checks
//! it ([`Secret::check_successor`], in constant time) before it sends a byte, and answers with
//! [`Secret::predecessor_proof`] in its `Welcome`, which the successor checks before it uses
//! anything it is sent. Each proof is HMAC-SHA256 under the secret over a label saying which end
//! made it, the nonce and the socket's name, so neither end's proof can be replayed as the
//! other's, on another socket, or in another exchange.
//!
//! Why: the abstract socket is reachable by every process in the host's network namespace
//! (every hostNetwork pod), and `SO_PEERCRED` only tells this user's processes from others; a
//! root container with no capabilities is this user. Without the secret such a process could
//! take over the listening sockets and the cache (as a successor), or pose as a predecessor
//! after an agent died without a successor and hand the next agent planted keys and sockets.
//! Neither proof says anything about the secret to a peer that lacks it.
//!
//! The predecessor sends no challenge of its own, so a successor's `Hello` would pass again if
//! replayed to the same agent. Replaying one takes seeing it: the socket pair carries it between
//! two processes of which neither can be traced (the agent is not dumpable) nor has its traffic
//! copied short of `CAP_NET_ADMIN` or `CAP_SYS_PTRACE`, which are root on the node, past this
//! boundary; such a process reads the name file anyway.

use std::fmt;

/// The label each end signs under, so a proof cannot be turned around.
const SUCCESSOR: &[u8] = b"pod-identity-agent handover 4: successor\0";
const PREDECESSOR: &[u8] = b"pod-identity-agent handover 4: predecessor\0";
/// Bytes of a secret and of a nonce.
const LEN: usize = 32;

fn random() -> std::io::Result<[u8; LEN]> {
    let mut bytes = [0u8; LEN];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| std::io::Error::other("the system's random generator failed"))?;
    Ok(bytes)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `LEN` bytes as lowercase hex, or nothing.
fn from_hex(hex: &str) -> Option<[u8; LEN]> {
    let digits = hex.as_bytes();
    if digits.len() != LEN * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; LEN];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The secret an agent shares, through its name file, with whoever may take over from it.
/// Deliberately no `Debug` showing it and no way to log it: only [`Secret::to_hex`], for the file.
/// No `==` outside tests either: a proof is compared in constant time
/// ([`Secret::check_successor`]), and a secret itself never needs comparing.
#[derive(Clone)]
#[cfg_attr(test, derive(PartialEq, Eq))]
pub struct Secret([u8; LEN]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A fresh secret from the system's generator.
    pub fn generate() -> std::io::Result<Secret> {
        random().map(Secret)
    }

    /// Whether `other` is this secret, compared in constant time like a proof.
    pub fn is(&self, other: &Secret) -> bool {
        self.0
            .iter()
            .zip(&other.0)
            .fold(0u8, |d, (a, b)| d | (a ^ b))
            == 0
    }

    /// The secret as the name file holds it.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// A secret read from a name file: exactly 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Option<Secret> {
        from_hex(hex).map(Secret)
    }

    fn key(&self) -> aws_lc_rs::hmac::Key {
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.0)
    }

    fn message(label: &[u8], nonce: &Nonce, name: &str) -> Vec<u8> {
        let mut m = Vec::with_capacity(label.len() + LEN + name.len());
        m.extend_from_slice(label);
        m.extend_from_slice(&nonce.0);
        m.extend_from_slice(name.as_bytes());
        m
    }

    fn proof(&self, label: &[u8], nonce: &Nonce, name: &str) -> String {
        let tag = aws_lc_rs::hmac::sign(&self.key(), &Self::message(label, nonce, name));
        to_hex(tag.as_ref())
    }

    fn check(&self, label: &[u8], nonce: &Nonce, name: &str, proof: &str) -> bool {
        let Some(tag) = from_hex(proof) else {
            return false;
        };
        aws_lc_rs::hmac::verify(&self.key(), &Self::message(label, nonce, name), &tag).is_ok()
    }

    /// What a successor sends in its `Hello` to the socket `name`.
    pub fn successor_proof(&self, nonce: &Nonce, name: &str) -> String {
        self.proof(SUCCESSOR, nonce, name)
    }

    /// Whether a `Hello`'s proof was made with this secret, for this nonce and socket.
    pub fn check_successor(&self, nonce: &Nonce, name: &str, proof: &str) -> bool {
        self.check(SUCCESSOR, nonce, name, proof)
    }

    /// What a predecessor answers in its `Welcome`.
    pub fn predecessor_proof(&self, nonce: &Nonce, name: &str) -> String {
        self.proof(PREDECESSOR, nonce, name)
    }

    /// Whether a `Welcome`'s proof was made with this secret, for this nonce and socket.
    pub fn check_predecessor(&self, nonce: &Nonce, name: &str, proof: &str) -> bool {
        self.check(PREDECESSOR, nonce, name, proof)
    }
}

/// A successor's fresh challenge: makes every exchange's proofs its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nonce([u8; LEN]);

impl Nonce {
    pub fn generate() -> std::io::Result<Nonce> {
        random().map(Nonce)
    }

    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    pub fn from_hex(hex: &str) -> Option<Nonce> {
        from_hex(hex).map(Nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_only_itself() {
        let (a, b) = (
            Secret::generate().expect("a"),
            Secret::generate().expect("b"),
        );
        assert!(a.is(&a.clone()));
        assert!(!a.is(&b) && !b.is(&a));
        let mut one_bit = a.clone();
        one_bit.0[LEN - 1] ^= 1;
        assert!(!a.is(&one_bit));
    }

    const NAME: &str = "pod-identity-agent/handover/00112233445566778899aabbccddeeff";

    #[test]
    fn each_end_proves_the_secret_and_nothing_else_passes() {
        let secret = Secret::generate().expect("random");
        let nonce = Nonce::generate().expect("random");
        let hello = secret.successor_proof(&nonce, NAME);
        let welcome = secret.predecessor_proof(&nonce, NAME);
        assert!(secret.check_successor(&nonce, NAME, &hello));
        assert!(secret.check_predecessor(&nonce, NAME, &welcome));

        // Another secret, nonce or socket: refused.
        let other = Secret::generate().expect("random");
        assert!(!other.check_successor(&nonce, NAME, &hello));
        let fresh = Nonce::generate().expect("random");
        assert!(!secret.check_successor(&fresh, NAME, &hello));
        let elsewhere = "pod-identity-agent/handover/ffeeddccbbaa99887766554433221100";
        assert!(!secret.check_successor(&nonce, elsewhere, &hello));
        // One end's proof is not the other's: a predecessor cannot echo the Hello back.
        assert!(!secret.check_predecessor(&nonce, NAME, &hello));
        assert!(!secret.check_successor(&nonce, NAME, &welcome));
        // Garbage, uppercase, short and empty proofs are refused, never a panic.
        for bad in [
            "",
            "00",
            &hello[..62],
            &hello.to_uppercase(),
            &"zz".repeat(32),
        ] {
            assert!(!secret.check_successor(&nonce, NAME, bad), "{bad:?}");
        }
    }

    #[test]
    fn secrets_round_trip_through_hex_and_never_show_in_debug() {
        let secret = Secret::generate().expect("random");
        let hex = secret.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(Secret::from_hex(&hex), Some(secret.clone()));
        assert_eq!(format!("{secret:?}"), "Secret(..)");
        assert!(Secret::from_hex(&hex[..63]).is_none());
        assert!(Secret::from_hex(&format!("{hex}0")).is_none());
        assert!(Secret::from_hex(&hex.to_uppercase()).is_none() || hex == hex.to_uppercase());
        assert_ne!(
            Secret::generate().expect("random"),
            secret,
            "fresh each time"
        );
    }
}
