//! From an HTTP request to a validated token, or a typed error. Nothing here touches the cache.
//!
//! Contract, in the order checks run:
//! 1. path `/v1/credentials` (a query string is ignored), else 404;
//! 2. method `GET`, else 405;
//! 3. the `Host` header, port ignored, parses to one of the IPs this agent actually bound
//!    (compared as parsed, canonical IPs, so `[FD00:EC2:0::23]` is `fd00:ec2::23`), else 403.
//!    This defeats DNS rebinding: a browser page on a pod cannot name the agent by an IP.
//!    `localhost` is accepted when a loopback address is bound; a listener on an unspecified
//!    address accepts any IP literal;
//! 4. an `Authorization` token that is a structurally valid JWT (400) within its `nbf`/`exp`
//!    with leeway (400), checked on every request, cached or not.

use crate::error::Error;
use crate::token::Token;
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, SystemTime};

pub const CREDENTIALS_PATH: &str = "/v1/credentials";

/// The Host values this agent answers to.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    ips: Vec<IpAddr>,
    any_ip: bool,
    loopback: bool,
}

impl AllowedHosts {
    pub fn new(bound: &[IpAddr]) -> Self {
        let ips: Vec<IpAddr> = bound.iter().map(|ip| ip.to_canonical()).collect();
        AllowedHosts {
            any_ip: ips.iter().any(IpAddr::is_unspecified),
            loopback: ips.iter().any(|ip| ip.is_loopback() || ip.is_unspecified()),
            ips,
        }
    }

    pub fn allows(&self, host: &str) -> bool {
        match parse_host_header(host) {
            Some(HostName::Ip(ip)) => self.any_ip || self.ips.contains(&ip.to_canonical()),
            Some(HostName::Localhost) => self.loopback,
            None => false,
        }
    }
}

enum HostName {
    Ip(IpAddr),
    Localhost,
}

/// `1.2.3.4`, `1.2.3.4:80`, `[fd00:ec2::23]`, `[fd00:ec2::23]:80`, `localhost[:port]`.
fn parse_host_header(host: &str) -> Option<HostName> {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(valid_port)) {
            return None;
        }
        // A zone id (`%eth0`) names an interface, not a different address.
        let inside = inside.split('%').next()?;
        return inside
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| HostName::Ip(IpAddr::V6(ip)));
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') => {
                if !valid_port(port) {
                    return None;
                }
                name
            }
            _ => host,
        }
    };
    if name.eq_ignore_ascii_case("localhost") {
        return Some(HostName::Localhost);
    }
    name.parse::<IpAddr>().ok().map(HostName::Ip)
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Run the checks in order; return the token to look up.
pub fn validate<B>(
    req: &Request<B>,
    hosts: &AllowedHosts,
    leeway: Duration,
) -> Result<Token, Error> {
    if req.uri().path() != CREDENTIALS_PATH {
        return Err(Error::NotFound(
            req.uri().path().chars().take(128).collect(),
        ));
    }
    if req.method() != Method::GET {
        return Err(Error::MethodNotAllowed(
            req.method().as_str().chars().take(16).collect(),
        ));
    }
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    if !hosts.allows(host) {
        return Err(Error::HostNotAllowed(host.chars().take(64).collect()));
    }
    let raw = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or(b"");
    let token = Token::parse(raw)?;
    token.check_time(SystemTime::now(), leeway)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenError;

    fn hosts(list: &[&str]) -> AllowedHosts {
        AllowedHosts::new(
            &list
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn host_check_compares_parsed_ips() {
        let h = hosts(&["169.254.170.23", "fd00:ec2::23"]);
        for ok in [
            "169.254.170.23",
            "169.254.170.23:80",
            "[fd00:ec2::23]",
            "[fd00:ec2::23]:80",
            "[FD00:EC2:0:0::23]:80",
            "[fd00:ec2:0000::0023]",
            "[::ffff:169.254.170.23]",
        ] {
            assert!(h.allows(ok), "{ok} refused");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:80",
            "169.254.170.2",
            "169.254.170.23:http",
            "[fd00:ec2::24]",
            "[fd00:ec2::23",
            "fd00:ec2::23]",
            "localhost",
            "169.254.170.23.nip.io",
            "[fd00:ec2::23]x",
        ] {
            assert!(!h.allows(bad), "{bad} allowed");
        }
    }

    #[test]
    fn loopback_and_unspecified() {
        let h = hosts(&["127.0.0.1"]);
        assert!(h.allows("127.0.0.1:8080") && h.allows("localhost:8080") && h.allows("LOCALHOST"));
        assert!(!h.allows("127.0.0.2") && !h.allows("[::1]"));
        let any = hosts(&["0.0.0.0"]);
        assert!(
            any.allows("10.1.2.3:80") && any.allows("localhost") && !any.allows("evil.example")
        );
    }

    #[test]
    fn checks_run_in_order() {
        let h = hosts(&["127.0.0.1"]);
        let leeway = Duration::from_secs(60);
        let req = |method: &str, path: &str, host: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .header(HOST, host)
                .body(())
                .unwrap_or_default()
        };
        assert!(matches!(
            validate(&req("GET", "/", "127.0.0.1"), &h, leeway),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            validate(&req("POST", CREDENTIALS_PATH, "127.0.0.1"), &h, leeway),
            Err(Error::MethodNotAllowed(_))
        ));
        assert!(matches!(
            validate(&req("GET", CREDENTIALS_PATH, "evil"), &h, leeway),
            Err(Error::HostNotAllowed(_))
        ));
        assert!(matches!(
            validate(&req("GET", "/v1/credentials?x=1", "127.0.0.1"), &h, leeway),
            Err(Error::Token(TokenError::Missing))
        ));
    }
}
