//! Hostile clients and hostile XML: the listener keeps serving and keeps nothing it should not.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{fixture, spawn_app, spawn_app_with};

fn address(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Reads until the server closes or answers; `None` if nothing came within `limit`.
async fn read_answer(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut buffer = vec![0u8; 4096];
    match tokio::time::timeout(limit, stream.read(&mut buffer)).await {
        Ok(Ok(read)) => Some(String::from_utf8_lossy(&buffer[..read]).into_owned()),
        Ok(Err(_)) => Some(String::new()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_slowloris_connections_do_not_stop_a_callback() {
    let app = spawn_app().await;
    let target = address(&app.callback_url);
    let mut held = Vec::new();
    for _ in 0..500 {
        let mut stream = TcpStream::connect(&target).await.unwrap();
        stream
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n")
            .await
            .unwrap();
        held.push(stream);
    }

    let started = Instant::now();
    let response = app.post_callback(fixture("deactivate_bare.xml")).await;

    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    drop(held);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = spawn_app_with(|settings| settings.callback.header_read_timeout_ms = 300).await;
    let mut stream = TcpStream::connect(address(&app.callback_url))
        .await
        .unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();

    let answer = read_answer(&mut stream, Duration::from_secs(5)).await;

    let answer = answer.expect("the server closes or answers the stalled connection");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_slow_drip_body_is_cut_off_with_408_and_nothing_stored() {
    let app = spawn_app_with(|settings| settings.callback.body_read_timeout_ms = 300).await;
    let body = fixture("deactivate_bare.xml");
    let mut stream = TcpStream::connect(address(&app.callback_url))
        .await
        .unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..100]).await.unwrap();

    let answer = read_answer(&mut stream, Duration::from_secs(5))
        .await
        .expect("an answer");

    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(app.count("SELECT count(*) FROM deliveries"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limit_new_connections_wait_and_are_then_served() {
    let app = spawn_app_with(|settings| settings.callback.max_connections = 1).await;
    let target = address(&app.callback_url);
    let mut holder = TcpStream::connect(&target).await.unwrap();
    holder
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let waiting = tokio::spawn({
        let (client, url, body) = (
            app.client.clone(),
            app.callback_url.clone(),
            fixture("deactivate_bare.xml"),
        );
        async move {
            client
                .post(url)
                .body(body)
                .send()
                .await
                .map(|response| response.status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let finished_while_held = waiting.is_finished();
    drop(holder);
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    assert!(
        !finished_while_held,
        "the second connection was served past the limit"
    );
    assert_eq!(status, 200);
}

#[tokio::test]
async fn too_many_header_fields_are_refused() {
    let app = spawn_app_with(|settings| settings.callback.max_headers = 16).await;
    let mut stream = TcpStream::connect(address(&app.callback_url))
        .await
        .unwrap();
    let mut head = String::from("POST / HTTP/1.1\r\nHost: x\r\n");
    for index in 0..40 {
        head.push_str(&format!("X-Padding-{index}: {index}\r\n"));
    }
    head.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();

    let answer = read_answer(&mut stream, Duration::from_secs(5))
        .await
        .expect("an answer");

    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn a_billion_laughs_body_is_not_expanded_and_with_valid_credentials_only_quarantined() {
    let app = spawn_app().await;
    let mut entities = String::from("<!ENTITY lol \"lol\">");
    for level in 1..10 {
        let previous = if level == 1 {
            "lol".to_owned()
        } else {
            format!("lol{}", level - 1)
        };
        entities.push_str(&format!(
            "<!ENTITY lol{level} \"{}\">",
            format!("&{previous};").repeat(10)
        ));
    }
    let body = format!(
        "<?xml version=\"1.0\"?><!DOCTYPE CallbackRequest [{entities}]><CallbackRequest><Username/><Password/>\
         <RequestId>laughs</RequestId><Comment>&lol9;</Comment></CallbackRequest>"
    );

    let started = Instant::now();
    let response = app.post_callback(body.clone()).await;

    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let listing = app.get_json("/api/v1/deliveries?result=quarantined").await;
    assert!(
        listing["items"][0]["parse_error"]
            .as_str()
            .unwrap()
            .contains("DTD"),
        "{listing}"
    );
    assert_eq!(
        app.count("SELECT max(length(body)) FROM raw_bodies"),
        body.len() as i64,
        "kept as sent, not expanded"
    );
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 0);
}

#[tokio::test]
async fn an_external_entity_is_never_resolved() {
    let app = spawn_app().await;
    let body = "<?xml version=\"1.0\"?><!DOCTYPE r [<!ENTITY secret SYSTEM \"file:///etc/passwd\">]>\
                <CallbackRequest><Username/><Password/><RequestId>xxe</RequestId><Comment>&secret;</Comment></CallbackRequest>";

    let response = app.post_callback(body).await;

    assert_eq!(response.status(), 200);
    let stored = app
        .database
        .value("SELECT coalesce(parse_error, '') FROM deliveries")
        .unwrap();
    assert!(stored.contains("DTD"), "{stored}");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM deliveries WHERE comment LIKE '%root:%' OR details LIKE '%root:%'"
        ),
        0
    );
}

#[tokio::test]
async fn absurd_nesting_and_element_counts_are_refused_without_harm() {
    let app = spawn_app().await;
    let deep = format!(
        "<CallbackRequest><Username/><Password/>{}{}</CallbackRequest>",
        "<a>".repeat(100_000),
        "</a>".repeat(100_000)
    );
    let wide = format!(
        "<CallbackRequest><Username/><Password/>{}</CallbackRequest>",
        "<a/>".repeat(600_000)
    );

    for body in [deep, wide] {
        let response = app.post_callback(body).await;
        assert_eq!(
            response.status(),
            200,
            "authenticated, so quarantined rather than lost"
        );
    }
    let listing = app.get_json("/api/v1/deliveries?result=quarantined").await;
    let errors: Vec<&str> = listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["parse_error"].as_str().unwrap())
        .collect();
    assert!(
        errors.iter().any(|error| error.contains("deeper")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|error| error.contains("elements")),
        "{errors:?}"
    );
    assert_eq!(app.get_api("/healthz").await.status(), 200);
}

#[tokio::test]
async fn only_allowed_sources_may_post_callbacks() {
    let closed = spawn_app_with(|settings| {
        settings.callback.allowed_sources = vec!["198.51.100.0/24".to_owned()]
    })
    .await;
    let open = spawn_app_with(|settings| {
        settings.callback.allowed_sources = vec!["127.0.0.0/8".to_owned()]
    })
    .await;

    let refused = closed.post_callback(fixture("deactivate_bare.xml")).await;
    let accepted = open.post_callback(fixture("deactivate_bare.xml")).await;

    assert_eq!(refused.status(), 403);
    assert_eq!(closed.count("SELECT count(*) FROM deliveries"), 0);
    assert_eq!(accepted.status(), 200);
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let behind_proxy = spawn_app_with(|settings| {
        settings.callback.allowed_sources = vec!["198.51.100.0/24".to_owned()];
        settings.callback.trusted_proxies = vec!["127.0.0.1".to_owned()];
    })
    .await;
    let no_proxy = spawn_app_with(|settings| {
        settings.callback.allowed_sources = vec!["198.51.100.0/24".to_owned()]
    })
    .await;
    let post = |app: &crate::helpers::TestApp, forwarded: &str, tag: &str| {
        let body = String::from_utf8(fixture("deactivate_bare.xml"))
            .unwrap()
            .replace("7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11", tag);
        app.client
            .post(&app.callback_url)
            .header("X-Forwarded-For", forwarded)
            .body(body)
            .send()
    };

    let allowed_client = post(&behind_proxy, "198.51.100.7", "via-proxy")
        .await
        .unwrap();
    let other_client = post(&behind_proxy, "203.0.113.9", "other").await.unwrap();
    let forged = post(&behind_proxy, "198.51.100.7, 203.0.113.9", "forged")
        .await
        .unwrap();
    let untrusted = post(&no_proxy, "198.51.100.7", "untrusted").await.unwrap();

    assert_eq!(allowed_client.status(), 200);
    let source = behind_proxy
        .database
        .value("SELECT source_address FROM deliveries WHERE request_id = 'via-proxy'")
        .unwrap();
    assert_eq!(source, "198.51.100.7");
    assert_eq!(other_client.status(), 403);
    assert_eq!(
        forged.status(),
        403,
        "the right-most untrusted entry is the client"
    );
    assert_eq!(
        untrusted.status(),
        403,
        "X-Forwarded-For from an untrusted peer is ignored"
    );
}

#[tokio::test]
async fn device_credentials_are_shown_only_to_a_token_holder_who_asks() {
    use crate::helpers::{CarrierResult, carrier_callback};
    let token = "operator-token-xyz";
    let with_token = spawn_app_with(|settings| {
        settings.api.token = Some(m2m_listener::domain::Secret::new(token))
    })
    .await;
    let without_token = spawn_app().await;
    for app in [&with_token, &without_token] {
        app.post_callback(carrier_callback(
            "secret-job",
            &[("IMEI", "350000000000099")],
            CarrierResult::Activated { mdn: "5550000099" },
        ))
        .await;
    }
    let get = |app: &crate::helpers::TestApp, path: &str, bearer: bool| {
        let mut request = app.client.get(format!("{}{path}", app.api_url));
        if bearer {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let redacted = get(&with_token, "/api/v1/jobs/secret-job/devices", true)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let revealed = get(
        &with_token,
        "/api/v1/jobs/secret-job/devices?reveal=secrets",
        true,
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let history = get(
        &with_token,
        "/api/v1/devices/IMEI/350000000000099?reveal=secrets",
        true,
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let no_token = get(
        &without_token,
        "/api/v1/jobs/secret-job/devices?reveal=secrets",
        false,
    )
    .await
    .unwrap();

    assert!(
        !redacted.contains("device-secret-5550000099") && redacted.contains("********"),
        "{redacted}"
    );
    assert!(revealed.contains("device-secret-5550000099"), "{revealed}");
    assert!(history.contains("device-secret-5550000099"), "{history}");
    assert_eq!(no_token.status(), 403);
    let body: serde_json::Value = serde_json::from_slice(&no_token.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "SECRETS_REQUIRE_TOKEN");
}
