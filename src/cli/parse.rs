//! The value parsers the command line shares, and the bounds of its durations.
//!
//! Contract: each parser takes the text of one flag's value and returns the typed value or a
//! one-line reason, which clap prints with exit code 2. Nothing here clamps: a value outside its
//! bounds is refused, so nothing downstream can overflow adding or multiplying it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

/// A directory, or nothing (the feature is off).
pub fn parse_dir_or_off(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s.trim()))
}

/// A positive rate per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a positive number per second")),
    }
}

/// An https URL (plain http only to a loopback address).
pub fn parse_url(s: &str) -> Result<String, String> {
    crate::https::check_url(s).map(|_| s.trim().to_owned())
}

/// A taint key: a Kubernetes qualified name.
pub fn parse_taint_key(s: &str) -> Result<String, String> {
    let key = s.trim();
    if crate::kube::is_qualified_name(key) {
        Ok(key.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a taint key (an optional DNS prefix and '/', then up to 63 letters, digits, '-', '_' or '.')"
        ))
    }
}

/// A bind host: an IP literal, bracketed IPv6 included, or `localhost`.
pub fn parse_bind_host(s: &str) -> Result<IpAddr, String> {
    let t = s.trim().trim_start_matches('[').trim_end_matches(']');
    if t.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    t.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// Go duration notation (`3h`, `1h30m`, `3h0m0s`, `250ms`), which humantime reads.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 3h or 90s: {e}"))
}

pub(super) const MS: Duration = Duration::from_millis(1);
pub(super) const SECOND: Duration = Duration::from_secs(1);
pub(super) const MINUTE: Duration = Duration::from_secs(60);
pub(super) const HOUR: Duration = Duration::from_secs(3600);
pub(super) const DAY: Duration = Duration::from_secs(86_400);

/// A duration within `[min, max]`: a value outside is refused where it is parsed (exit 2), never
/// clamped, and nothing downstream can overflow adding or multiplying it.
pub fn duration_between(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let d = parse_duration(s)?;
        if d < min || d > max {
            return Err(format!(
                "{s:?} is outside {} to {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ));
        }
        Ok(d)
    }
}
