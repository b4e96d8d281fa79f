//! What `diagnose` found, and how it is printed: one line per check, `ok`, `warn` or `FAIL`,
//! then a one-line verdict.
//!
//! Contract: text from outside (the agent's or STS's words, a URI, a claim) goes through
//! [`clip`] before it reaches the report, so it is bounded and cannot drive the terminal.

use std::fmt::Write as _;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report, and for a failure what it means.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub check: &'static str,
    pub message: String,
}

/// Everything the checks found, in order.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub(super) fn ok(&mut self, check: &'static str, message: impl Into<String>) {
        self.push(Level::Ok, check, message);
    }
    pub(super) fn warn(&mut self, check: &'static str, message: impl Into<String>) {
        self.push(Level::Warn, check, message);
    }
    pub(super) fn fail(&mut self, check: &'static str, message: impl Into<String>) {
        self.push(Level::Fail, check, message);
    }
    fn push(&mut self, level: Level, check: &'static str, message: impl Into<String>) {
        self.findings.push(Finding {
            level,
            check,
            message: message.into(),
        });
    }

    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Fail)
    }

    /// The report as printed: one line per finding, then a one-line verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            let _ = writeln!(out, "{tag}  {:<12} {}", f.check, f.message);
        }
        let count = |level| self.findings.iter().filter(|f| f.level == level).count();
        let (problems, warnings) = (count(Level::Fail), count(Level::Warn));
        let _ = match problems {
            0 => writeln!(
                out,
                "\nThis environment gets Pod Identity credentials ({warnings} warning(s))."
            ),
            n => writeln!(out, "\n{n} problem(s), {warnings} warning(s)."),
        };
        out
    }
}

pub(super) fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "(unknown)"
    } else {
        s
    }
}

/// `s` at most `max` characters, control characters (terminal escapes among them) replaced:
/// what the agent or STS said is printed to a person's terminal.
pub(super) fn clip(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// `3725` → `1h 2m`.
pub(super) fn human(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_others_said_cannot_drive_the_terminal() {
        let shown = clip("ok\u{1b}]0;owned\u{7}\u{1b}[2J done", 100);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.starts_with("ok") && shown.ends_with("done"));
        assert_eq!(clip(&"x".repeat(500), 10).chars().count(), 11);
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(59), "59 s");
        assert_eq!(human(600), "10 min");
        assert_eq!(human(3 * 3600 + 120), "3h 2m");
    }

    #[test]
    fn the_verdict_counts_problems_and_warnings() {
        let mut r = Report::default();
        r.ok("a", "fine");
        r.warn("b", "hm");
        assert!(!r.failed());
        assert!(
            r.render().ends_with("credentials (1 warning(s)).\n"),
            "{}",
            r.render()
        );
        r.fail("c", "broken");
        assert!(r.failed());
        assert!(
            r.render().contains("FAIL  c            broken\n"),
            "{}",
            r.render()
        );
        assert!(r.render().ends_with("\n1 problem(s), 1 warning(s).\n"));
    }
}
