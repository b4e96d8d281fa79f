//! The metrics overlay's rules and dashboard against real Prometheus tools:
//! `promtool check rules` and `promtool test rules` (a unit test for every alert, each able to
//! fail), and a real Prometheus server scraping a running agent, evaluating the rules (the cache
//! alert goes pending) and answering every dashboard query.
//!
//! Needs Debian's `prometheus` package (`promtool`, `prometheus`); without it these tests are
//! skipped with a message, unless PIA_REQUIRE_PROMETHEUS=1 (CI), where that fails.

use crate::support::fake_eks_auth::FakeEksAuth;
use crate::support::process::{agent_command, loopback_server, spawn};
use crate::support::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const RULE_FILE: &str = "daemonset/overlays/metrics/prometheusrule.yaml";
const UNIT_TESTS: &str = "tests/prometheus/alerts.test.yaml";
const DASHBOARD: &str = "daemonset/overlays/metrics/dashboards/pod-identity-agent.json";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The tool's path, or `None` (skip) when it is missing and not required.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("PIA_REQUIRE_PROMETHEUS").as_deref() != Ok("1"),
            "{name} is required (PIA_REQUIRE_PROMETHEUS=1): apt-get install prometheus"
        );
        eprintln!("skipping: {name} not installed (apt-get install prometheus)");
    }
    found
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read");
    serde_norway::from_str(&text).expect("YAML")
}

/// The PrometheusRule's groups as a plain Prometheus rule file in `dir`.
fn extract_rules(dir: &Path) -> Value {
    let spec = yaml(&repo(RULE_FILE))["spec"].clone();
    std::fs::write(
        dir.join("rules.yaml"),
        serde_norway::to_string(&spec).expect("yaml"),
    )
    .expect("write rules");
    spec
}

fn alert_names(spec: &Value) -> Vec<String> {
    spec["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

fn run(cmd: &Path, args: &[&str], dir: &Path) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{} {args:?}:\n{text}", cmd.display());
    text
}

#[test]
fn promtool_checks_the_rules_and_unit_tests_every_alert() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = extract_rules(dir.path());
    std::fs::copy(repo(UNIT_TESTS), dir.path().join("alerts.test.yaml")).expect("copy");
    let checked = run(&promtool, &["check", "rules", "rules.yaml"], dir.path());
    assert!(checked.contains("SUCCESS"), "{checked}");
    run(
        &promtool,
        &["test", "rules", "alerts.test.yaml"],
        dir.path(),
    );

    // Every alert is tested firing (a non-empty expectation) and has a runbook in the README.
    let tests = yaml(&repo(UNIT_TESTS));
    let readme = std::fs::read_to_string(repo("README.md")).expect("README");
    let alerts = alert_names(&spec);
    assert!(alerts.len() >= 8, "{alerts:?}");
    for alert in &alerts {
        let fires = tests["tests"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["alert_rule_test"].as_array().cloned().unwrap_or_default())
            .any(|c| {
                c["alertname"] == alert.as_str()
                    && c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())
            });
        assert!(fires, "{alert} has no promtool test where it fires");
        assert!(
            readme.contains(&format!("#### {alert}\n")),
            "{alert} has no runbook section in the README"
        );
    }
}

/// A Prometheus server of our own on loopback, stopped (by PID, through `kill_on_drop`) when
/// the test ends.
struct Prometheus {
    _child: tokio::process::Child,
    addr: std::net::SocketAddr,
}

