//! JSON Web Signatures (RFC 7515 compact form) as the agent meets them: parsed once, verified once.
//!
//! Contract: [`decode`] is the one base64url rule (padding optional: Kubernetes writes none,
//! some tools pad). [`Jws::parse`] splits a compact JWS into its header (`alg`, `kid`), the
//! decoded payload, the signing input and the signature, refusing anything that is not three
//! non-empty base64url segments with a JSON header; it never echoes the input in an error (a
//! JWS may be a bearer token). [`PublicKey::from_jwk`] accepts only signing keys (`use` absent
//! or `sig`) of the two algorithms Kubernetes issuers use, RSA (2048 to 8192 bits) and P-256,
//! and [`Jws::verify`] checks the signature only with the algorithm tied to the key's type
//! (RS256 with RSA, ES256 with P-256), so `none`, HMAC confusion and algorithm swaps cannot pass.

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde::Deserialize;

/// Kubernetes writes unpadded base64url, but some tools pad; accept both.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decode one base64url segment.
pub fn decode(segment: &str) -> Option<Vec<u8>> {
    B64.decode(segment).ok()
}

/// Why a JWS could not be parsed. Never contains the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWS compact serialisation (three dot-separated segments)")]
    Segments,
    #[error("the header is not base64url JSON with an alg")]
    Header,
    #[error("the payload is not base64url")]
    Payload,
    #[error("the signature is not base64url")]
    Signature,
}

/// The JOSE header fields the agent reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
}

/// A parsed, unverified JWS.
pub struct Jws<'a> {
    pub header: Header,
    /// The decoded payload (JSON claims, for a JWT).
    pub payload: Vec<u8>,
    /// `header.payload` as sent: what the signature covers.
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl<'a> Jws<'a> {
    pub fn parse(compact: &'a str) -> Result<Jws<'a>, JwtError> {
        let mut parts = compact.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Segments);
        };
        if h.is_empty() || p.is_empty() || s.is_empty() {
            return Err(JwtError::Segments);
        }
        let header: Header = decode(h)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Header)?;
        let payload = decode(p).ok_or(JwtError::Payload)?;
        let signature = decode(s).ok_or(JwtError::Signature)?;
        Ok(Jws {
            header,
            payload,
            signing_input: &compact[..h.len() + 1 + p.len()],
            signature,
        })
    }

    /// Whether `key` signed this JWS with the algorithm its header names.
    pub fn verify(&self, key: &PublicKey) -> bool {
        key.verify(
            &self.header.alg,
            self.signing_input.as_bytes(),
            &self.signature,
        )
    }

    /// The payload as `T`.
    pub fn claims<T: for<'de> Deserialize<'de>>(&self) -> Option<T> {
        serde_json::from_slice(&self.payload).ok()
    }
}

/// A JSON Web Key as a key set publishes it.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

/// A JWK Set document (`{"keys": [...]}`); unknown members are ignored.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

/// A public key that can check a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed P-256 point.
    P256(Vec<u8>),
}

impl PublicKey {
    /// The signing key a JWK describes, if it is one the agent can use.
    pub fn from_jwk(jwk: &Jwk) -> Option<PublicKey> {
        if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        match jwk.kty.as_str() {
            "RSA" => Some(PublicKey::Rsa {
                n: decode(jwk.n.as_deref()?)?,
                e: decode(jwk.e.as_deref()?)?,
            }),
            "EC" if jwk.crv.as_deref() == Some("P-256") => {
                let (x, y) = (decode(jwk.x.as_deref()?)?, decode(jwk.y.as_deref()?)?);
                if x.len() != 32 || y.len() != 32 {
                    return None;
                }
                let mut point = Vec::with_capacity(65);
                point.push(4u8);
                point.extend(x);
                point.extend(y);
                Some(PublicKey::P256(point))
            }
            _ => None,
        }
    }

    fn verify(&self, alg: &str, message: &[u8], sig: &[u8]) -> bool {
        match (self, alg) {
            (PublicKey::Rsa { n, e }, "RS256") => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            (PublicKey::P256(point), "ES256") => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn seg(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn parses_and_refuses_without_echoing() {
        let good = format!(
            "{}.{}.{}",
            seg(&serde_json::json!({"alg": "RS256", "kid": "k"})),
            seg(&serde_json::json!({"sub": "x"})),
            URL_SAFE_NO_PAD.encode("sig")
        );
        let jws = Jws::parse(&good).expect("parses");
        assert_eq!(jws.header.kid.as_deref(), Some("k"));
        assert_eq!(jws.claims::<serde_json::Value>().expect("json")["sub"], "x");
        // Padding is tolerated.
        assert_eq!(decode("YQ=="), Some(b"a".to_vec()));
        for bad in ["", "a.b", "a.b.c.d", "..", "!!.??.##", "e30.e30."] {
            let err = Jws::parse(bad).err().expect("refused");
            assert!(!err.to_string().contains(bad) || bad.is_empty());
        }
    }

    #[test]
    fn a_key_checks_only_its_own_algorithm() {
        let rsa = PublicKey::Rsa {
            n: vec![1; 256],
            e: vec![1, 0, 1],
        };
        assert!(!rsa.verify("HS256", b"m", b"s"));
        assert!(!rsa.verify("none", b"m", b""));
        let jwk: Jwk = serde_json::from_value(
            serde_json::json!({"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}),
        )
        .expect("jwk");
        assert!(
            PublicKey::from_jwk(&jwk).is_none(),
            "encryption keys are not used"
        );
    }
}
