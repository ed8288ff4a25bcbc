//! `docs/openapi.yaml` and the router agree: every documented path is served, every served path
//! is documented.

use crate::helpers::spawn_app;

fn documented_paths() -> Vec<String> {
    let spec = std::fs::read_to_string(format!("{}/docs/openapi.yaml", env!("CARGO_MANIFEST_DIR")))
        .expect("openapi.yaml");
    let mut in_paths = false;
    let mut paths = Vec::new();
    for line in spec.lines() {
        if line == "paths:" {
            in_paths = true;
        } else if in_paths && !line.starts_with(' ') && !line.is_empty() {
            break;
        } else if in_paths && line.starts_with("  /") && line.ends_with(':') {
            paths.push(line.trim().trim_end_matches(':').to_owned());
        }
    }
    paths
}

/// The routes the API serves (kept beside `http::api::Endpoint::of`).
const SERVED: &[&str] = &[
    "/healthz",
    "/readyz",
    "/api/v1/jobs",
    "/api/v1/jobs/{request_id}",
    "/api/v1/jobs/{request_id}/devices",
    "/api/v1/devices/{kind}/{identifier}",
    "/api/v1/devices/{kind}/{identifier}/messages",
    "/api/v1/deliveries",
    "/api/v1/deliveries/{id}/raw",
    "/api/v1/deliveries/{id}/reprocess",
    "/api/v1/errors",
    "/api/v1/errors/{code}",
];

#[tokio::test]
async fn every_documented_path_is_served_and_every_served_path_documented() {
    let app = spawn_app().await;
    let documented = documented_paths();
    let mut served: Vec<String> = SERVED.iter().map(|path| path.to_string()).collect();
    served.sort();
    let mut sorted = documented.clone();
    sorted.sort();
    assert_eq!(sorted, served);

    for path in documented {
        let concrete = path
            .replace("{request_id}", "some-request")
            .replace("{kind}", "IMEI")
            .replace("{identifier}", "1")
            .replace("{id}", "1")
            .replace("{code}", "INPUT_INVALID.DeviceState.Invalid");
        let response = app.get_api(&concrete).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(
            !body.contains("\"NOT_FOUND\""),
            "{path} is documented but not routed: {status} {body}"
        );
    }
}

/// The listing's `kind` filter documents exactly the kinds the listener stores and accepts.
#[test]
fn the_documented_kind_filter_is_the_set_of_kinds() {
    let spec: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{}/docs/openapi.yaml", env!("CARGO_MANIFEST_DIR")))
            .expect("openapi.yaml"),
    )
    .expect("openapi.yaml is YAML");
    let parameters = spec["paths"]["/api/v1/deliveries"]["get"]["parameters"]
        .as_sequence()
        .expect("listing parameters");
    let kind = parameters
        .iter()
        .find(|parameter| parameter["name"] == "kind")
        .expect("a kind filter");
    let mut documented: Vec<&str> = kind["schema"]["enum"]
        .as_sequence()
        .expect("kind enum")
        .iter()
        .filter_map(|value| value.as_str())
        .collect();
    let mut kinds: Vec<&str> = m2m_listener::domain::CallbackKind::ALL
        .iter()
        .map(|kind| kind.as_str())
        .collect();
    documented.sort_unstable();
    kinds.sort_unstable();
    assert_eq!(documented, kinds);
}
