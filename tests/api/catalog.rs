//! The fault catalog over the API: listing and searching it, explaining one code (exactly, or by
//! its class when the catalog does not know it), and the same explanation on stored faults.

use serde_json::{Value, json};

use crate::helpers::{CarrierResult, carrier_callback, spawn_app, spawn_app_with};

fn codes(listing: &Value) -> Vec<String> {
    listing["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|entry| entry["code"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn the_catalog_listing_returns_every_entry_without_filters() {
    let app = spawn_app().await;

    let listing = app.get_json("/api/v1/errors").await;

    let items = listing["items"].as_array().expect("items");
    assert_eq!(items.len(), m2m_listener::catalog::catalog().len());
    for field in [
        "code",
        "message",
        "cause",
        "resolution",
        "class",
        "retryable",
        "source",
    ] {
        assert!(
            items[0].get(field).is_some(),
            "{field} missing: {}",
            items[0]
        );
    }
}

#[tokio::test]
async fn a_search_matches_code_and_text_case_insensitively() {
    let app = spawn_app().await;

    let by_code = app.get_json("/api/v1/errors?q=serviceplan.notfound").await;
    let by_text = app
        .get_json("/api/v1/errors?q=SESSION%20HAS%20EXPIRED")
        .await;
    let by_guidance = app.get_json("/api/v1/errors?q=log%20in%20again").await;

    assert!(
        codes(&by_code).contains(&"REQUEST_FAILED.ServicePlan.NotFound".to_owned()),
        "{by_code}"
    );
    assert_eq!(codes(&by_text), ["REQUEST_FAILED.SessionToken.Expired"]);
    assert!(
        codes(&by_guidance).contains(&"REQUEST_FAILED.SessionToken.Expired".to_owned()),
        "{by_guidance}"
    );
}

#[tokio::test]
async fn a_search_finds_a_code_whatever_service_prefix_it_carries() {
    let app = spawn_app().await;

    let found = app
        .get_json("/api/v1/errors?q=CarrierService.REQUEST_FAILED.ServicePlan.NotFound")
        .await;
    let partial = app
        .get_json("/api/v1/errors?q=UnifiedWebService.REQUEST_FAILED.SessionToken")
        .await;

    assert_eq!(codes(&found), ["REQUEST_FAILED.ServicePlan.NotFound"]);
    assert_eq!(
        codes(&partial),
        [
            "REQUEST_FAILED.SessionToken.Expired",
            "REQUEST_FAILED.SessionToken.Format"
        ]
    );
}

#[tokio::test]
async fn class_and_source_filter_the_listing_and_an_unknown_one_is_a_400() {
    let app = spawn_app().await;

    let request_failed = app.get_json("/api/v1/errors?class=REQUEST_FAILED").await;
    let uploads = app
        .get_json("/api/v1/errors?source=thingspace_upload_devices&class=upload_package")
        .await;
    let both = app
        .get_json("/api/v1/errors?class=input_invalid&q=kind")
        .await;
    let unknown_class = app.get_api("/api/v1/errors?class=NO_SUCH_CLASS").await;
    let unknown_source = app.get_api("/api/v1/errors?source=nowhere").await;

    let items = request_failed["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(items.iter().all(|entry| entry["class"] == "request_failed"));
    let items = uploads["items"].as_array().unwrap();
    assert_eq!(items.len(), 15, "{uploads}");
    assert!(
        codes(&uploads)
            .iter()
            .all(|code| code.starts_with("UPLOAD_PACKAGE."))
    );
    assert!(codes(&both).contains(&"INPUT_INVALID.Device.Kind.Invalid".to_owned()));
    assert!(
        both["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["class"] == "input_invalid")
    );
    for refused in [unknown_class, unknown_source] {
        assert_eq!(refused.status(), 400);
        let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "INVALID_PARAMETER", "{body}");
    }
}

#[tokio::test]
async fn a_known_code_is_an_exact_match_and_an_unknown_one_gets_its_class_guidance() {
    let app = spawn_app().await;

    let exact = app
        .get_json("/api/v1/errors/CarrierService.REQUEST_FAILED.ServicePlan.NotFound")
        .await;
    let invalid = app
        .get_json("/api/v1/errors/CarrierService.INPUT_INVALID.Something.New")
        .await;
    let failed = app
        .get_json("/api/v1/errors/UnifiedWebService.REQUEST_FAILED.DeviceAlreadyActive")
        .await;
    let nothing = app.get_api("/api/v1/errors/Completely.Unknown").await;

    assert_eq!(exact["code"], "REQUEST_FAILED.ServicePlan.NotFound");
    assert_eq!(exact["match"], "exact");
    assert_eq!(invalid["match"], "class", "{invalid}");
    assert_eq!(invalid["class"], "input_invalid");
    assert_eq!(invalid["code"], "INPUT_INVALID.Something.New");
    assert_eq!(invalid["retryable"], false);
    assert!(
        invalid["resolution"]
            .as_str()
            .unwrap_or_default()
            .contains("resend"),
        "{invalid}"
    );
    assert_eq!(failed["match"], "class", "{failed}");
    assert_eq!(failed["class"], "request_failed");
    assert!(
        failed["resolution"]
            .as_str()
            .unwrap_or_default()
            .contains("state"),
        "{failed}"
    );
    assert_eq!(nothing.status(), 404);
}

#[tokio::test]
async fn a_stored_fault_with_an_unknown_code_is_explained_by_its_class() {
    let app = spawn_app().await;
    app.register(
        json!({"request_id": "class-job", "operation": "activate", "expected_devices": 2}),
    )
    .await;
    app.post_callback(carrier_callback(
        "class-job",
        &[("IMEI", "350000000001401")],
        CarrierResult::Failed {
            code: "CarrierService.REQUEST_FAILED.NotInTheSeeds",
            message: "Something the seeds never listed.",
        },
    ))
    .await;
    app.post_callback(carrier_callback(
        "class-job",
        &[("IMEI", "350000000001402")],
        CarrierResult::Failed {
            code: "CarrierService.INPUT_INVALID.DeviceState.Invalid",
            message: "The device state is not valid.",
        },
    ))
    .await;

    let devices = app.get_json("/api/v1/jobs/class-job/devices").await;
    let device = app.get_json("/api/v1/devices/IMEI/350000000001401").await;

    let items = devices["items"].as_array().unwrap();
    let unknown = items
        .iter()
        .find(|item| item["identifiers"][0]["id"] == "350000000001401")
        .unwrap();
    let known = items
        .iter()
        .find(|item| item["identifiers"][0]["id"] == "350000000001402")
        .unwrap();
    let explanation = &unknown["fault"]["explanation"];
    assert_eq!(explanation["match"], "class", "{unknown}");
    assert_eq!(explanation["class"], "request_failed");
    assert_eq!(explanation["code"], "REQUEST_FAILED.NotInTheSeeds");
    assert!(
        !explanation["resolution"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    );
    // `resolution` is a listed entry's, as it always was: none for an unlisted code.
    assert_eq!(unknown["fault"]["resolution"], Value::Null, "{unknown}");
    assert_eq!(known["fault"]["explanation"]["match"], "exact", "{known}");
    assert_eq!(
        known["fault"]["resolution"],
        known["fault"]["explanation"]["resolution"]
    );
    assert_eq!(
        device["latest"]["fault"]["explanation"], unknown["fault"]["explanation"],
        "{device}"
    );
}

#[tokio::test]
async fn the_catalog_needs_the_token_like_the_rest_of_the_api() {
    let app = spawn_app_with(|settings| {
        settings.api.token = Some(m2m_listener::domain::Secret::new("catalog-token"));
    })
    .await;

    let without = app.get_api("/api/v1/errors?q=kind").await;
    let entry_without = app
        .get_api("/api/v1/errors/INPUT_INVALID.Device.Kind.Invalid")
        .await;
    let with = app
        .client
        .get(format!("{}/api/v1/errors?q=kind", app.api_url))
        .bearer_auth("catalog-token")
        .send()
        .await
        .unwrap();

    assert_eq!(without.status(), 401);
    assert_eq!(entry_without.status(), 401);
    assert_eq!(with.status(), 200);
}

#[tokio::test]
async fn odd_search_parameters_never_fail_the_request() {
    let app = spawn_app().await;
    let long = "x".repeat(20_000);
    for query in [
        "q=".to_owned(),
        "q=%00%FF".to_owned(),
        "q=...".to_owned(),
        "q=.:.:".to_owned(),
        format!("q={long}"),
        "q=%E6%BC%A2%E5%AD%97".to_owned(),
    ] {
        let response = app.get_api(&format!("/api/v1/errors?{query}")).await;
        assert_eq!(response.status(), 200, "{query:.40}");
    }
}

#[test]
fn the_openapi_class_and_source_filters_list_exactly_the_catalogs() {
    let spec = std::fs::read_to_string(format!("{}/docs/openapi.yaml", env!("CARGO_MANIFEST_DIR")))
        .expect("openapi.yaml");
    let section = &spec[spec
        .find("  /api/v1/errors:")
        .expect("the listing is documented")..];
    let section = &section[..section.find("      responses:").expect("its responses")];
    let enum_values = |parameter: &str| -> Vec<String> {
        let start = section
            .find(&format!("- name: {parameter}\n"))
            .expect("parameter");
        let rest = &section[start..];
        let open = rest.find("enum: [").expect("an enum") + "enum: [".len();
        let close = open + rest[open..].find(']').expect("enum end");
        rest[open..close]
            .split(',')
            .map(|value| value.trim().to_owned())
            .collect()
    };
    let catalog = m2m_listener::catalog::catalog();
    let mut expected_classes: Vec<String> = catalog.classes().to_vec();
    expected_classes.extend(catalog.classes().iter().map(|class| class.to_uppercase()));
    assert_eq!(enum_values("class"), expected_classes);
    assert_eq!(enum_values("source"), catalog.sources().to_vec());
}

#[test]
fn the_errors_commands_answer_from_the_built_in_catalog_without_a_listener() {
    let run = |arguments: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
            .args(arguments)
            .env("M2M_API__LISTEN", "127.0.0.1:1")
            .output()
            .expect("the binary runs")
    };

    let shown = run(&["errors", "show", "CarrierService.REQUEST_FAILED.Unheard"]);
    let json = run(&[
        "errors",
        "--json",
        "show",
        "REQUEST_FAILED.ServicePlan.NotFound",
    ]);
    let searched = run(&[
        "errors",
        "search",
        "--class",
        "REQUEST_FAILED",
        "sessiontoken",
    ]);
    let refused = run(&["errors", "search", "--class", "nope"]);
    let unknown = run(&["errors", "show", "Completely.Unknown"]);

    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    assert!(text.contains("match       class"), "{text}");
    let value: Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(value["match"], "exact");
    let table = String::from_utf8_lossy(&searched.stdout);
    assert!(table.starts_with("CODE"), "{table}");
    assert!(
        table.contains("REQUEST_FAILED.SessionToken.Expired"),
        "{table}"
    );
    assert_eq!(refused.status.code(), Some(2));
    assert_eq!(unknown.status.code(), Some(1));
}
