//! Secrets stay secret: `GET /api/v1/deliveries/{id}/raw` masks the callback's own pair and every
//! device password unless a holder of the API token asks for them (`?reveal=secrets`), also for
//! quarantined bodies that are not even UTF-8. Runs on both backends.

use m2m_listener::domain::Secret;

use crate::helpers::{TestApp, fixture, spawn_app, spawn_app_with};

const TOKEN: &str = "operator-token-raw";
const CALLBACK_PASSWORD: &str = "s3cret-rotation-A";
const DEVICE_PASSWORD: &str = "<Password>5096306081</Password>";

/// Seed 004's activation signed with a configured pair instead of the example's empty one.
fn signed_activation(name: &str) -> Vec<u8> {
    String::from_utf8(fixture(name))
        .unwrap()
        .replace("<Username/>", "<Username>fleet-ops</Username>")
        .replace(
            "<Password/>",
            &format!("<Password>{CALLBACK_PASSWORD}</Password>"),
        )
        .into_bytes()
}

/// What `/raw` must answer for `body`: the same bytes with each secret value replaced by the mask.
fn masked(body: &[u8], secrets: &[(&str, &str)]) -> Vec<u8> {
    let mut text = String::from_utf8_lossy(body).into_owned();
    for (secret, replacement) in secrets {
        assert!(text.contains(secret), "the body holds {secret}");
        text = text.replace(secret, replacement);
    }
    text.into_bytes()
}

async fn app_with_token() -> TestApp {
    spawn_app_with(|settings| settings.api.token = Some(Secret::new(TOKEN))).await
}

/// The id of the newest delivery.
async fn newest_delivery(app: &TestApp) -> i64 {
    let listing = app
        .get_json_as("/api/v1/deliveries?limit=1", Some(TOKEN))
        .await;
    listing["items"][0]["id"].as_i64().expect("a delivery id")
}

