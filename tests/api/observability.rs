//! Metrics, the Grafana dashboard, the alert rules and the deploy files, checked with the real
//! tools: promtool, a real Prometheus scraping a real listener, docker-compose, systemd-analyze.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::helpers::{
    CarrierResult, TestApp, carrier_callback, fixture, free_port, spawn_app, upload_callback,
    with_callback_count,
};

const FAMILIES: &[&str] = &[
    "m2m_callbacks_total",
    "m2m_callback_duration_seconds",
    "m2m_callback_attempts_total",
    "m2m_device_outcomes_total",
    "m2m_faults_total",
    "m2m_upload_lines_total",
    "m2m_jobs",
    "m2m_job_completion_seconds",
    "m2m_store_commit_seconds",
    "m2m_store_batch_size",
    "m2m_build_info",
    "m2m_platform_registration",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
];

/// The app with the periodic platform check on, against a platform that cannot be reached (every
/// service `error`), so that /metrics carries `m2m_platform_registration` as a watching
/// listener's does.
async fn spawn_watching_app() -> TestApp {
    crate::helpers::spawn_app_with(|settings| {
        let unreachable = "http://127.0.0.1:1".to_owned();
        settings.platform = m2m_listener::configuration::PlatformSettings {
            oauth_url: unreachable.clone(),
            m2m_url: unreachable,
            client_id: "observability".to_owned(),
            client_secret: m2m_listener::domain::Secret::new("unused"),
            username: "observability".to_owned(),
            password: m2m_listener::domain::Secret::new("unused"),
            account: "0000000001-00001".to_owned(),
            callback_url: "http://127.0.0.1:9001/".to_owned(),
            services: vec!["CarrierService".to_owned(), "DeviceService".to_owned()],
            check_interval_s: 3600,
            ..Default::default()
        };
        // A webhook sink, so that the event families (labelled by sink) are exported too.
        settings.events.webhooks = vec![crate::events::webhook("ops", "http://127.0.0.1:9/", &[])];
    })
    .await
}

fn repository(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A tool the suite needs; `.ci/run` installs it. Missing is a failure, not a skip.
fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|output| output.status.success());
    assert!(
        found.unwrap_or(false),
        "{name} is not installed; .ci/run installs it (apt-get install -y prometheus docker-compose)"
    );
    Command::new(name)
}

/// Stored, duplicate, unauthorized, malformed, upload and failed callbacks, and a completed job.
async fn feed(app: &TestApp) {
    app.register(
        json!({"request_id": "metrics-job", "operation": "activate", "expected_devices": 1}),
    )
    .await;
    app.post_callback(carrier_callback(
        "metrics-job",
        &[("IMEI", "350000000000071")],
        CarrierResult::Activated { mdn: "5550000071" },
    ))
    .await;
    app.post_callback(with_callback_count("activate_seed004.xml", 1))
        .await;
    app.post_callback(with_callback_count("activate_seed004.xml", 2))
        .await;
    app.post_callback(fixture("upload_seed001.xml")).await;
    app.post_callback(fixture("activate_failed.xml")).await;
    let known_fault = CarrierResult::Failed {
        code: "CarrierService.INPUT_INVALID.DeviceState.Invalid",
        message: "The device state is not valid.",
    };
    app.post_callback(carrier_callback(
        "metrics-fault",
        &[("IMEI", "350000000000072")],
        known_fault,
    ))
    .await;
    app.post_callback(fixture("activate_seed004_ambiguous.xml"))
        .await;
    app.post_callback(
        String::from_utf8(fixture("deactivate_bare.xml"))
            .unwrap()
            .replace("s3cret-rotation-A", "wrong"),
    )
    .await;
    app.post_callback("not a callback").await;
    app.post_callback(upload_callback(
        "metrics-upload",
        &[(
            "89140000000000000081",
            "350000000000081",
            "Device upload request submitted",
        )],
        (1, 1, 0, 0),
    ))
    .await;
}

