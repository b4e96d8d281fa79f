//! Building HTTP responses: a JSON body with its content type, and an [`Error`] as its one
//! status and `{"code","message"}` body.
//!
//! Contract: every answer the agent's listeners give goes through here, so each carries
//! `Content-Type: application/json` (Go and Java SDKs show a JSON error's code and message only
//! then), a 405 names the allowed method, and a refusal for a budget carries `Retry-After`.

use crate::codes::ErrorCode;
use crate::error::{Code, Error};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

const JSON: HeaderValue = HeaderValue::from_static("application/json");

pub fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, JSON);
    res
}

pub fn error_response(e: &Error) -> Response<Full<Bytes>> {
    let code = e.coded();
    let status = match code {
        Code::Own(own) => own.status(),
        // Whatever answered at `--endpoint` may have sent a status outside HTTP's range.
        Code::EksAuth { status, .. } => {
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
        }
    };
    let mut res = json_response(status, e.body());
    if code == Code::Own(ErrorCode::MethodNotAllowed) {
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
    }
    if let Some(wait) = e.retry_after() {
        // Whole seconds, rounded up: the header has no fractions.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        res.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}