impl TestApp {
    async fn get_as(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(format!("{}{path}", self.api_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("API request sent")
    }

    async fn get_json_as(&self, path: &str, token: Option<&str>) -> serde_json::Value {
        let response = self.get_as(path, token).await;
        assert_eq!(response.status(), 200, "GET {path}");
        serde_json::from_slice(&response.bytes().await.unwrap()).expect("JSON")
    }

    /// Status, headers and bytes of `/raw` of `id`, with `?reveal=secrets` or not.
    async fn raw(
        &self,
        id: i64,
        reveal: bool,
        token: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let query = if reveal { "?reveal=secrets" } else { "" };
        let response = self
            .get_as(&format!("/api/v1/deliveries/{id}/raw{query}"), token)
            .await;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.bytes().await.unwrap().to_vec())
    }
}

#[tokio::test]
async fn raw_masks_the_callback_pair_and_device_passwords_and_reveals_them_to_a_token_holder() {
    let app = app_with_token().await;
    let body = signed_activation("activate_seed004.xml");
    assert_eq!(app.post_callback(body.clone()).await.status(), 200);
    let id = newest_delivery(&app).await;

    let (status, headers, shown) = app.raw(id, false, Some(TOKEN)).await;
    let (revealed_status, _, revealed) = app.raw(id, true, Some(TOKEN)).await;

    assert_eq!(status, 200);
    assert_eq!(
        shown,
        masked(
            &body,
            &[
                (
                    "<Username>fleet-ops</Username>",
                    "<Username>********</Username>"
                ),
                (
                    &format!("<Password>{CALLBACK_PASSWORD}</Password>"),
                    "<Password>********</Password>"
                ),
                (DEVICE_PASSWORD, "<Password>********</Password>"),
            ]
        ),
        "only the three secret values are replaced: {}",
        String::from_utf8_lossy(&shown)
    );
    assert_eq!(
        headers["content-length"],
        shown.len().to_string().as_str(),
        "the length is that of the masked answer"
    );
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(revealed_status, 200);
    assert_eq!(revealed, body, "reveal=secrets gives the exact bytes");
}

#[tokio::test]
async fn without_an_api_token_raw_is_masked_and_reveal_is_refused() {
    let app = spawn_app().await;
    let body = signed_activation("activate_seed004.xml");
    assert_eq!(app.post_callback(body.clone()).await.status(), 200);
    let id = newest_delivery(&app).await;

    let (status, _, shown) = app.raw(id, false, None).await;
    let (refused_status, _, refused) = app.raw(id, true, None).await;

    assert_eq!(status, 200);
    let shown = String::from_utf8(shown).unwrap();
    assert!(!shown.contains(CALLBACK_PASSWORD), "{shown}");
    assert!(!shown.contains(DEVICE_PASSWORD), "{shown}");
    assert!(!shown.contains("fleet-ops"), "{shown}");
    assert_eq!(refused_status, 403);
    let refused: serde_json::Value = serde_json::from_slice(&refused).unwrap();
    assert_eq!(refused["error"]["code"], "SECRETS_REQUIRE_TOKEN");
}

#[tokio::test]
async fn a_quarantined_body_that_is_not_utf8_is_masked_too() {
    let app = app_with_token().await;
    // The malformed example, with a byte that is not UTF-8 where a proxy mangled a character.
    let mut body = signed_activation("activate_seed004_malformed.xml");
    let at = body
        .windows(7)
        .position(|window| window == b"<State>")
        .unwrap();
    body.splice(at..at, [0xff, 0xfe]);
    assert_eq!(app.post_callback(body.clone()).await.status(), 200);
    let listing = app
        .get_json_as("/api/v1/deliveries?result=quarantined", Some(TOKEN))
        .await;
    let id = listing["items"][0]["id"].as_i64().expect("quarantined");

    let (status, _, shown) = app.raw(id, false, Some(TOKEN)).await;
    let (_, _, revealed) = app.raw(id, true, Some(TOKEN)).await;

    assert_eq!(status, 200);
    let contains = |haystack: &[u8], needle: &[u8]| {
        haystack
            .windows(needle.len())
            .any(|window| window == needle)
    };
    assert!(!contains(&shown, CALLBACK_PASSWORD.as_bytes()));
    assert!(!contains(&shown, DEVICE_PASSWORD.as_bytes()));
    assert!(!contains(&shown, b"fleet-ops"));
    assert!(
        contains(&shown, b"\xff\xfe<State>"),
        "everything else is byte for byte"
    );
    assert_eq!(
        shown.len(),
        body.len() + 3 * "********".len()
            - "fleet-ops".len()
            - CALLBACK_PASSWORD.len()
            - "5096306081".len(),
        "each of the three values is replaced by the mask, whatever its length"
    );
    assert_eq!(revealed, body);
}

#[tokio::test]
async fn json_bodies_have_their_pair_and_every_password_key_masked() {
    let app = app_with_token().await;
    // A REST callback whose response carries a device credential, and a malformed one.
    let stored = String::from_utf8(fixture("json_change_identifier.json"))
        .unwrap()
        .replace(
            r#""username": "", "password": """#,
            r#""username": "fleet-ops", "password": "s3cret-rotation-A""#,
        )
        .replace(
            r#""servicePlan": "M2M_4G""#,
            r#""servicePlan": "M2M_4G", "deviceCredential": {"username": "5096306081@vzw3g.com", "password": "device-pass-1"}"#,
        );
    let quarantined = String::from_utf8(fixture("json_malformed.json"))
        .unwrap()
        .replace(
            r#""username": "", "password": """#,
            r#""username": "fleet-ops", "password": "s3cret-rotation-A""#,
        );

    for body in [stored, quarantined] {
        let response = app
            .client
            .post(&app.callback_url)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{body}");
        let id = newest_delivery(&app).await;

        let (_, _, shown) = app.raw(id, false, Some(TOKEN)).await;
        let (_, _, revealed) = app.raw(id, true, Some(TOKEN)).await;

        let shown = String::from_utf8(shown).unwrap();
        assert_eq!(
            shown,
            body.replace("\"fleet-ops\"", "\"********\"")
                .replace("\"s3cret-rotation-A\"", "\"********\"")
                .replace("\"device-pass-1\"", "\"********\""),
            "a device credential's username stays"
        );
        assert_eq!(revealed, body.as_bytes());
    }
}
