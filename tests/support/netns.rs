//! Network namespaces for tests: created with `ip netns`, always deleted (on drop, also when a
//! test fails), and threads that run async code inside one, so the test's own sockets live in
//! the namespace and link-local traffic never touches the host's network.

use std::future::Future;
use std::process::Command;

/// Run `ip` with `args`; panic with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run a command inside `ns`; panic on failure.
pub fn exec(ns: &str, args: &[&str]) {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    ip(&full);
}

/// A namespace that is deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `None` when namespaces cannot be created here (not root); the caller decides to skip.
    pub fn create(name: &str) -> Option<Netns> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return None;
        }
        let ns = Netns {
            name: name.to_owned(),
        };
        exec(name, &["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// Run `f` to completion on a new thread that has entered this namespace, with its own
    /// single-threaded runtime; every socket it opens belongs to the namespace.
    pub fn run<F, Fut, T>(&self, f: F) -> std::thread::JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
