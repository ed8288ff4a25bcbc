//! The real binary: first start on embedded defaults, `check-config`, exit codes, SIGTERM, and no
//! secret in its output.

use std::io::{BufReader, Read};
use std::process::{Command, Stdio};

use crate::helpers::{fixture, read_until, terminate};

const BINARY: &str = env!("CARGO_BIN_EXE_m2m-listener");

fn listener_command(directory: &std::path::Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .current_dir(directory)
        .env_remove("M2M_CONFIG")
        .env_remove("RUST_LOG")
        .env("M2M_CALLBACK__LISTEN", "127.0.0.1:0")
        .env("M2M_API__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Reads stdout lines until one contains `marker`; returns everything read.
fn value_after<'a>(text: &'a str, label: &str) -> &'a str {
    let start = text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
        + label.len();
    text[start..].lines().next().unwrap_or_default().trim()
}

#[tokio::test]
async fn first_start_without_config_prints_generated_credentials_and_the_database_then_stops_on_sigterm()
 {
    let directory = tempfile::tempdir().unwrap();
    let mut child = listener_command(directory.path())
        .spawn()
        .expect("listener starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());

    let banner = read_until(&mut stdout, "listening");
    let username = value_after(&banner, "username:").to_owned();
    let password = value_after(&banner, "password:").to_owned();
    let database = value_after(&banner, "database:").to_owned();
    let callback_url = value_after(&banner, "callbacks:")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();

    assert!(
        username.starts_with("m2m-") && password.len() >= 32,
        "{banner}"
    );
    assert!(database.ends_with("data/m2m-listener.db"), "{banner}");
    assert!(directory.path().join("data/m2m-listener.db").exists());
    assert!(
        directory
            .path()
            .join("data/callback-credentials.toml")
            .exists()
    );

    // The generated pair works; a wrong password is refused and never echoed into the log; a
    // device credential password inside a stored callback is not logged either.
    let client = reqwest::Client::new();
    let with_credentials = |user: &str, pass: &str| {
        String::from_utf8(fixture("activate_seed004.xml"))
            .unwrap()
            .replacen("<Username/>", &format!("<Username>{user}</Username>"), 1)
            .replacen("<Password/>", &format!("<Password>{pass}</Password>"), 1)
    };
    let accepted = client
        .post(&callback_url)
        .body(with_credentials(&username, &password))
        .send()
        .await
        .unwrap();
    let refused = client
        .post(&callback_url)
        .body(with_credentials(&username, "Wrong-Password-Marker-77"))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);
    assert_eq!(refused.status(), 403);
    // A burst of refusals (a credentials mismatch after re-registration) is logged once per
    // interval, not once per request.
    for _ in 0..20 {
        let again = client
            .post(&callback_url)
            .body(with_credentials(&username, "Wrong-Password-Marker-77"))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 403);
    }

    terminate(&child);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit status {status:?}\n{rest}\n{stderr}");
    assert!(rest.contains("callback acknowledged"), "{rest}");
    assert_eq!(
        rest.matches("callback rejected").count(),
        1,
        "21 refusals within the 10 s interval are one log line:\n{rest}"
    );
    let output = format!("{rest}{stderr}");
    assert!(
        !output.contains("Wrong-Password-Marker-77"),
        "a submitted password reached the log:\n{output}"
    );
    assert!(
        !output.contains(&password),
        "the callback password reached the log:\n{output}"
    );
    assert!(
        !output.contains("<Password>5096306081</Password>") && !output.contains("\"Password\""),
        "{output}"
    );

    // A second start reuses the pair and does not print it again.
    let mut again = listener_command(directory.path()).spawn().unwrap();
    let mut again_out = BufReader::new(again.stdout.take().unwrap());
    let banner = read_until(&mut again_out, "listening");
    terminate(&again);
    assert!(again.wait().unwrap().success());
    assert!(
        banner.contains("generated earlier") && !banner.contains(&password),
        "{banner}"
    );
}

#[test]
fn check_config_prints_the_effective_settings_with_secrets_masked() {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("listener.toml");
    std::fs::write(
        &config,
        "[callback]\nlisten = \"0.0.0.0:9002\"\n[[callback.credentials]]\nusername = \"ops\"\npassword = \"Very-Secret-Password\"\n",
    )
    .unwrap();

    let output = listener_command(directory.path())
        .env_remove("M2M_CALLBACK__LISTEN")
        .arg("check-config")
        .env("M2M_CONFIG", &config)
        .env("M2M_STORAGE__PATH", "/srv/m2m/listener.db")
        .output()
        .unwrap();

    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{shown}");
    assert!(
        shown.contains("0.0.0.0:9002") && shown.contains("/srv/m2m/listener.db"),
        "{shown}"
    );
    assert!(!shown.contains("Very-Secret-Password"), "{shown}");
}

