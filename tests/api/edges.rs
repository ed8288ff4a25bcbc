//! The small edges a user hits first (issue 12, items 8 and 9): one validation path for the
//! configuration, the API's answers to paths, ids, cursors and bearer schemes it does not serve,
//! and the command line's behaviour on an empty argument, a closed pipe, refused callbacks and
//! JSON logs.
//!
//! They are about settings, routing and the command line, not about storage (the API answers
//! here come before any storage call), so they run on SQLite only.

use std::io::{BufReader, Read};
use std::process::{Command, Output, Stdio};

use m2m_listener::domain::Secret;

use crate::helpers::{fixture, read_until, spawn_app, spawn_app_with, terminate};

const BINARY: &str = env!("CARGO_BIN_EXE_m2m-listener");

/// The binary in `directory`, on port 0, with none of the caller's settings.
fn listener_command(directory: &std::path::Path) -> Command {
    let mut command = Command::new(BINARY);
    command.current_dir(directory);
    for (name, _) in std::env::vars() {
        if name.starts_with("M2M_") {
            command.env_remove(name);
        }
    }
    command
        .env_remove("RUST_LOG")
        .env("M2M_CALLBACK__LISTEN", "127.0.0.1:0")
        .env("M2M_API__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn run(command: &mut Command) -> (Option<i32>, String, String) {
    described(command.output().expect("the binary runs"))
}

/// As [`run`], off the async test's thread, so that a listener served by the test itself keeps
/// answering meanwhile.
async fn run_beside_the_app(mut command: Command) -> (Option<i32>, String, String) {
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the command's thread")
        .expect("the binary runs");
    described(output)
}

fn described(output: Output) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = output;
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Reads lines until one contains `marker`; returns everything read.
async fn json_body(response: reqwest::Response) -> serde_json::Value {
    let bytes = response.bytes().await.expect("a body");
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
}

/// The write end of a pipe whose read end is already closed: every write to it fails with
/// EPIPE, as `| head -c1` does once `head` has what it wanted.
fn closed_pipe() -> Stdio {
    let mut reader = Command::new("true")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("true runs");
    let writer = reader.stdin.take().expect("the pipe's write end");
    reader.wait().expect("true exits");
    Stdio::from(writer)
}

// Item 8: one validation path for the configuration.

#[test]
fn check_config_refuses_the_log_filter_that_serve_refuses_and_both_exit_2_naming_it() {
    let directory = tempfile::tempdir().unwrap();
    let checked = run(listener_command(directory.path())
        .arg("check-config")
        .env("M2M_TELEMETRY__LEVEL", "bogus[[["));
    let served = run(listener_command(directory.path()).env("M2M_TELEMETRY__LEVEL", "bogus[[["));

    for (code, _, stderr) in [&checked, &served] {
        assert_eq!(*code, Some(2), "{stderr}");
        assert!(
            stderr.contains("telemetry.level") && stderr.contains("\"bogus[[[\""),
            "{stderr}"
        );
    }
    assert!(!directory.path().join("data").exists());
}

#[test]
fn postgres_without_callback_credentials_is_a_configuration_error_in_check_config_and_serve() {
    let directory = tempfile::tempdir().unwrap();
    let url = "postgres://m2m:Db-Secret-9@127.0.0.1:1/m2m";
    let checked = run(listener_command(directory.path())
        .arg("check-config")
        .env("M2M_STORAGE__URL", url));
    let served = run(listener_command(directory.path()).env("M2M_STORAGE__URL", url));

    for (code, stdout, stderr) in [&checked, &served] {
        assert_eq!(*code, Some(2), "{stdout}{stderr}");
        assert!(
            stderr.contains("callback.credentials") && stderr.contains("storage.url"),
            "{stderr}"
        );
        assert!(!stdout.contains("Db-Secret-9") && !stderr.contains("Db-Secret-9"));
    }
}

#[test]
fn a_ca_file_with_sslmode_disable_or_unreadable_is_refused_by_check_config_naming_the_key() {
    let directory = tempfile::tempdir().unwrap();
    let ca_file = directory.path().join("ca.pem");
    std::fs::write(&ca_file, "not a certificate\n").unwrap();
    let with_pair = |command: &mut Command| {
        command
            .env("M2M_CALLBACK__CREDENTIALS__0__USERNAME", "ops")
            .env("M2M_CALLBACK__CREDENTIALS__0__PASSWORD", "pass");
    };
    let mut disabled = listener_command(directory.path());
    with_pair(&mut disabled);
    let disabled = run(disabled
        .arg("check-config")
        .env(
            "M2M_STORAGE__URL",
            "postgres://m2m@127.0.0.1:1/m2m?sslmode=disable",
        )
        .env("M2M_STORAGE__CA_FILE", &ca_file));
    let mut unreadable = listener_command(directory.path());
    with_pair(&mut unreadable);
    let unreadable = run(unreadable
        .arg("check-config")
        .env("M2M_STORAGE__URL", "postgres://m2m@127.0.0.1:1/m2m")
        .env("M2M_STORAGE__CA_FILE", directory.path().join("missing.pem")));
    let mut not_pem = listener_command(directory.path());
    with_pair(&mut not_pem);
    let not_pem = run(not_pem
        .arg("check-config")
        .env("M2M_STORAGE__URL", "postgres://m2m@127.0.0.1:1/m2m")
        .env("M2M_STORAGE__CA_FILE", &ca_file));

    for (code, stdout, stderr) in [&disabled, &unreadable, &not_pem] {
        assert_eq!(*code, Some(2), "{stdout}{stderr}");
        assert!(stderr.contains("storage.ca_file"), "{stderr}");
    }
    assert!(disabled.2.contains("sslmode=disable"), "{}", disabled.2);
}

#[test]
fn a_missing_tls_certificate_is_refused_by_check_config_and_serve_with_exit_2() {
    let directory = tempfile::tempdir().unwrap();
    let with_tls = |command: &mut Command| {
        command
            .env("M2M_CALLBACK__TLS__CERT_PATH", "/nonexistent/fullchain.pem")
            .env("M2M_CALLBACK__TLS__KEY_PATH", "/nonexistent/privkey.pem");
    };
    let mut checked = listener_command(directory.path());
    with_tls(&mut checked);
    let checked = run(checked.arg("check-config"));
    let mut served = listener_command(directory.path());
    with_tls(&mut served);
    let served = run(&mut served);

    for (code, stdout, stderr) in [&checked, &served] {
        assert_eq!(*code, Some(2), "{stdout}{stderr}");
        assert!(stderr.contains("callback.tls.cert_path"), "{stderr}");
    }
}

#[test]
fn enumerated_settings_list_their_valid_values_and_echo_the_bad_one() {
    let directory = tempfile::tempdir().unwrap();
    let refused = |variable: &str, value: &str| {
        run(listener_command(directory.path())
            .arg("check-config")
            .env(variable, value))
    };

    let synchronous = refused("M2M_STORAGE__SYNCHRONOUS", "whenever");
    let format = refused("M2M_TELEMETRY__FORMAT", "xml");
    let listen = refused("M2M_CALLBACK__LISTEN", "nope");
    let connections = refused("M2M_CALLBACK__MAX_CONNECTIONS", "0");
    let accepted = run(listener_command(directory.path())
        .arg("check-config")
        .env("M2M_STORAGE__SYNCHRONOUS", "EXTRA"));

    for ((code, _, stderr), key, shown) in [
        (&synchronous, "storage.synchronous", "\"whenever\""),
        (&format, "telemetry.format", "\"xml\""),
        (&listen, "callback.listen", "\"nope\""),
        (&connections, "callback.max_connections", "got 0"),
    ] {
        assert_eq!(*code, Some(2), "{stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(shown),
            "{key}: {stderr}"
        );
    }
    assert!(
        synchronous.2.contains("off|normal|full|extra"),
        "{}",
        synchronous.2
    );
    assert!(format.2.contains("pretty|json"), "{}", format.2);
    assert_eq!(accepted.0, Some(0), "{}", accepted.2);
    assert!(
        accepted.1.contains("synchronous = \"extra\""),
        "{}",
        accepted.1
    );
}

#[tokio::test]
async fn a_password_alone_from_the_environment_is_a_pair_with_an_empty_username() {
    let directory = tempfile::tempdir().unwrap();
    let checked = run(listener_command(directory.path()).arg("check-config").env(
        "M2M_CALLBACK__CREDENTIALS__0__PASSWORD",
        "Only-A-Password-1",
    ));
    assert_eq!(checked.0, Some(0), "{}", checked.2);
    assert!(
        checked.1.contains("username = \"\"") && !checked.1.contains("Only-A-Password-1"),
        "{}",
        checked.1
    );

    let mut child = listener_command(directory.path())
        .env(
            "M2M_CALLBACK__CREDENTIALS__0__PASSWORD",
            "Only-A-Password-1",
        )
        .spawn()
        .expect("listener starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let banner = read_until(&mut stdout, "listening");
    let callback_url = banner
        .lines()
        .find_map(|line| line.trim().strip_prefix("callbacks: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no callback URL in {banner}"))
        .to_owned();
    let with_password = |password: &str| {
        String::from_utf8(fixture("activate_seed004.xml"))
            .unwrap()
            .replacen(
                "<Password/>",
                &format!("<Password>{password}</Password>"),
                1,
            )
    };
    let client = reqwest::Client::new();
    let accepted = client
        .post(&callback_url)
        .body(with_password("Only-A-Password-1"))
        .send()
        .await
        .unwrap()
        .status();
    let empty_pair = client
        .post(&callback_url)
        .body(with_password(""))
        .send()
        .await
        .unwrap()
        .status();
    terminate(&child);
    assert!(child.wait().unwrap().success());

    assert!(banner.contains("1 configured pair(s)"), "{banner}");
    assert_eq!(accepted, 200);
    assert_eq!(
        empty_pair, 403,
        "the empty pair is accepted only when configured"
    );
}

#[tokio::test]
async fn allowed_sources_and_trusted_proxies_accept_a_plain_string_or_a_comma_separated_list() {
    let directory = tempfile::tempdir().unwrap();
    let checked = run(listener_command(directory.path())
        .arg("check-config")
        .env("M2M_CALLBACK__ALLOWED_SOURCES", "10.0.0.0/8, 192.0.2.1")
        .env("M2M_CALLBACK__TRUSTED_PROXIES", "127.0.0.1"));
    let refused = run(listener_command(directory.path())
        .arg("check-config")
        .env("M2M_CALLBACK__ALLOWED_SOURCES", "10.0.0.0/8,not-a-network"));
    assert_eq!(checked.0, Some(0), "{}", checked.2);
    let shown: toml::Value = toml::from_str(&checked.1).expect("check-config prints TOML");
    assert_eq!(
        shown["callback"]["allowed_sources"],
        toml::Value::from(vec!["10.0.0.0/8", "192.0.2.1"]),
        "{}",
        checked.1
    );
    assert_eq!(
        shown["callback"]["trusted_proxies"],
        toml::Value::from(vec!["127.0.0.1"]),
        "{}",
        checked.1
    );
    assert_eq!(refused.0, Some(2));
    assert!(
        refused.2.contains("callback.allowed_sources[1]") && refused.2.contains("not-a-network"),
        "{}",
        refused.2
    );

    // Applied, not only parsed: loopback is not in the list, so its callback is refused...
    let mut child = listener_command(directory.path())
        .env("M2M_CALLBACK__ALLOWED_SOURCES", "192.0.2.0/24,198.51.100.7")
        .env("M2M_CALLBACK__CREDENTIALS__0__USERNAME", "")
        .env("M2M_CALLBACK__CREDENTIALS__0__PASSWORD", "")
        .spawn()
        .expect("listener starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let banner = read_until(&mut stdout, "listening");
    let callback_url = banner
        .lines()
        .find_map(|line| line.trim().strip_prefix("callbacks: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no callback URL in {banner}"))
        .to_owned();
    let client = reqwest::Client::new();
    let from_loopback = client
        .post(&callback_url)
        .body(fixture("activate_seed004.xml"))
        .send()
        .await
        .unwrap()
        .status();
    terminate(&child);
    assert!(child.wait().unwrap().success());
    assert_eq!(from_loopback, 403);
}

// Item 9: the API's edges.

#[tokio::test]
async fn unknown_api_paths_answer_404_and_a_wrong_method_on_an_endpoint_405_with_allow() {
    let app = spawn_app().await;

    for path in [
        "/api/v1/jobs/x/y/z",
        "/api/v1/jobs/x/devices/more",
        "/api/v1/deliveries/1/nope",
        "/api/v1/deliveries/1/raw/more",
        "/api/v1/devices/IMEI",
        "/api/v1/devices/IMEI/1/more",
        "/api/v1/errors/a/b",
        "/api/v1/nothing",
        "/api/v2/jobs",
        "/healthz/more",
    ] {
        let response = app.get_api(path).await;
        let status = response.status();
        let body = json_body(response).await;
        assert_eq!(status, 404, "GET {path}: {body}");
        assert_eq!(body["error"]["code"], "NOT_FOUND", "GET {path}");
    }
    for (method, path, allowed) in [
        (reqwest::Method::DELETE, "/api/v1/jobs", "GET, HEAD, POST"),
        (reqwest::Method::POST, "/api/v1/jobs/x", "GET, HEAD"),
        (reqwest::Method::PUT, "/api/v1/jobs/x/devices", "GET, HEAD"),
        (reqwest::Method::POST, "/api/v1/deliveries", "GET, HEAD"),
        (
            reqwest::Method::POST,
            "/api/v1/deliveries/1/raw",
            "GET, HEAD",
        ),
        (reqwest::Method::POST, "/api/v1/devices/IMEI/1", "GET, HEAD"),
        (reqwest::Method::POST, "/api/v1/errors/X", "GET, HEAD"),
        (reqwest::Method::POST, "/healthz", "GET, HEAD"),
    ] {
        let response = app
            .client
            .request(method.clone(), format!("{}{path}", app.api_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(
            response
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok()),
            Some(allowed),
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn a_delivery_id_that_is_not_a_positive_whole_number_answers_400_invalid_delivery_id() {
    let app = spawn_app().await;

    for id in [
        "abc",
        "-1",
        "0",
        "1.5",
        "+1",
        "%201",
        "0x10",
        "99999999999999999999",
    ] {
        let response = app.get_api(&format!("/api/v1/deliveries/{id}/raw")).await;
        let status = response.status();
        let body = json_body(response).await;
        assert_eq!(status, 400, "{id}: {body}");
        assert_eq!(body["error"]["code"], "INVALID_DELIVERY_ID", "{id}");
    }
    let absent = app.get_api("/api/v1/deliveries/424242/raw").await;
    assert_eq!(absent.status(), 404);
}

#[tokio::test]
async fn a_negative_or_malformed_cursor_answers_400_invalid_cursor() {
    let app = spawn_app().await;

    for listing in ["/api/v1/jobs", "/api/v1/deliveries"] {
        for cursor in [
            "-1",
            "-9223372036854775808",
            "abc",
            "1.5",
            "%2B5",
            "%205",
            "5%20",
            "1234567890123456789",
        ] {
            let response = app.get_api(&format!("{listing}?cursor={cursor}")).await;
            let status = response.status();
            let body = json_body(response).await;
            assert_eq!(status, 400, "{listing} cursor={cursor}: {body}");
            assert_eq!(
                body["error"]["code"], "INVALID_CURSOR",
                "{listing} {cursor}"
            );
        }
        for cursor in ["", "5", "123456789012345678"] {
            let response = app.get_api(&format!("{listing}?cursor={cursor}")).await;
            assert_eq!(response.status(), 200, "{listing} cursor={cursor}");
        }
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_without_regard_to_case() {
    let app =
        spawn_app_with(|settings| settings.api.token = Some(Secret::new("operator-token-456")))
            .await;
    let with_authorization = |value: &'static str| {
        app.client
            .get(format!("{}/api/v1/jobs", app.api_url))
            .header("Authorization", value)
            .send()
    };

    for accepted in [
        "Bearer operator-token-456",
        "bearer operator-token-456",
        "BEARER operator-token-456",
        "bEaReR   operator-token-456",
    ] {
        let response = with_authorization(accepted).await.unwrap();
        assert_eq!(response.status(), 200, "{accepted}");
    }
    for refused in [
        "Basic operator-token-456",
        "Beareroperator-token-456",
        "operator-token-456",
        "bearer operator-token-457",
        "bearer",
    ] {
        let response = with_authorization(refused).await.unwrap();
        assert_eq!(response.status(), 401, "{refused}");
    }
}

// Item 9: the command line's edges.

#[test]
fn jobs_show_with_an_empty_request_id_is_a_usage_error() {
    let directory = tempfile::tempdir().unwrap();
    // Nothing listens there: a command that tried to ask the API would fail with exit 1.
    let api = format!("http://127.0.0.1:{}", crate::helpers::free_port());

    for arguments in [
        &["show", ""][..],
        &["show", "", "--devices"][..],
        &["show", "   "][..],
        &["add", "", "--operation", "activate"][..],
    ] {
        let (code, _, stderr) = run(listener_command(directory.path())
            .env("M2M_API_URL", &api)
            .arg("jobs")
            .args(arguments));
        assert_eq!(code, Some(2), "jobs {arguments:?}: {stderr}");
        assert!(
            stderr.to_lowercase().contains("request_id"),
            "jobs {arguments:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn printing_to_a_closed_pipe_exits_quietly() {
    let app = spawn_app().await;
    app.register(serde_json::json!({"request_id": "pipe-job-1", "operation": "activate"}))
        .await;
    let directory = tempfile::tempdir().unwrap();

    for arguments in [
        &["check-config"][..],
        &["jobs", "list", "--json"][..],
        &["jobs", "list"][..],
        &["jobs", "show", "pipe-job-1"][..],
        &["jobs", "show", "pipe-job-1", "--devices"][..],
    ] {
        let mut command = listener_command(directory.path());
        command
            .env("M2M_API_URL", &app.api_url)
            .args(arguments)
            .stdout(closed_pipe());
        let (code, _, stderr) = run_beside_the_app(command).await;
        assert_eq!(code, Some(0), "{arguments:?}: {stderr}");
        assert!(stderr.is_empty(), "{arguments:?}: {stderr}");
    }
}

#[tokio::test]
async fn simulate_exits_non_zero_when_callbacks_are_refused() {
    let app = spawn_app().await;
    let directory = tempfile::tempdir().unwrap();
    let simulate = |password: &str| {
        let mut command = listener_command(directory.path());
        command
            .args([
                "simulate",
                "--url",
                &app.callback_url,
                "--api-url",
                &app.api_url,
            ])
            .args(["--username", "test", "--password", password])
            .args(["--jobs", "2", "--devices-per-job", "2", "--uploads", "0"])
            .args([
                "--sms",
                "0",
                "--max-attempts",
                "2",
                "--retry-interval-ms",
                "1",
            ]);
        run_beside_the_app(command)
    };

    let refused = simulate("Wrong-Sim-Password-3").await;
    let accepted = simulate("test").await;

    let (code, stdout, stderr) = refused;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("403"), "{stderr}");
    assert!(
        !stdout.contains("Wrong-Sim-Password-3") && !stderr.contains("Wrong-Sim-Password-3"),
        "the password is not echoed: {stdout}{stderr}"
    );
    assert_eq!(accepted.0, Some(0), "{}{}", accepted.1, accepted.2);
}

#[test]
fn with_json_logs_stdout_holds_only_json_lines_and_the_generated_password_is_shown_once_on_stderr()
{
    let directory = tempfile::tempdir().unwrap();
    let mut child = listener_command(directory.path())
        .env("M2M_TELEMETRY__FORMAT", "json")
        .spawn()
        .expect("listener starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut log = read_until(&mut stdout, "listening");
    terminate(&child);
    let status = child.wait().unwrap();
    stdout.read_to_string(&mut log).unwrap();
    let mut banner = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut banner)
        .unwrap();

    assert!(status.success(), "{log}{banner}");
    assert!(log.contains("listening"), "{log}");
    for line in log.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line on stdout: {line:?}"
        );
    }
    let password = banner
        .lines()
        .find_map(|line| line.trim().strip_prefix("password: "))
        .unwrap_or_else(|| panic!("no generated password in the banner: {banner}"));
    assert!(password.len() >= 32, "{banner}");
    assert_eq!(banner.matches(password).count(), 1, "{banner}");
    assert!(
        !log.contains(password),
        "the password reached the log: {log}"
    );
    assert!(banner.contains("callbacks: http://"), "{banner}");
}
