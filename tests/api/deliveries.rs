//! The read endpoints of the ingest issue: deliveries, raw bodies, readiness, API token.

use m2m_listener::domain::Secret;

use crate::helpers::{fixture, spawn_app, spawn_app_with, with_callback_count};

#[tokio::test]
async fn deliveries_are_paged_newest_first_with_a_cursor() {
    let app = spawn_app().await;
    let template = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();
    for index in 0..5 {
        let body = template.replace(
            "7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11",
            &format!("page-{index}"),
        );
        assert_eq!(app.post_callback(body).await.status(), 200);
    }

    let first = app.get_json("/api/v1/deliveries?limit=2").await;
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next cursor")
        .to_owned();
    let second = app
        .get_json(&format!("/api/v1/deliveries?limit=2&cursor={cursor}"))
        .await;
    let third = app
        .get_json(&format!(
            "/api/v1/deliveries?limit=2&cursor={}",
            second["next_cursor"].as_str().unwrap()
        ))
        .await;

    let ids = |page: &serde_json::Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&first), ["page-4", "page-3"]);
    assert_eq!(ids(&second), ["page-2", "page-1"]);
    assert_eq!(ids(&third), ["page-0"]);
    assert!(third["next_cursor"].is_null());
    let item = &first["items"][0];
    for field in [
        "id",
        "received_at",
        "kind",
        "operation",
        "request_id",
        "callback_count",
        "result",
        "size",
    ] {
        assert!(item.get(field).is_some(), "missing {field} in {item}");
    }
    assert_eq!(item["kind"], "carrier_service");
    assert_eq!(item["operation"], "deactivate");
    assert!(item["received_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn deliveries_filter_by_result_and_request_id() {
    let app = spawn_app().await;
    app.post_callback(with_callback_count("activate_seed004.xml", 1))
        .await;
    app.post_callback(with_callback_count("activate_seed004.xml", 2))
        .await;
    app.post_callback(fixture("upload_seed001.xml")).await;

    let duplicates = app.get_json("/api/v1/deliveries?result=duplicate").await;
    let upload = app
        .get_json("/api/v1/deliveries?request_id=5afbb4c7-99dc-49a7-8341-7406b7d6f3d3")
        .await;

    assert_eq!(duplicates["items"].as_array().unwrap().len(), 1);
    assert_eq!(duplicates["items"][0]["callback_count"], 2);
    assert_eq!(upload["items"].as_array().unwrap().len(), 1);
    assert_eq!(upload["items"][0]["kind"], "upload_devices");
}

#[tokio::test]
async fn bad_listing_parameters_get_stable_error_codes() {
    let app = spawn_app().await;

    for (query, code) in [
        ("result=maybe", "INVALID_PARAMETER"),
        ("limit=0", "INVALID_PARAMETER"),
        ("limit=x", "INVALID_PARAMETER"),
        ("cursor=abc", "INVALID_CURSOR"),
    ] {
        let response = app.get_api(&format!("/api/v1/deliveries?{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], code, "{query}");
    }
    let unknown = app.get_api("/api/v1/nothing-here").await;
    assert_eq!(unknown.status(), 404);
    let empty_filter = app.get_api("/api/v1/deliveries?result=").await;
    assert_eq!(
        empty_filter.status(),
        400,
        "an empty enum filter is not 'no filter'"
    );
    let wrong_method = app
        .client
        .delete(format!("{}/api/v1/deliveries", app.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "GET, HEAD");
    let jobs_wrong_method = app
        .client
        .delete(format!("{}/api/v1/jobs", app.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(jobs_wrong_method.headers()["allow"], "GET, HEAD, POST");
}

#[tokio::test]
async fn the_raw_body_of_a_re_delivery_points_to_the_stored_one() {
    let app = spawn_app().await;
    app.post_callback(with_callback_count("activate_seed004.xml", 1))
        .await;
    app.post_callback(with_callback_count("activate_seed004.xml", 2))
        .await;
    let listing = app.get_json("/api/v1/deliveries").await;
    let (duplicate, original) = (&listing["items"][0], &listing["items"][1]);

    let original_raw = app
        .get_api(&format!("/api/v1/deliveries/{}/raw", original["id"]))
        .await;
    let duplicate_raw = app
        .get_api(&format!("/api/v1/deliveries/{}/raw", duplicate["id"]))
        .await;
    let missing = app.get_api("/api/v1/deliveries/999999/raw").await;

    // The device credential's password is masked (see `secrets.rs` for the exact bytes).
    let masked = String::from_utf8(with_callback_count("activate_seed004.xml", 1))
        .unwrap()
        .replace(
            "<Password>5096306081</Password>",
            "<Password>********</Password>",
        );
    assert_eq!(original_raw.bytes().await.unwrap(), masked.as_bytes());
    assert_eq!(duplicate_raw.status(), 404);
    let body: serde_json::Value =
        serde_json::from_slice(&duplicate_raw.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "RAW_BODY_NOT_KEPT");
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn readiness_and_liveness_answer_on_the_api_port() {
    let app = spawn_app().await;

    assert_eq!(app.get_api("/healthz").await.status(), 200);
    let ready = app.get_json("/readyz").await;
    assert_eq!(ready["status"], "ready");
}

#[tokio::test]
async fn a_configured_api_token_is_required_for_the_api() {
    let app =
        spawn_app_with(|settings| settings.api.token = Some(Secret::new("operator-token-123")))
            .await;

    let without = app.get_api("/api/v1/deliveries").await;
    let wrong = app
        .client
        .get(format!("{}/api/v1/deliveries", app.api_url))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    let right = app
        .client
        .get(format!("{}/api/v1/deliveries", app.api_url))
        .bearer_auth("operator-token-123")
        .send()
        .await
        .unwrap();

    assert_eq!(without.status(), 401);
    assert_eq!(wrong.status(), 401);
    assert_eq!(right.status(), 200);
    assert_eq!(
        app.get_api("/healthz").await.status(),
        200,
        "probes stay open"
    );
}
