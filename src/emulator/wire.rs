//! EKS Auth's wire format as the emulator speaks it, taken from the recorded exchanges in
//! `proto-fixtures/eks-auth/` (embedded at build time), so the emulator, the tests' fake and the
//! recordings cannot drift apart.
//!
//! Contract: [`error`] answers with the status and `x-amzn-errortype` recorded for that code and
//! a body `{"message": …}`; [`success`] fills the recorded success body's fields, keeping its
//! shape. A code without a recording is a programming error caught by the unit tests.

use serde_json::Value;

const FIXTURES: &[&str] = &[
    include_str!("../../proto-fixtures/eks-auth/success.json"),
    include_str!("../../proto-fixtures/eks-auth/error-access-denied.json"),
    include_str!("../../proto-fixtures/eks-auth/error-expired-token.json"),
    include_str!("../../proto-fixtures/eks-auth/error-invalid-parameter.json"),
    include_str!("../../proto-fixtures/eks-auth/error-invalid-request.json"),
    include_str!("../../proto-fixtures/eks-auth/error-invalid-token.json"),
    include_str!("../../proto-fixtures/eks-auth/error-resource-not-found.json"),
    include_str!("../../proto-fixtures/eks-auth/error-throttling.json"),
    include_str!("../../proto-fixtures/eks-auth/error-internal-server.json"),
    include_str!("../../proto-fixtures/eks-auth/error-service-unavailable.json"),
];

/// A response ready to send.
#[derive(Debug, Clone)]
pub struct WireResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

fn fixtures() -> impl Iterator<Item = Value> {
    FIXTURES.iter().filter_map(|f| serde_json::from_str(f).ok())
}

/// The recorded error response for `code`, with `message`.
pub fn error(code: &str, message: &str, request_id: &str) -> WireResponse {
    let recorded = fixtures().find(|f| {
        f["response"]["headers"]["x-amzn-errortype"]
            .as_str()
            .and_then(|t| t.split(':').next())
            == Some(code)
    });
    let (status, errortype, content_type) = match &recorded {
        Some(f) => {
            let r = &f["response"];
            (
                r["status"].as_u64().unwrap_or(500) as u16,
                r["headers"]["x-amzn-errortype"]
                    .as_str()
                    .unwrap_or(code)
                    .to_owned(),
                r["headers"]["content-type"]
                    .as_str()
                    .unwrap_or("application/json")
                    .to_owned(),
            )
        }
        None => (500, code.to_owned(), "application/json".to_owned()),
    };
    WireResponse {
        status,
        headers: vec![
            ("content-type".into(), content_type),
            ("x-amzn-errortype".into(), errortype),
            ("x-amzn-requestid".into(), request_id.to_owned()),
        ],
        body: serde_json::json!({ "message": message }).to_string(),
    }
}

/// The values of one successful exchange.
pub struct Success<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub association_arn: &'a str,
    pub association_id: &'a str,
    pub assumed_role_arn: &'a str,
    pub assume_role_id: &'a str,
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: &'a str,
    pub expiration: u64,
}

pub fn success(s: &Success<'_>, request_id: &str) -> WireResponse {
    let mut body = fixtures()
        .find(|f| f["response"]["status"] == 200)
        .map(|f| f["response"]["body"].clone())
        .unwrap_or_default();
    body["subject"]["namespace"] = s.namespace.into();
    body["subject"]["serviceAccount"] = s.service_account.into();
    body["audience"] = crate::emulator::issuer::AUDIENCE.into();
    body["podIdentityAssociation"]["associationArn"] = s.association_arn.into();
    body["podIdentityAssociation"]["associationId"] = s.association_id.into();
    body["assumedRoleUser"]["arn"] = s.assumed_role_arn.into();
    body["assumedRoleUser"]["assumeRoleId"] = s.assume_role_id.into();
    body["credentials"]["accessKeyId"] = s.access_key_id.into();
    body["credentials"]["secretAccessKey"] = s.secret_access_key.into();
    body["credentials"]["sessionToken"] = s.session_token.into();
    body["credentials"]["expiration"] = s.expiration.into();
    WireResponse {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-amzn-requestid".into(), request_id.to_owned()),
        ],
        body: body.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_the_emulator_uses_is_recorded() {
        for (code, status) in [
            ("AccessDeniedException", 400),
            ("ExpiredTokenException", 400),
            ("InvalidParameterException", 400),
            ("InvalidRequestException", 400),
            ("InvalidTokenException", 400),
            ("ResourceNotFoundException", 404),
            ("ThrottlingException", 429),
            ("InternalServerException", 500),
            ("ServiceUnavailableException", 503),
        ] {
            let r = error(code, "m", "rid");
            assert_eq!(r.status, status, "{code}");
            let t = r
                .headers
                .iter()
                .find(|(k, _)| k == "x-amzn-errortype")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            assert!(t.starts_with(code), "{code}: {t}");
        }
    }

    #[test]
    fn success_keeps_the_recorded_shape() {
        let r = success(
            &Success {
                namespace: "ns",
                service_account: "sa",
                association_arn: "arn",
                association_id: "a-1",
                assumed_role_arn: "arn:aws:sts::000000000000:assumed-role/r/s",
                assume_role_id: "AROA:s",
                access_key_id: "ASIA1",
                secret_access_key: "s",
                session_token: "t",
                expiration: 42,
            },
            "rid",
        );
        let v: Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v["credentials"]["expiration"], 42);
        assert_eq!(v["subject"]["serviceAccount"], "sa");
        assert_eq!(v["podIdentityAssociation"]["associationId"], "a-1");
    }
}