impl Prometheus {
    async fn start(bin: &Path, dir: &Path, target: std::net::SocketAddr) -> Prometheus {
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [rules.yaml]\n\
             scrape_configs:\n  - job_name: pod-identity-agent-metrics\n    \
             static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("config");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = tokio::process::Command::new(bin)
            .current_dir(dir)
            .arg("--config.file=prometheus.yml")
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            _child: child,
            addr,
        }
    }

    async fn api(&self, path: &str) -> Option<Value> {
        let r = get_result(self.addr, path, &[]).await.ok()?;
        (r.status == 200).then(|| r.json())
    }

    async fn query(&self, expr: &str) -> Value {
        let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        self.api(&format!("/api/v1/query?query={q}"))
            .await
            .unwrap_or_default()
    }

    /// Poll until `ready` accepts an answer of `path`, up to 60 s.
    async fn until(&self, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..240 {
            if let Some(v) = self.api(path).await {
                if ready(&v) {
                    return v;
                }
                last = v;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("Prometheus never answered {path} as expected; last: {last}");
    }
}

fn first_value(answer: &Value) -> Option<f64> {
    answer["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_agent_evaluates_the_rules_and_answers_the_dashboard() {
    let Some(bin) = tool("prometheus") else {
        return;
    };
    let fake = FakeEksAuth::start(CLUSTER).await;
    let endpoint = fake.endpoint();
    let mut args = loopback_server(CLUSTER, ["0"; 3]);
    args.extend(["--endpoint", &endpoint, "--max-cache-size", "2"]);
    let agent = spawn(agent_command(&args));
    let addr = agent.listening("serving credentials").await;
    let metrics = agent.listening("serving metrics").await;
    // Two pods: the cache is at its --max-cache-size, so PodIdentityAgentCacheNearFull goes
    // pending (its `for` is 15 minutes).
    for t in [token(), token()] {
        assert_eq!(
            get(addr, "/v1/credentials", &[("authorization", &t)])
                .await
                .status,
            200
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    extract_rules(dir.path());
    let prom = Prometheus::start(&bin, dir.path(), metrics).await;

    // A metric, scraped from the agent.
    let q: String = form_urlencoded::byte_serialize(
        br#"pod_identity_http_response{job="pod-identity-agent-metrics",code="200"}"#,
    )
    .collect();
    let scraped = prom
        .until(&format!("/api/v1/query?query={q}"), |v| {
            first_value(v).is_some_and(|n| n >= 2.0)
        })
        .await;
    assert_eq!(
        scraped["data"]["result"][0]["metric"]["instance"],
        metrics.to_string()
    );
    // Every rule loaded and evaluates without error.
    let rules = prom
        .until("/api/v1/rules", |v| {
            v["data"]["groups"].as_array().is_some_and(|g| {
                g.iter().all(|g| {
                    g["lastEvaluation"]
                        .as_str()
                        .is_some_and(|t| !t.starts_with("0001"))
                })
            })
        })
        .await;
    for group in rules["data"]["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            assert_eq!(rule["health"], "ok", "{rule}");
        }
    }
    // A recording rule, computed from the agent's gauges: 2 entries of 2.
    let ratio = prom
        .until(
            "/api/v1/query?query=pod_identity%3Acache_utilisation%3Aratio",
            |v| first_value(v).is_some(),
        )
        .await;
    assert_eq!(first_value(&ratio), Some(1.0), "{ratio}");
    // An alert rule, evaluated on it.
    let alerts = prom
        .until("/api/v1/alerts", |v| {
            v["data"]["alerts"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|a| a["labels"]["alertname"] == "PodIdentityAgentCacheNearFull")
            })
        })
        .await;
    let near_full = alerts["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["labels"]["alertname"] == "PodIdentityAgentCacheNearFull")
        .expect("alert");
    assert_eq!(near_full["state"], "pending", "{near_full}");
    assert_eq!(near_full["labels"]["instance"], metrics.to_string());
    // The healthy agent raises nothing else.
    for a in alerts["data"]["alerts"].as_array().into_iter().flatten() {
        assert_eq!(
            a["labels"]["alertname"], "PodIdentityAgentCacheNearFull",
            "{a}"
        );
    }

    // Every dashboard query is valid PromQL that Prometheus answers, with Grafana's variables
    // as Grafana would substitute them.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo(DASHBOARD)).expect("dashboard"))
            .expect("JSON");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            let answer = prom.query(&expr).await;
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
            queries += 1;
        }
    }
    assert!(queries >= 14, "{queries}");
    let entries = prom
        .query(r#"sum(pod_identity_cache_entries{instance=~".*"})"#)
        .await;
    assert_eq!(first_value(&entries), Some(2.0), "{entries}");
}
