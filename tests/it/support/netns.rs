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

/// Namespaces with these names, or `None` (after a message) where they cannot be made; under
/// PIA_REQUIRE_NETNS=1 (CI) that is a failure instead.
pub fn namespaces(names: &[&str]) -> Option<Vec<Netns>> {
    let made: Vec<Netns> = names.iter().filter_map(|n| Netns::create(n)).collect();
    if made.len() == names.len() {
        return Some(made);
    }
    assert!(
        std::env::var("PIA_REQUIRE_NETNS").as_deref() != Ok("1"),
        "cannot create network namespaces (need root)"
    );
    eprintln!("SKIPPED: cannot create network namespaces here (needs root and iproute2)");
    None
}

/// Join `node` and `pod` with a veth pair (192.0.2.1/2, 2001:db8::1/2) and route the pod's
/// traffic for the credential addresses to the node, as a CNI does (IPv6 neighbour discovery
/// answers only for addresses on the link asked, so the route goes via the node's address).
pub fn wire_pod(node: &Netns, pod: &Netns, id: &str) {
    let (nv, pv) = (format!("pian{id}"), format!("piap{id}"));
    ip(&[
        "link", "add", &nv, "netns", &node.name, "type", "veth", "peer", "name", &pv, "netns",
        &pod.name,
    ]);
    for (ns, dev, v4, v6) in [
        (node, &nv, "192.0.2.1/24", "2001:db8::1/64"),
        (pod, &pv, "192.0.2.2/24", "2001:db8::2/64"),
    ] {
        exec(&ns.name, &["ip", "addr", "add", v4, "dev", dev]);
        exec(&ns.name, &["ip", "addr", "add", v6, "dev", dev, "nodad"]);
        exec(&ns.name, &["ip", "link", "set", dev, "up"]);
    }
    exec(
        &pod.name,
        &[
            "ip",
            "route",
            "add",
            "169.254.170.23/32",
            "via",
            "192.0.2.1",
        ],
    );
    exec(
        &pod.name,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "fd00:ec2::23/128",
            "via",
            "2001:db8::1",
        ],
    );
}

/// A fake EKS Auth on the loopback of `ns` (queryable from any thread).
pub fn fake_in(ns: &Netns) -> super::fake_eks_auth::FakeEksAuth {
    fake_for_cluster_in(ns, super::CLUSTER)
}

/// [`fake_in`] for another cluster name.
pub fn fake_for_cluster_in(ns: &Netns, cluster: &str) -> super::fake_eks_auth::FakeEksAuth {
    let (tx, rx) = std::sync::mpsc::channel();
    let cluster = cluster.to_owned();
    ns.run(move || async move {
        let fake = super::fake_eks_auth::FakeEksAuth::start(&cluster).await;
        let _ = tx.send(fake);
        std::future::pending::<()>().await;
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("fake EKS Auth started")
}