async fn exposition(app: &TestApp) -> String {
    let response = app.get_api("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    response.text().await.unwrap()
}

/// Metric family names in an exposition (from its `# TYPE` lines).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn metrics_carry_every_family_with_bounded_labels_and_pass_promtool() {
    let app = spawn_watching_app().await;
    feed(&app).await;

    let text = exposition(&app).await;

    let found = families(&text);
    for family in FAMILIES {
        assert!(found.contains(*family), "{family} missing from /metrics");
    }
    for expected in [
        r#"m2m_callbacks_total{kind="carrier_service",result="stored"} 4"#,
        r#"m2m_callbacks_total{kind="carrier_service",result="duplicate"} 1"#,
        // Refused before its body is parsed: the kind is not known.
        r#"m2m_callbacks_total{kind="unknown",result="unauthorized"} 1"#,
        r#"m2m_callbacks_total{kind="unknown",result="quarantined"} 1"#,
        r#"m2m_callbacks_total{kind="unknown",result="bad_request"} 1"#,
        r#"m2m_callback_attempts_total{attempt="2"} 1"#,
        r#"m2m_device_outcomes_total{operation="activate",status="succeeded"} 2"#,
        r#"m2m_faults_total{code="INPUT_INVALID.DeviceState.Invalid"} 1"#,
        r#"m2m_faults_total{code="other"} 1"#,
        r#"m2m_upload_lines_total{result="succeeded"} 2"#,
        r#"m2m_upload_lines_total{result="accepted"} 1"#,
        r#"m2m_jobs{state="completed"} 3"#,
        r#"m2m_jobs{state="in_progress"} 2"#,
        r#"m2m_job_completion_seconds_count{operation="upload_devices"} 2"#,
        r#"m2m_job_completion_seconds_count{operation="activate"} 1"#,
        r#"m2m_platform_registration{service="DeviceService",state="ours"} 0"#,
    ] {
        assert!(text.contains(expected), "{expected} not in:\n{text}");
    }
    for identifier in [
        "2c90bd28",
        "metrics-job",
        "350000000000071",
        "A1000000444461",
        "5096306081",
    ] {
        assert!(
            !text.contains(identifier),
            "an id leaked into a label: {identifier}"
        );
    }

    let mut promtool = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[tokio::test]
async fn a_fresh_listener_exports_every_family_with_its_known_series_at_zero() {
    let app = spawn_watching_app().await;

    let text = exposition(&app).await;

    let found = families(&text);
    for family in FAMILIES {
        assert!(
            found.contains(*family),
            "{family} missing from a fresh /metrics"
        );
    }
    for expected in [
        r#"m2m_device_outcomes_total{operation="activate",status="failed"} 0"#,
        r#"m2m_device_outcomes_total{operation="activate",status="succeeded"} 0"#,
        r#"m2m_device_outcomes_total{operation="upload_devices",status="accepted"} 0"#,
        r#"m2m_faults_total{code="other"} 0"#,
        r#"m2m_faults_total{code="INPUT_INVALID.DeviceState.Invalid"} 0"#,
        r#"m2m_faults_total{code="REQUEST_FAILED.UnexpectedError"} 0"#,
        r#"m2m_job_completion_seconds_count{operation="activate"} 0"#,
        r#"m2m_job_completion_seconds_count{operation="upload_devices"} 0"#,
        r#"m2m_job_completion_seconds_count{operation="other"} 0"#,
        r#"m2m_upload_lines_total{result="failed"} 0"#,
        r#"m2m_jobs{state="pending"} 0"#,
        r#"m2m_callback_attempts_total{attempt="1"} 0"#,
        r#"m2m_platform_registration{service="CarrierService",state="ours"} 0"#,
        r#"m2m_platform_registration{service="DeviceService",state="missing"} 0"#,
    ] {
        assert!(
            text.contains(expected),
            "{expected} not in a fresh /metrics"
        );
    }
    // Only combinations that can occur: a fault label is never a variant code (`CODE~TAG`),
    // which no callback carries; an accepted outcome can be any operation's (a REST `Pending`).
    assert!(
        text.contains(r#"m2m_device_outcomes_total{operation="activate",status="accepted"} 0"#)
    );
    assert!(!text.contains(r#"m2m_faults_total{code="REQUEST_FAILED.UnexpectedError~"#));
    let series = text
        .lines()
        .filter(|line| line.starts_with("m2m_") && !line.starts_with("m2m_build_info"))
        .count();
    assert!(series < 1500, "{series} series on a fresh listener");
}

#[tokio::test]
async fn the_first_failures_after_a_start_show_in_increase_on_a_real_prometheus() {
    let app = spawn_app().await;
    let target = app.api_url.trim_start_matches("http://").to_owned();
    let prometheus = start_prometheus(&target).await;
    let client = reqwest::Client::new();
    // How many series `expression` selects now; 0 while Prometheus is still starting.
    let samples = async |expression: &str| {
        let url = format!(
            "{}/api/v1/query?{}",
            prometheus.url,
            form_urlencoded::Serializer::new(String::new())
                .append_pair("query", expression)
                .finish()
        );
        let Ok(response) = client.get(url).send().await else {
            return 0;
        };
        let answer: Value =
            serde_json::from_slice(&response.bytes().await.unwrap_or_default()).unwrap_or_default();
        answer["data"]["result"].as_array().map_or(0, Vec::len)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while samples(r#"m2m_faults_total{code="other"}"#).await == 0 {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the fresh listener"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    app.post_callback(carrier_callback(
        "first-failure",
        &[("IMEI", "350000000000091")],
        CarrierResult::Failed {
            code: "CarrierService.INPUT_INVALID.DeviceState.Invalid",
            message: "The device state is not valid.",
        },
    ))
    .await;

    let expressions = [
        r#"increase(m2m_faults_total{code="INPUT_INVALID.DeviceState.Invalid"}[1m]) > 0"#,
        // A fault without an operation result: operation `other`.
        r#"sum(increase(m2m_device_outcomes_total{status="failed"}[1m])) > 0"#,
    ];
    for expression in expressions {
        loop {
            if samples(expression).await > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{expression} never held: the first failure was lost to rate()"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// A Prometheus server of the test's own, stopped on drop.
struct Prometheus {
    child: Child,
    url: String,
    _directory: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_prometheus(target: &str) -> Prometheus {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: m2m-listener\n    static_configs:\n      - targets: [\"{target}\"]\n",
            repository("dashboards/alerts.yml").display()
        ),
    )
    .unwrap();
    let port = free_port();
    let child = tool("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            directory.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _directory: directory,
    }
}

async fn query(client: &reqwest::Client, prometheus: &Prometheus, expression: &str) -> Value {
    try_query(client, prometheus, expression)
        .await
        .expect("Prometheus answers")
}

/// A query, or `None` while Prometheus is not listening yet (it starts slowly on a busy machine).
async fn try_query(
    client: &reqwest::Client,
    prometheus: &Prometheus,
    expression: &str,
) -> Option<Value> {
    let response = client
        .get(format!(
            "{}/api/v1/query?{}",
            prometheus.url,
            form_urlencoded::Serializer::new(String::new())
                .append_pair("query", expression)
                .finish()
        ))
        .send()
        .await
        .ok()?;
    serde_json::from_slice(&response.bytes().await.ok()?).ok()
}

/// Grafana's variables, as a dashboard user with everything selected would have them.
fn with_variables(expression: &str) -> String {
    expression
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$job", ".*")
        .replace("$instance", ".*")
}

fn metric_names(expression: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expression.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        let rest = &expression[index..];
        let starts_name =
            index == 0 || !(bytes[index - 1].is_ascii_alphanumeric() || bytes[index - 1] == b'_');
        if starts_name && (rest.starts_with("m2m_") || rest.starts_with("process_")) {
            let length = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..length].to_owned());
            index += length;
        } else {
            index += 1;
        }
    }
    names
}

/// Whether `name` is a family the listener exports, or a histogram series of one.
fn exported(name: &str, families: &BTreeSet<String>) -> bool {
    families.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|family| families.contains(family))
        })
}

fn dashboard_expressions() -> Vec<String> {
    fn collect(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(object) => {
                if let Some(Value::String(expression)) = object.get("expr") {
                    found.push(expression.clone());
                }
                object.values().for_each(|child| collect(child, found));
            }
            Value::Array(values) => values.iter().for_each(|child| collect(child, found)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(repository("dashboards/m2m-listener.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut found = Vec::new();
    collect(&dashboard, &mut found);
    found
}

#[tokio::test]
async fn every_dashboard_and_alert_expression_evaluates_against_a_real_prometheus() {
    let app = spawn_watching_app().await;
    feed(&app).await;
    let families = families(&exposition(&app).await);
    let target = app.api_url.trim_start_matches("http://").to_owned();
    let prometheus = start_prometheus(&target).await;
    let client = reqwest::Client::new();

    // Scraped, and every rule group evaluated at least once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the listener and evaluate the rules in time"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(scraped) = try_query(
            &client,
            &prometheus,
            r#"m2m_build_info{job="m2m-listener"}"#,
        )
        .await
        else {
            continue;
        };
        if scraped["data"]["result"]
            .as_array()
            .is_none_or(Vec::is_empty)
        {
            continue;
        }
        let Ok(response) = client
            .get(format!("{}/api/v1/rules", prometheus.url))
            .send()
            .await
        else {
            continue;
        };
        let rules: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        let evaluated = rules["data"]["groups"].as_array().is_some_and(|groups| {
            !groups.is_empty()
                && groups.iter().all(|group| {
                    !group["lastEvaluation"]
                        .as_str()
                        .unwrap_or("0001")
                        .starts_with("0001")
                })
        });
        if evaluated {
            break;
        }
    }

    let expressions = dashboard_expressions();
    assert!(expressions.len() >= 20, "the dashboard has its panels");
    for expression in &expressions {
        let answer = query(&client, &prometheus, &with_variables(expression)).await;
        assert_eq!(
            answer["status"], "success",
            "dashboard expression failed: {expression}\n{answer}"
        );
        for name in metric_names(expression) {
            assert!(
                exported(&name, &families),
                "dashboard uses {name}, which the listener does not export"
            );
        }
    }

    let response = client
        .get(format!("{}/api/v1/rules", prometheus.url))
        .send()
        .await
        .unwrap();
    let rules: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    let rules: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .collect();
    assert_eq!(
        rules.len(),
        11,
        "every rule of dashboards/alerts.yml is loaded"
    );
    for rule in rules {
        let expression = rule["query"].as_str().unwrap();
        assert_eq!(
            rule["health"], "ok",
            "rule {} failed: {}",
            rule["name"], rule["lastError"]
        );
        assert!(
            rule["annotations"]["summary"].is_string()
                && rule["annotations"]["runbook_url"].is_string(),
            "{rule}"
        );
        let answer = query(&client, &prometheus, expression).await;
        assert_eq!(
            answer["status"], "success",
            "rule expression failed: {expression}\n{answer}"
        );
        for name in metric_names(expression) {
            assert!(
                exported(&name, &families),
                "rule {} uses {name}, which the listener does not export",
                rule["name"]
            );
        }
        let anchor = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap()
            .split('#')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let operations = std::fs::read_to_string(repository("docs/operations.md"))
            .unwrap()
            .to_lowercase();
        assert!(
            operations.contains(&format!("### {anchor}")),
            "docs/operations.md has no section for {anchor}"
        );
    }
}

#[test]
fn promtool_accepts_the_rules_and_the_deploy_prometheus_config() {
    let rules = tool("promtool")
        .args(["check", "rules"])
        .arg(repository("dashboards/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );

    promtool_check_deploy_config("deploy/prometheus.yml");
}

/// `promtool check config` on a Prometheus config of `deploy/`. The config names the rules where
/// the container mounts them; they are checked against the file here. Returns the config's text.
fn promtool_check_deploy_config(file: &str) -> String {
    let directory = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repository(file)).unwrap();
    let config = text.replace(
        "/etc/prometheus/alerts.yml",
        &repository("dashboards/alerts.yml").display().to_string(),
    );
    let path = directory.path().join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let checked = tool("promtool")
        .args(["check", "config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{file}: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    text
}

#[test]
fn the_compose_file_is_valid() {
    let output = tool("docker-compose")
        .args(["-f"])
        .arg(repository("deploy/docker-compose.yml"))
        .arg("config")
        .env("M2M_API_TOKEN", "test-token")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = String::from_utf8_lossy(&output.stdout);
    for service in ["listener:", "prometheus:", "grafana:"] {
        assert!(rendered.contains(service), "{service} missing:\n{rendered}");
    }
}

const POSTGRES_COMPOSE_VARIABLES: &[(&str, &str)] = &[
    ("M2M_API_TOKEN", "test-token"),
    ("M2M_POSTGRES_PASSWORD", "test-postgres-password"),
    ("M2M_CALLBACK_USERNAME", "test-user"),
    ("M2M_CALLBACK_PASSWORD", "test-password"),
];

#[test]
fn the_postgres_compose_file_is_valid() {
    let compose = || {
        let mut command = tool("docker-compose");
        command
            .args(["-f"])
            .arg(repository("deploy/docker-compose.postgres.yml"))
            .arg("config");
        for (name, _) in POSTGRES_COMPOSE_VARIABLES {
            command.env_remove(name);
        }
        command
    };
    let output = compose()
        .envs(POSTGRES_COMPOSE_VARIABLES.iter().copied())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = String::from_utf8_lossy(&output.stdout);
    for service in [
        "postgres:",
        "listener-1:",
        "listener-2:",
        "listener-3:",
        "lb:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(rendered.contains(service), "{service} missing:\n{rendered}");
    }
    assert_eq!(
        rendered
            .matches("M2M_STORAGE__URL: postgres://m2m:test-postgres-password@postgres:5432/m2m")
            .count(),
        3,
        "every listener uses the shared database:\n{rendered}"
    );
    assert_eq!(
        rendered
            .matches("M2M_CALLBACK__CREDENTIALS__0__USERNAME: test-user")
            .count(),
        3,
        "every listener has the configured credentials:\n{rendered}"
    );

    // The credentials are required: without them the file does not render.
    let missing = compose()
        .envs(
            POSTGRES_COMPOSE_VARIABLES
                .iter()
                .copied()
                .filter(|(name, _)| *name != "M2M_CALLBACK_PASSWORD"),
        )
        .output()
        .unwrap();
    assert!(
        !missing.status.success(),
        "rendered without a callback password"
    );
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("M2M_CALLBACK_PASSWORD"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

#[test]
fn promtool_accepts_the_replicas_prometheus_config() {
    let text = promtool_check_deploy_config("deploy/prometheus-replicas.yml");
    for listener in ["listener-1:9090", "listener-2:9090", "listener-3:9090"] {
        assert!(text.contains(listener), "{listener} is not scraped");
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let directory = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repository("deploy/m2m-listener.service"))
        .unwrap()
        .replace(
            "/usr/local/bin/m2m-listener",
            env!("CARGO_BIN_EXE_m2m-listener"),
        );
    let path = directory.path().join("m2m-listener.service");
    std::fs::write(&path, unit).unwrap();

    let output = tool("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();

    let messages = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{messages}");
    assert!(
        !messages.contains("m2m-listener.service:"),
        "the unit has warnings:\n{messages}"
    );
}

#[test]
fn every_deploy_and_dashboard_file_parses() {
    let mut checked = 0;
    let mut pending = vec![repository("deploy"), repository("dashboards")];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            let text = || std::fs::read_to_string(&path).unwrap();
            match path.extension().and_then(|extension| extension.to_str()) {
                _ if path.is_dir() => pending.push(path.clone()),
                Some("yml" | "yaml") => {
                    for document in serde_yaml::Deserializer::from_str(&text()) {
                        serde_yaml::Value::deserialize(document)
                            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                    }
                    checked += 1;
                }
                Some("json") => {
                    serde_json::from_str::<Value>(&text())
                        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                    checked += 1;
                }
                _ => {}
            }
        }
    }
    assert!(checked >= 7, "checked {checked} files");
}
