//! The platform link against the simulator as the platform (in-process, port 0), with the real
//! listener binary and the real `platform` commands as processes.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use m2m_listener::configuration::PlatformSettings;
use m2m_listener::platform::client::{PlatformClient, PlatformError};
use m2m_listener::simulate::payloads::{self, CarrierResult, Envelope};
use m2m_listener::simulate::platform::{PlatformOptions, PlatformSimulator};

use crate::helpers::{TestDatabase, free_port, listener_command, wait_until_ready};

const CALLBACK_USERNAME: &str = "fleet-callbacks";
const CALLBACK_PASSWORD: &str = "Configured-Callback-Password-1";
const UWS_PASSWORD: &str = "Uws-Login-Password-Marker-9";
const CLIENT_SECRET: &str = "Oauth-Client-Secret-Marker-7";
const SERVICES: &str = "CarrierService,DeviceService";

async fn simulator(customise: impl FnOnce(&mut PlatformOptions)) -> PlatformSimulator {
    let mut options = PlatformOptions {
        platform_client_secret: CLIENT_SECRET.to_owned(),
        platform_password: UWS_PASSWORD.to_owned(),
        callback_interval_ms: 100,
        previous_password_ms: 1_000,
        ..PlatformOptions::default()
    };
    customise(&mut options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    PlatformSimulator::start(options, listener).unwrap()
}

/// One listener directory: its database, its ports, the settings of the link.
struct Setup {
    directory: tempfile::TempDir,
    platform_url: String,
    environment: Vec<(String, String)>,
    /// Every output of every process, for the secrets check at the end.
    outputs: Vec<String>,
    logs: Vec<PathBuf>,
}

impl Setup {
    fn new(simulator: &PlatformSimulator, callback_port: u16, extra: &[(&str, &str)]) -> Self {
        let mut environment: Vec<(String, String)> = [
            ("M2M_PLATFORM__OAUTH_URL", simulator.url()),
            ("M2M_PLATFORM__M2M_URL", simulator.url()),
            ("M2M_PLATFORM__CLIENT_ID", "sim-client-id".to_owned()),
            ("M2M_PLATFORM__CLIENT_SECRET", CLIENT_SECRET.to_owned()),
            ("M2M_PLATFORM__USERNAME", "sim-uws-user".to_owned()),
            ("M2M_PLATFORM__PASSWORD", UWS_PASSWORD.to_owned()),
            ("M2M_PLATFORM__ACCOUNT", "0000000001-00001".to_owned()),
            (
                "M2M_PLATFORM__CALLBACK_URL",
                format!("http://127.0.0.1:{callback_port}/"),
            ),
            ("M2M_PLATFORM__SERVICES", SERVICES.to_owned()),
            ("M2M_PLATFORM__CREDENTIALS_REFRESH_MS", "200".to_owned()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        for (key, value) in extra {
            environment.push(((*key).to_owned(), (*value).to_owned()));
        }
        Self {
            directory: tempfile::tempdir().unwrap(),
            platform_url: simulator.url(),
            environment,
            outputs: Vec::new(),
            logs: Vec::new(),
        }
    }

    fn command(&self, callback_port: u16, api_port: u16) -> (Command, TestDatabase) {
        let (mut command, database) = listener_command(
            self.directory.path(),
            callback_port,
            api_port,
            CALLBACK_USERNAME,
            CALLBACK_PASSWORD,
        );
        for (key, value) in &self.environment {
            command.env(key, value);
        }
        (command, database)
    }

    /// A listener process whose output goes to a file of its own.
    fn start_listener(&mut self, callback_port: u16, api_port: u16) -> (Child, TestDatabase) {
        let (mut command, database) = self.command(callback_port, api_port);
        let log = self
            .directory
            .path()
            .join(format!("listener-{callback_port}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("listener starts");
        self.logs.push(log);
        (child, database)
    }

    /// Runs `m2m-listener platform ARGS...` to its end.
    async fn platform(&mut self, arguments: &[&str]) -> Output {
        let (mut command, _) = self.command(free_port(), free_port());
        command.arg("platform").args(arguments).stdin(Stdio::null());
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .expect("platform command runs");
        self.outputs.push(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
        output
    }

    /// Asserts that no secret is in any output or log line seen so far.
    fn assert_no_secret_anywhere(&self, simulator: &PlatformSimulator, also: &[String]) {
        let mut seen = self.outputs.join("\n");
        for log in &self.logs {
            seen.push_str(&std::fs::read_to_string(log).unwrap_or_default());
        }
        let mut secrets: Vec<String> = vec![
            UWS_PASSWORD.to_owned(),
            CLIENT_SECRET.to_owned(),
            CALLBACK_PASSWORD.to_owned(),
        ];
        secrets.extend(simulator.issued_tokens());
        secrets.extend(also.iter().cloned());
        for service in SERVICES.split(',') {
            if let Some(registration) = simulator.registration(service) {
                secrets.push(registration.password.clone());
            }
        }
        assert!(!seen.is_empty());
        for secret in secrets.iter().filter(|secret| !secret.is_empty()) {
            assert!(
                !seen.contains(secret.as_str()),
                "a secret reached an output or a log line:\n{seen}"
            );
        }
        let _ = &self.platform_url;
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Polls `condition` every 50 ms until it holds or `seconds` pass.
async fn eventually(seconds: u64, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {seconds} s: {what}");
}

fn stored_platform_callbacks(database: &TestDatabase) -> i64 {
    database.count(
        "SELECT count(*) FROM deliveries WHERE request_id LIKE 'platform-sim-%' AND result = 'stored'",
    )
}

fn stop(mut child: Child) {
    crate::helpers::terminate(&child);
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_register_then_the_simulators_callbacks_with_the_registered_credentials_are_stored()
 {
    let simulator = simulator(|_| {}).await;
    let (callback_port, api_port) = (free_port(), free_port());
    let mut setup = Setup::new(&simulator, callback_port, &[]);
    let (listener, database) = setup.start_listener(callback_port, api_port);
    wait_until_ready(api_port).await;

    let registered = setup.platform(&["register"]).await;
    assert!(registered.status.success(), "{}", text(&registered));
    let carrier = simulator
        .registration("CarrierService")
        .expect("registered");
    assert_eq!(carrier.url, format!("http://127.0.0.1:{callback_port}/"));
    assert_eq!(
        (carrier.username.as_str(), carrier.password.as_str()),
        (CALLBACK_USERNAME, CALLBACK_PASSWORD)
    );
    eventually(20, "ten callbacks stored", async || {
        stored_platform_callbacks(&database) >= 10
    })
    .await;
    let again = setup.platform(&["register"]).await;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("already registered"),
        "{}",
        text(&again)
    );
    let status = setup.platform(&["status"]).await;
    assert!(status.status.success(), "{}", text(&status));
    stop(listener);

    let stats = simulator.stats();
    assert_eq!(stats.callbacks_refused, 0, "{stats:?}");
    assert_eq!(
        stats.logins, 3,
        "one login per command, whatever it does: {stats:?}"
    );
    setup.assert_no_secret_anywhere(&simulator, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_rotate_while_callbacks_flow_refuses_none_and_every_replica_refuses_the_old_password_after_the_overlap()
 {
    // The platform keeps sending the old password 1 s after the re-registration; it stays
    // accepted for 3 s.
    let simulator = simulator(|options| options.previous_password_ms = 1_000).await;
    let (first_callback, first_api) = (free_port(), free_port());
    let (second_callback, second_api) = (free_port(), free_port());
    let mut setup = Setup::new(
        &simulator,
        first_callback,
        &[("M2M_PLATFORM__ROTATION_OVERLAP_S", "3")],
    );
    let (first, database) = setup.start_listener(first_callback, first_api);
    wait_until_ready(first_api).await;
    let (second, _) = setup.start_listener(second_callback, second_api);
    wait_until_ready(second_api).await;
    let registered = setup.platform(&["register"]).await;
    assert!(registered.status.success(), "{}", text(&registered));
    eventually(20, "callbacks flowing", async || {
        stored_platform_callbacks(&database) >= 4
    })
    .await;

    let rotated = setup.platform(&["rotate"]).await;
    assert!(rotated.status.success(), "{}", text(&rotated));
    let new_password = simulator
        .registration("CarrierService")
        .expect("registered")
        .password;
    assert_eq!(new_password.len(), 40);
    assert_ne!(new_password, CALLBACK_PASSWORD);
    assert_eq!(
        simulator.registration("DeviceService").unwrap().password,
        new_password
    );
    eventually(
        20,
        "callbacks with the new password acknowledged",
        async || {
            let stats = simulator.stats();
            stats.sent_with_previous_password > 0 && stats.acknowledged_with_current_password >= 10
        },
    )
    .await;
    assert_eq!(
        simulator.stats().callbacks_refused,
        0,
        "{:?}",
        simulator.stats()
    );

    // Both replicas: the new pair accepted; the old one too within the overlap, then refused.
    let client = reqwest::Client::new();
    let post = async |port: u16, password: &str, number: u32| {
        let body = payloads::json_carrier_callback(
            Envelope {
                username: CALLBACK_USERNAME,
                password,
                ..Envelope::default()
            },
            &format!("rotation-probe-{port}-{number}"),
            &[("IMEI", "990000000000001")],
            CarrierResult::Deactivated,
        );
        client
            .post(format!("http://127.0.0.1:{port}/"))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let mut number = 0;
    for port in [first_callback, second_callback] {
        number += 1;
        assert_eq!(
            post(port, &new_password, number).await,
            200,
            "new pair on {port}"
        );
    }
    for port in [first_callback, second_callback] {
        eventually(
            15,
            "the old password refused after the overlap",
            async || {
                number += 1;
                post(port, CALLBACK_PASSWORD, number).await == 403
            },
        )
        .await;
        number += 1;
        assert_eq!(
            post(port, &new_password, number).await,
            200,
            "new pair on {port}"
        );
    }
    stop(first);
    stop(second);
    assert_eq!(
        simulator.stats().callbacks_refused,
        0,
        "{:?}",
        simulator.stats()
    );
    setup.assert_no_secret_anywhere(&simulator, &[new_password]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_status_exits_non_zero_when_a_service_points_elsewhere_or_is_missing_and_the_gauge_says_so()
 {
    let simulator = simulator(|options| options.callback_interval_ms = 60_000).await;
    let (callback_port, api_port) = (free_port(), free_port());
    let mut setup = Setup::new(
        &simulator,
        callback_port,
        &[("M2M_PLATFORM__CHECK_INTERVAL_S", "1")],
    );
    let (listener, _) = setup.start_listener(callback_port, api_port);
    wait_until_ready(api_port).await;
    let metrics = async || {
        reqwest::get(format!("http://127.0.0.1:{api_port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let series = |service: &str, state: &str, value: u8| {
        format!("m2m_platform_registration{{service=\"{service}\",state=\"{state}\"}} {value}")
    };
    eventually(10, "the gauge says missing", async || {
        let shown = metrics().await;
        shown.contains(&series("CarrierService", "missing", 1))
            && shown.contains(&series("DeviceService", "missing", 1))
    })
    .await;
    let registered = setup.platform(&["register"]).await;
    assert!(registered.status.success(), "{}", text(&registered));
    eventually(10, "the gauge says ours", async || {
        let shown = metrics().await;
        shown.contains(&series("CarrierService", "ours", 1))
            && shown.contains(&series("DeviceService", "ours", 1))
            && shown.contains(&series("CarrierService", "missing", 0))
    })
    .await;

    simulator.set_registration(
        "CarrierService",
        "https://someone-else.example/callbacks",
        "other",
        "Someone-Elses-Password-3",
    );
    simulator.remove_registration("DeviceService");
    let status = setup.platform(&["status"]).await;
    assert_eq!(status.status.code(), Some(1), "{}", text(&status));
    let shown = text(&status);
    assert!(
        shown.contains("elsewhere") && shown.contains("missing"),
        "{shown}"
    );
    assert!(shown.contains("someone-else.example"), "{shown}");
    let json = setup.platform(&["status", "--json"]).await;
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["all_ours"], false);
    let states: Vec<(&str, &str)> = report["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["service"].as_str().unwrap(),
                entry["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("CarrierService", "elsewhere"),
            ("DeviceService", "missing")
        ]
    );
    eventually(10, "the gauge says elsewhere and missing", async || {
        let shown = metrics().await;
        shown.contains(&series("CarrierService", "elsewhere", 1))
            && shown.contains(&series("CarrierService", "ours", 0))
            && shown.contains(&series("DeviceService", "missing", 1))
    })
    .await;

    // A service the REST list does not name, whose callbacks arrive all the same, was registered
    // over SOAP (which that list does not show): not visible, not missing, and still not ours.
    simulator.remove_registration("CarrierService");
    let body = m2m_listener::simulate::payloads::carrier_callback(
        m2m_listener::simulate::payloads::Envelope {
            username: CALLBACK_USERNAME,
            password: CALLBACK_PASSWORD,
            ..Default::default()
        },
        "soap-registered-job",
        &[("IMEI", "990000862471854")],
        m2m_listener::simulate::payloads::CarrierResult::Activated { mdn: "5096300001" },
    );
    let posted = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{callback_port}/"))
        .header("Content-Type", "text/xml")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    let json = setup.platform(&["status", "--json"]).await;
    assert_eq!(json.status.code(), Some(1), "{}", text(&json));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["services"][0]["service"], "CarrierService");
    assert_eq!(report["services"][0]["state"], "not_visible", "{report}");
    assert_eq!(report["services"][1]["state"], "missing", "{report}");
    eventually(10, "the gauge says not visible", async || {
        let shown = metrics().await;
        shown.contains(&series("CarrierService", "not_visible", 1))
            && shown.contains(&series("CarrierService", "missing", 0))
    })
    .await;
    stop(listener);
    setup.assert_no_secret_anywhere(&simulator, &["Someone-Elses-Password-3".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_uws_password_makes_exactly_one_login_attempt_per_command_with_a_clear_error_and_exit_1()
 {
    let simulator = simulator(|_| {}).await;
    let mut setup = Setup::new(
        &simulator,
        free_port(),
        &[("M2M_PLATFORM__PASSWORD", "Wrong-Uws-Password-Marker-5")],
    );
    for (arguments, logins) in [
        (&["status"][..], 1),
        (&["register"][..], 2),
        (&["rotate"][..], 3),
    ] {
        let output = setup.platform(arguments).await;
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        let shown = text(&output);
        assert!(
            shown.contains("session login failed")
                && shown.contains("platform.password")
                && shown.contains("InvalidCredentials")
                && shown.contains("not retried"),
            "{shown}"
        );
        assert_eq!(simulator.stats().logins, logins, "{arguments:?}");
    }
    assert!(!simulator.stats().locked);
    assert!(
        simulator.registration("CarrierService").is_none(),
        "nothing was registered"
    );
    setup.assert_no_secret_anywhere(&simulator, &["Wrong-Uws-Password-Marker-5".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_oauth_credentials_are_shown_as_the_gateways_fault_and_no_login_is_tried() {
    let simulator = simulator(|_| {}).await;
    let mut setup = Setup::new(
        &simulator,
        free_port(),
        &[(
            "M2M_PLATFORM__CLIENT_SECRET",
            "Wrong-Client-Secret-Marker-2",
        )],
    );
    let output = setup.platform(&["status"]).await;
    assert_eq!(output.status.code(), Some(1));
    let shown = text(&output);
    assert!(
        shown.contains("fault 900901") && shown.contains("platform.client_secret"),
        "{shown}"
    );
    assert_eq!(simulator.stats().logins, 0);
    setup.assert_no_secret_anywhere(&simulator, &["Wrong-Client-Secret-Marker-2".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistering_a_service_registered_to_this_listener_needs_yes() {
    let simulator = simulator(|options| options.callback_interval_ms = 60_000).await;
    let mut setup = Setup::new(&simulator, free_port(), &[]);
    assert!(setup.platform(&["register"]).await.status.success());
    let refused = setup.platform(&["deregister", "CarrierService"]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("--yes"), "{}", text(&refused));
    assert!(simulator.registration("CarrierService").is_some());
    let done = setup
        .platform(&["deregister", "CarrierService", "--yes"])
        .await;
    assert!(done.status.success(), "{}", text(&done));
    assert!(simulator.registration("CarrierService").is_none());
    assert!(simulator.registration("DeviceService").is_some());
    let status = setup.platform(&["status"]).await;
    assert_eq!(status.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_pair_is_accepted_on_its_first_callback_without_waiting_for_the_periodic_refresh()
{
    // The platform switches to the new password at once, and the listener would read the stored
    // pairs again only in an hour: the unknown pair itself makes it read them.
    let simulator = simulator(|options| options.previous_password_ms = 0).await;
    let (callback_port, api_port) = (free_port(), free_port());
    let mut setup = Setup::new(
        &simulator,
        callback_port,
        &[("M2M_PLATFORM__CREDENTIALS_REFRESH_MS", "3600000")],
    );
    let (listener, database) = setup.start_listener(callback_port, api_port);
    wait_until_ready(api_port).await;
    assert!(setup.platform(&["register"]).await.status.success());
    eventually(20, "callbacks flowing", async || {
        stored_platform_callbacks(&database) >= 2
    })
    .await;
    let rotated = setup.platform(&["rotate"]).await;
    assert!(rotated.status.success(), "{}", text(&rotated));
    eventually(
        20,
        "callbacks with the new password acknowledged",
        async || simulator.stats().acknowledged_with_current_password >= 8,
    )
    .await;
    stop(listener);
    let stats = simulator.stats();
    assert_eq!(stats.sent_with_previous_password, 0, "{stats:?}");
    assert_eq!(stats.callbacks_refused, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_login_of_the_periodic_check_is_not_retried_in_a_loop_and_the_gauge_says_error() {
    let simulator = simulator(|_| {}).await;
    let (callback_port, api_port) = (free_port(), free_port());
    let mut setup = Setup::new(
        &simulator,
        callback_port,
        &[
            ("M2M_PLATFORM__CHECK_INTERVAL_S", "1"),
            ("M2M_PLATFORM__PASSWORD", "Wrong-Uws-Password-Marker-6"),
        ],
    );
    let (listener, _) = setup.start_listener(callback_port, api_port);
    wait_until_ready(api_port).await;
    eventually(10, "the gauge says error", async || {
        reqwest::get(format!("http://127.0.0.1:{api_port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("m2m_platform_registration{service=\"CarrierService\",state=\"error\"} 1")
    })
    .await;
    // One login per interval, and after two refused ones no more until a restart.
    eventually(10, "a second interval's login", async || {
        simulator.stats().logins >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    stop(listener);
    assert_eq!(simulator.stats().logins, 2, "{:?}", simulator.stats());
    assert!(!simulator.stats().locked);
    setup.assert_no_secret_anywhere(&simulator, &["Wrong-Uws-Password-Marker-6".to_owned()]);
}

fn link_settings(simulator: &PlatformSimulator, password: &str) -> PlatformSettings {
    PlatformSettings {
        oauth_url: simulator.url(),
        m2m_url: simulator.url(),
        client_id: "sim-client-id".to_owned(),
        client_secret: m2m_listener::domain::Secret::new(CLIENT_SECRET),
        username: "sim-uws-user".to_owned(),
        password: m2m_listener::domain::Secret::new(password),
        account: "0000000001-00001".to_owned(),
        callback_url: "http://127.0.0.1:1/".to_owned(),
        services: vec!["CarrierService".to_owned()],
        ..PlatformSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_platform_session_that_expired_is_renewed_by_one_new_login() {
    let simulator = simulator(|options| options.session_idle_ms = 300).await;
    let mut client = PlatformClient::new(&link_settings(&simulator, UWS_PASSWORD)).unwrap();
    assert!(client.list().await.unwrap().is_empty());
    assert!(client.list().await.unwrap().is_empty());
    assert_eq!(simulator.stats().logins, 1, "the session is reused");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(client.list().await.unwrap().is_empty());
    assert_eq!(
        simulator.stats().logins,
        2,
        "renewed on the expiry error, once"
    );
    assert_eq!(simulator.stats().token_requests, 1, "the same token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_login_failed_never_logs_in_again_and_five_failures_lock_the_simulated_account()
 {
    let simulator = simulator(|_| {}).await;
    let mut client = PlatformClient::new(&link_settings(&simulator, "wrong")).unwrap();
    assert!(matches!(client.list().await, Err(PlatformError::Login(_))));
    assert!(matches!(
        client.list().await,
        Err(PlatformError::LoginAlreadyFailed)
    ));
    assert_eq!(simulator.stats().logins, 1);
    for _ in 0..4 {
        let mut fresh = PlatformClient::new(&link_settings(&simulator, "wrong")).unwrap();
        assert!(fresh.list().await.is_err());
    }
    assert!(simulator.stats().locked);
    let mut right = PlatformClient::new(&link_settings(&simulator, UWS_PASSWORD)).unwrap();
    let error = right.list().await.unwrap_err().to_string();
    assert!(error.contains("UserLocked"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_with_platform_listen_serves_the_platforms_rest_side_as_a_process() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
        .args([
            "simulate",
            "--platform-listen",
            &format!("127.0.0.1:{port}"),
            "--duration-s",
            "3",
        ])
        .env_remove("M2M_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("simulator starts");
    let client = reqwest::Client::new();
    let token = async |secret: &str| {
        use base64::Engine;
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("sim-client-id:{secret}"));
        client
            .post(format!("http://127.0.0.1:{port}/oauth2/token"))
            .header("Authorization", format!("Basic {basic}"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
            .await
    };
    let mut answered = None;
    eventually(10, "the simulated platform answers", async || {
        answered = token("wrong").await.ok();
        answered.is_some()
    })
    .await;
    let refused = answered.unwrap();
    assert_eq!(refused.status(), 401);
    let fault: serde_json::Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(fault["fault"]["code"], "900901");
    let first: serde_json::Value = serde_json::from_slice(
        &token("sim-client-secret")
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let second: serde_json::Value = serde_json::from_slice(
        &token("sim-client-secret")
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(first["access_token"].is_string());
    assert_eq!(
        first["access_token"], second["access_token"],
        "the same token within its hour"
    );
    let output = tokio::task::spawn_blocking(move || {
        let _ = child.wait();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut text).unwrap();
        text
    })
    .await
    .unwrap();
    let stats: serde_json::Value = serde_json::from_str(&output).expect("stats as JSON");
    assert_eq!(stats["token_requests"], 3, "{output}");
}
