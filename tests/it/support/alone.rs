//! A test alone in a process of its own, for the few that must set the process environment
//! (what `aws-config`'s providers read in a pod). Every other test shares this one binary's
//! process, and a variable set here would reach them, or race with their reads.
//!
//! Contract: `alone(name)` is `true` in the process where the test named `name` (its full path
//! in this binary, `module::function`) is to run, so the caller goes on; elsewhere it runs this
//! binary again for exactly that test, with `--test-threads=1`, prints what the run printed,
//! fails unless exactly that one test ran and passed, and returns `false` (the caller returns).

use std::process::Command;

const MARK: &str = "PIA_ALONE";

pub fn alone(name: &str) -> bool {
    if std::env::var(MARK).as_deref() == Ok(name) {
        return true;
    }
    let exe = std::env::current_exe().expect("this test binary");
    let out = Command::new(exe)
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(MARK, name)
        .output()
        .expect("run the test in a process of its own");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name}, in a process of its own: {}",
        out.status
    );
    false
}
