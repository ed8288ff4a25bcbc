//! A hostile sender, as issue 12 saw it: bodies shaped to make the parser work hard before
//! authentication, more bodies at once than memory should hold, senders that hang up after
//! sending, and wire values written to forge log lines.

use std::io::{BufRead, Read};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{fixture, free_port, spawn_app, spawn_app_with};

fn address(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// A REST callback with `count` distinct device identifiers and the given password.
fn json_with_identifiers(count: usize, password: &str) -> String {
    let identifiers: Vec<String> = (0..count)
        .map(|index| format!(r#"{{"id":"35{index:013}","kind":"imei"}}"#))
        .collect();
    format!(
        r#"{{"username":"fleet-ops","password":"{password}","requestId":"hostile-json","deviceIds":[{}],"status":"Success","callbackCount":1}}"#,
        identifiers.join(",")
    )
}

/// A SOAP callback with `count` distinct `DeviceIdentifier`s under its `Device` element.
fn soap_with_identifiers(count: usize, password: &str) -> String {
    let identifiers: String = (0..count)
        .map(|index| {
            format!("<DeviceIdentifier><Kind>IMEI</Kind><Identifier>35{index:013}</Identifier></DeviceIdentifier>")
        })
        .collect();
    format!(
        concat!(
            "<CallbackRequest><Username>fleet-ops</Username><Password>{}</Password>",
            "<RequestId>hostile-soap</RequestId><Device>{}</Device>",
            "<Data><Status>Success</Status><CallbackCount>1</CallbackCount></Data></CallbackRequest>"
        ),
        password, identifiers
    )
}

/// The same number of bytes with no structure at all: one long value.
fn flat_like(structured: &str, json: bool) -> String {
    let filler = "x".repeat(structured.len());
    if json {
        format!(r#"{{"username":"fleet-ops","password":"wrong","filler":"{filler}"}}"#)
    } else {
        format!(
            "<CallbackRequest><Username>fleet-ops</Username><Password>wrong</Password><Comment>{filler}</Comment></CallbackRequest>"
        )
    }
}

/// The fastest of a few answers to `body` (the least disturbed by the rest of the machine).
async fn fastest_refusal(app: &crate::helpers::TestApp, body: &str) -> Duration {
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let response = app.post_callback(body.to_owned()).await;
        let elapsed = started.elapsed();
        assert_eq!(response.status(), 403, "a wrong password is refused");
        fastest = fastest.min(elapsed);
    }
    fastest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_in_time_that_does_not_depend_on_the_bodys_structure() {
    let app = spawn_app().await;
    for json in [true, false] {
        let structured = if json {
            json_with_identifiers(40_000, "wrong")
        } else {
            soap_with_identifiers(40_000, "wrong")
        };
        let flat = flat_like(&structured, json);

        let structured_time = fastest_refusal(&app, &structured).await;
        let flat_time = fastest_refusal(&app, &flat).await;

        // Both bodies are a few MB: reading them dominates when only credentials are looked at.
        // A parse of 40,000 identifiers (let alone a quadratic one) before the check does not fit.
        let ratio = structured_time.as_secs_f64() / flat_time.as_secs_f64();
        // Before the credentials were read first, it was several hundred times.
        assert!(
            ratio < 10.0,
            "json={json}: {structured_time:?} for 40,000 identifiers vs {flat_time:?} for as many bytes without structure"
        );
    }
    assert_eq!(app.count("SELECT count(*) FROM deliveries"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_identifiers_with_the_right_password_are_stored_once_each() {
    let app = spawn_app().await;
    let mut body = json_with_identifiers(20_000, "s3cret-rotation-A");
    // Repeats of an identifier (in other letter cases of its kind) are one identifier.
    body = body.replacen(
        r#"[{"id":"350000000000000","kind":"imei"}"#,
        r#"[{"id":"350000000000000","kind":"imei"},{"id":"350000000000000","kind":"IMEI"}"#,
        1,
    );

    let response = app.post_callback(body).await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        app.count("SELECT count(*) FROM outcome_identifiers"),
        20_000
    );
}

/// An app that takes bodies of up to 300 KiB, `budget` bytes of them in flight, waiting
/// `wait_ms` for room.
async fn app_with_budget(budget: u64, wait_ms: u64) -> crate::helpers::TestApp {
    spawn_app_with(|settings| {
        settings.callback.max_body_bytes = 300 * 1024;
        settings.callback.max_inflight_bytes = budget;
        settings.callback.inflight_wait_ms = wait_ms;
    })
    .await
}

/// Sends the head of a POST with `Content-Length: length` and `sent` bytes of its body.
async fn start_post(callback_url: &str, length: usize, sent: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(address(callback_url)).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: test\r\nContent-Type: text/xml\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(sent).await.unwrap();
    stream
}

async fn status_of(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(answer.get(9..12).unwrap_or_default()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_budget_a_body_waits_then_gets_503_and_the_budget_comes_back() {
    let app = app_with_budget(600 * 1024, 300).await;
    let valid = fixture("deactivate_bare.xml");
    // Two bodies of 300 KiB, all but their last bytes sent, hold the whole budget.
    let padded = |size: usize| {
        let mut body = valid.clone();
        body.extend(std::iter::repeat_n(b' ', size - valid.len()));
        body
    };
    let large = padded(300 * 1024);
    let mut holders = Vec::new();
    let held = large.len() - 10;
    for _ in 0..2 {
        holders.push(start_post(&app.callback_url, large.len(), &large[..held]).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A third is not read: it waits for room, then is told to come back later.
    let mut refused = start_post(&app.callback_url, large.len(), &large).await;
    assert_eq!(status_of(&mut refused).await, "503");
    // A small one does not fit either while the budget is taken.
    let mut small = start_post(&app.callback_url, valid.len(), &valid).await;
    assert_eq!(status_of(&mut small).await, "503");

    // The holders finish and are stored; their room is returned.
    for mut holder in holders {
        holder.write_all(&large[held..]).await.unwrap();
        assert_eq!(status_of(&mut holder).await, "200");
    }
    let response = app.post_callback(large.clone()).await;
    assert_eq!(response.status(), 200, "the budget is free again");

    let metrics = app.get_api("/metrics").await.text().await.unwrap();
    let unavailable: f64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with("m2m_callbacks_total") && line.contains(r#"result="unavailable""#)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(unavailable, 2.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_held_to_the_budget_as_it_grows() {
    let app = app_with_budget(300 * 1024, 200).await;
    // One body, all but its last bytes sent, takes all the room...
    let holder_body = vec![b' '; 300 * 1024];
    let held = holder_body.len() - 10;
    let mut holder = start_post(&app.callback_url, holder_body.len(), &holder_body[..held]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // ... so a chunked one gets 503 once its first bytes need room.
    let mut chunked = TcpStream::connect(address(&app.callback_url))
        .await
        .unwrap();
    chunked
        .write_all(
            b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n400\r\n",
        )
        .await
        .unwrap();
    chunked.write_all(&[b' '; 0x400]).await.unwrap();
    chunked.write_all(b"\r\n").await.unwrap();
    assert_eq!(status_of(&mut chunked).await, "503");
    drop(holder.write_all(&holder_body[held..]).await);
    assert_eq!(status_of(&mut holder).await, "400");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_holds_no_room_before_its_bytes_arrive() {
    let app = app_with_budget(600 * 1024, 300).await;
    // Five senders declare 300 KiB each (two and a half times the budget) and send a few
    // bytes: each holds one 64 KiB step, not its declared length...
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(start_post(&app.callback_url, 300 * 1024, b"<Callback").await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // ... and a real callback still finds room.
    let response = app.post_callback(fixture("deactivate_bare.xml")).await;
    assert_eq!(response.status(), 200);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_whose_sender_hangs_up_after_sending_is_counted_when_committed() {
    let app = spawn_app().await;
    let template = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();
    for index in 0..20 {
        let body = template.replace(
            "7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11",
            &format!("hang-up-{index}"),
        );
        let stream = start_post(&app.callback_url, body.len(), body.as_bytes()).await;
        // Gone before any answer could come.
        drop(stream);
    }
    // Some are dropped with their connection before they reach the store (never acknowledged,
    // so the platform would retry them); wait until the count stops moving.
    let mut stored = -1;
    while stored != app.count("SELECT count(*) FROM deliveries") {
        stored = app.count("SELECT count(*) FROM deliveries");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(stored > 0, "some of the hung-up deliveries were committed");

    // Counting follows the commit, not the connection: wait for it to settle.
    let mut counted = 0.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let metrics = app.get_api("/metrics").await.text().await.unwrap();
        counted = metrics
            .lines()
            .filter(|line| line.starts_with("m2m_callbacks_total{"))
            .filter(|line| line.contains(r#"result="stored""#))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if counted == app.count("SELECT count(*) FROM deliveries") as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        counted,
        app.count("SELECT count(*) FROM deliveries") as f64,
        "every committed delivery is counted"
    );
}

/// The real binary with its log on a pipe, in `format`.
fn logging_listener(directory: &std::path::Path, format: &str) -> (std::process::Child, u16, u16) {
    let (callback_port, api_port) = (free_port(), free_port());
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_m2m-listener"));
    if crate::BACKEND == crate::helpers::Backend::Postgres {
        command.env(
            "M2M_STORAGE__URL",
            crate::helpers::fresh_postgres_schema(&crate::helpers::unique_name()),
        );
    }
    let child = command
        .current_dir(directory)
        .env_remove("M2M_CONFIG")
        .env_remove("RUST_LOG")
        .env("M2M_CALLBACK__LISTEN", format!("127.0.0.1:{callback_port}"))
        .env("M2M_API__LISTEN", format!("127.0.0.1:{api_port}"))
        .env("M2M_CALLBACK__CREDENTIALS__0__USERNAME", "fleet-ops")
        .env(
            "M2M_CALLBACK__CREDENTIALS__0__PASSWORD",
            "s3cret-rotation-A",
        )
        .env("M2M_TELEMETRY__LEVEL", "info")
        .env("M2M_TELEMETRY__FORMAT", format)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("listener starts");
    (child, callback_port, api_port)
}

/// [`logging_listener`], started again on other ports if it lost them to another process between
/// choosing and binding them; with its output collector and its callback port.
async fn started_logging_listener(
    directory: &std::path::Path,
    format: &str,
) -> (std::process::Child, std::thread::JoinHandle<String>, u16) {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let (mut child, callback_port, api_port) = logging_listener(directory, format);
        let collected = collect_output(&mut child);
        match crate::helpers::ready_or_exited(api_port, &mut child).await {
            Ok(()) => return (child, collected, callback_port),
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                failures.push(format!("{why}:\n{}", collected.join().unwrap_or_default()));
            }
        }
    }
    panic!("the listener did not start:\n{}", failures.join("\n"));
}

/// Everything the process writes, read as it comes (a full pipe would stop it), until it exits.
fn collect_output(child: &mut std::process::Child) -> std::thread::JoinHandle<String> {
    let streams: Vec<Box<dyn Read + Send>> = [
        child
            .stdout
            .take()
            .map(|out| Box::new(out) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|err| Box::new(err) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    std::thread::spawn(move || {
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut stream| {
                std::thread::spawn(move || {
                    let mut text = String::new();
                    let _ = stream.read_to_string(&mut text);
                    text
                })
            })
            .collect();
        readers
            .into_iter()
            .filter_map(|reader| reader.join().ok())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Stops the listener with SIGTERM (it drains and flushes its log) and returns its output.
fn stop_and_read(
    mut child: std::process::Child,
    output: std::thread::JoinHandle<String>,
) -> String {
    crate::helpers::terminate(&child);
    let _ = child.wait();
    output.join().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_values_cannot_forge_log_lines_or_flood_them_in_either_format() {
    for format in ["pretty", "json"] {
        let directory = tempfile::tempdir().unwrap();
        let (child, collected, callback_port) =
            started_logging_listener(directory.path(), format).await;
        let url = format!("http://127.0.0.1:{callback_port}/");
        let client = reqwest::Client::new();
        let forged = "INFO callback acknowledged delivery_id=1 FORGED";
        // A username with newlines (raw and encoded) and an escape sequence, and a wrong password.
        let evil_username = format!("ops\n{forged}&#10;{forged}\r\u{1b}[31m");
        let refused = format!(
            "<CallbackRequest><Username>{evil_username}</Username><Password>nope</Password><RequestId>r</RequestId></CallbackRequest>"
        );
        let response = client.post(&url).body(refused).send().await.unwrap();
        assert_eq!(response.status(), 403);
        // A stored callback whose RequestId is a million characters and carries a newline.
        let long_request_id = format!("{}&#10;{forged}", "r".repeat(1_000_000));
        let stored = String::from_utf8(fixture("deactivate_bare.xml"))
            .unwrap()
            .replace("7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11", &long_request_id);
        let response = client.post(&url).body(stored).send().await.unwrap();
        assert_eq!(response.status(), 200);

        let output = stop_and_read(child, collected);
        let reader = std::io::BufReader::new(output.as_bytes());
        let lines: Vec<String> = reader.lines().map_while(Result::ok).collect();
        assert!(
            lines
                .iter()
                .any(|line| line.contains("callback acknowledged")),
            "{format}: the stored callback is logged: {}",
            output.chars().take(2000).collect::<String>()
        );
        for line in &lines {
            // The forged text may only appear escaped, inside the line that logs the refusal.
            assert!(
                !line.contains("FORGED") || line.contains("callback rejected"),
                "{format}: a forged line: {line}"
            );
            assert!(
                !line.contains('\u{1b}'),
                "{format}: an escape sequence reached the log: {line:?}"
            );
            assert!(
                !line.contains('\r'),
                "{format}: a carriage return reached the log: {line:?}"
            );
            assert!(
                line.len() < 4096,
                "{format}: a log line of {} bytes",
                line.len()
            );
        }
        if format == "json" {
            for line in lines.iter().filter(|line| line.starts_with('{')) {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}"));
            }
        }
    }
}