#[test]
fn a_bad_configuration_value_stops_the_start_with_exit_code_2_naming_the_key() {
    let directory = tempfile::tempdir().unwrap();

    let output = listener_command(directory.path())
        .env("M2M_STORAGE__SYNCHRONOUS", "whenever")
        .output()
        .unwrap();
    let missing_file = listener_command(directory.path())
        .args(["--config", "nope.toml"])
        .output()
        .unwrap();
    let usage = listener_command(directory.path())
        .arg("no-such-command")
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("storage.synchronous"));
    assert_eq!(missing_file.status.code(), Some(2));
    assert_eq!(usage.status.code(), Some(2));
    assert!(
        !directory.path().join("data").exists(),
        "nothing was created by a refused start"
    );
}

#[tokio::test]
async fn the_jobs_commands_register_list_and_show_through_the_api() {
    let directory = tempfile::tempdir().unwrap();
    let mut child = listener_command(directory.path())
        .spawn()
        .expect("listener starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let banner = read_until(&mut stdout, "listening");
    let api = value_after(&banner, "API:")
        .trim_end_matches("/api/v1/")
        .to_owned();
    let jobs = |arguments: &[&str]| {
        let output = listener_command(directory.path())
            .env("M2M_API_URL", &api)
            .arg("jobs")
            .args(arguments)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    let added = jobs(&[
        "add",
        "cli-job-1",
        "--operation",
        "activate",
        "--label",
        "pilot",
        "--device",
        "IMEI:990000862471854",
        "--device",
        "ICCID:89148000000800000001",
    ]);
    let again = jobs(&[
        "add",
        "cli-job-1",
        "--operation",
        "activate",
        "--label",
        "pilot",
        "--device",
        "IMEI:990000862471854",
        "--device",
        "ICCID:89148000000800000001",
    ]);
    let conflict = jobs(&["add", "cli-job-1", "--operation", "deactivate"]);
    let bad_device = jobs(&[
        "add",
        "cli-job-2",
        "--operation",
        "activate",
        "--device",
        "no-colon",
    ]);
    let listed = jobs(&["list"]);
    let shown = jobs(&["show", "cli-job-1", "--json"]);
    let devices = jobs(&["show", "cli-job-1", "--devices"]);
    let missing = jobs(&["show", "no-such-job"]);

    terminate(&child);
    assert!(child.wait().unwrap().success());
    assert_eq!(added.0, Some(0), "{added:?}");
    assert!(
        added.1.contains("registered: cli-job-1") && added.1.contains("pending"),
        "{}",
        added.1
    );
    assert_eq!(again.0, Some(0));
    assert!(again.1.contains("already registered"));
    assert_eq!(conflict.0, Some(2));
    assert!(conflict.2.contains("JOB_CONFLICT"), "{}", conflict.2);
    assert_eq!(bad_device.0, Some(2));
    assert!(
        listed
            .1
            .lines()
            .next()
            .unwrap_or_default()
            .starts_with("REQUEST_ID"),
        "{}",
        listed.1
    );
    assert!(
        listed.1.contains("cli-job-1") && listed.1.contains("0/2"),
        "{}",
        listed.1
    );
    let json: serde_json::Value = serde_json::from_str(&shown.1).expect("--json prints JSON");
    assert_eq!(json["expected_devices"], 2);
    assert_eq!(json["label"], "pilot");
    assert!(
        devices.1.contains("IMEI:990000862471854") && devices.1.contains("pending"),
        "{}",
        devices.1
    );
    assert_eq!(missing.0, Some(1));
    assert!(missing.2.contains("JOB_NOT_FOUND"));
}

#[test]
fn the_test_suites_variables_are_not_taken_for_settings_and_a_database_url_is_shown_masked() {
    let directory = tempfile::tempdir().unwrap();

    let output = listener_command(directory.path())
        .arg("check-config")
        // Set by .ci/run for the PostgreSQL half of the suite; listeners it starts inherit it.
        .env(
            "M2M_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        )
        .env(
            "M2M_STORAGE__URL",
            "postgres://m2m:Db-Secret-Password@db.internal:5432/m2m?sslmode=require",
        )
        // Required with storage.url, by check-config as by serve.
        .env("M2M_CALLBACK__CREDENTIALS__0__USERNAME", "ops")
        .env("M2M_CALLBACK__CREDENTIALS__0__PASSWORD", "pass")
        .output()
        .unwrap();

    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        shown.contains("postgres://m2m:********@db.internal:5432/m2m?sslmode=require"),
        "{shown}"
    );
    assert!(!shown.contains("Db-Secret-Password"), "{shown}");
}
