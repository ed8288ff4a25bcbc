//! Device messages (issue 14 item 5): MO SMS and NIDD uplinks stored with their device's
//! identifiers, listed per device newest first, and linked from the device view.

use serde_json::Value;

use crate::helpers::{
    CarrierResult, TestApp, carrier_callback, fixture, sms_mo_callback, spawn_app,
    with_callback_count,
};

const SMS_MDN: &str = "5096306081";
const SMS_TEXT: &str = "TEMP=21.5;BATT=87";
const NIDD_REQUEST: &str = "8f2a6c1e-0b7d-4d3a-9e61-2b5c0d4f7a10";
const NIDD_PAYLOAD: &str = "VEVNUD0yMS41O0JBVFQ9ODcK";

async fn post_ok(app: &TestApp, body: impl Into<reqwest::Body>) {
    assert_eq!(app.post_callback(body).await.status(), 200);
}

async fn messages(app: &TestApp, kind: &str, id: &str) -> Vec<Value> {
    let page = app
        .get_json(&format!("/api/v1/devices/{kind}/{id}/messages"))
        .await;
    assert!(page["next_cursor"].is_null(), "{page}");
    page["items"].as_array().cloned().unwrap_or_default()
}

fn nidd_re_delivery() -> Vec<u8> {
    String::from_utf8(fixture("json_nidd_uplink.json"))
        .unwrap()
        .replace("\"callbackCount\": 1", "\"callbackCount\": 2")
        .into_bytes()
}

#[tokio::test]
async fn an_mo_sms_is_found_by_its_device_with_its_text() {
    let app = spawn_app().await;
    post_ok(&app, fixture("sms_mo.xml")).await;
    let delivery = &app.get_json("/api/v1/deliveries").await["items"][0];

    let items = messages(&app, "MDN", SMS_MDN).await;

    assert_eq!(items.len(), 1, "{items:?}");
    let message = &items[0];
    assert_eq!(message["channel"], "sms");
    assert_eq!(message["text"], SMS_TEXT);
    assert_eq!(message["payload"], SMS_TEXT);
    assert_eq!(message["sent_at"], "2026-11-20T10:15:00Z");
    assert_eq!(message["request_id"], Value::Null);
    assert_eq!(message["delivery_id"], delivery["id"]);
    assert_eq!(message["received_at"], delivery["received_at"]);
    assert!(message["id"].as_i64().is_some_and(|id| id > 0), "{message}");
    assert_eq!(
        message["identifiers"],
        serde_json::json!([{"kind": "MDN", "id": SMS_MDN}, {"kind": "MEID", "id": "A1000000444461"}])
    );
    // Its other identifier finds it too, the kind in any case.
    let by_meid = messages(&app, "meid", "A1000000444461").await;
    assert_eq!(by_meid, items);
}

#[tokio::test]
async fn a_nidd_uplink_is_found_by_every_identifier_it_lists() {
    let app = spawn_app().await;
    post_ok(&app, fixture("json_nidd_uplink.json")).await;

    for (kind, id) in [
        ("MSISDN", "15096300001"),
        ("imei", "990000862471854"),
        ("ICCID", "89148000000800000001"),
        ("Imsi", "311480000000001"),
        ("MDN", "5096300001"),
        ("min", "5096300001"),
    ] {
        let items = messages(&app, kind, id).await;
        assert_eq!(items.len(), 1, "{kind} {id}: {items:?}");
        let message = &items[0];
        assert_eq!(message["channel"], "nidd", "{kind}");
        assert_eq!(message["text"], "TEMP=21.5;BATT=87\n", "{kind}");
        assert_eq!(message["payload"], NIDD_PAYLOAD, "{kind}");
        assert_eq!(message["request_id"], NIDD_REQUEST, "{kind}");
        assert_eq!(message["sent_at"], Value::Null, "{kind}");
        let kinds: Vec<&str> = message["identifiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|identifier| identifier["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["ICCID", "IMEI", "IMSI", "MDN", "MIN", "MSISDN"]);
    }
    // An identifier it does not list finds nothing.
    assert!(messages(&app, "IMEI", "990000862471855").await.is_empty());
}

#[tokio::test]
async fn a_re_delivery_stores_no_second_message() {
    let app = spawn_app().await;
    post_ok(&app, with_callback_count("sms_mo.xml", 1)).await;
    post_ok(&app, with_callback_count("sms_mo.xml", 2)).await;
    post_ok(&app, fixture("json_nidd_uplink.json")).await;
    post_ok(&app, nidd_re_delivery()).await;

    let deliveries = app.get_json("/api/v1/deliveries").await;
    assert_eq!(deliveries["items"].as_array().unwrap().len(), 4);
    assert_eq!(messages(&app, "MDN", SMS_MDN).await.len(), 1);
    assert_eq!(messages(&app, "IMEI", "990000862471854").await.len(), 1);
    assert_eq!(app.count("SELECT count(*) FROM device_messages"), 2);
    // Each message belongs to its first delivery.
    assert_eq!(
        app.count(
            "SELECT count(*) FROM device_messages m JOIN deliveries d ON d.id = m.delivery_id
              WHERE d.duplicate_of IS NULL AND d.result = 'stored'"
        ),
        2
    );
}

#[tokio::test]
async fn messages_are_listed_newest_first_a_page_at_a_time() {
    let app = spawn_app().await;
    for number in 1..=5 {
        post_ok(&app, sms_mo_callback(SMS_MDN, &format!("reading {number}"))).await;
    }
    // Another device's message is not in the listing.
    post_ok(&app, sms_mo_callback("5096306082", "someone else")).await;

    let mut texts = Vec::new();
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(cursor) => {
                format!("/api/v1/devices/MDN/{SMS_MDN}/messages?limit=2&cursor={cursor}")
            }
            None => format!("/api/v1/devices/MDN/{SMS_MDN}/messages?limit=2"),
        };
        let page = app.get_json(&path).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2, "{page}");
        for item in items {
            texts.push(item["text"].as_str().unwrap().to_owned());
            ids.push(item["id"].as_i64().unwrap());
        }
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 10, "the cursor never ends");
    }

    assert_eq!(pages, 3);
    assert_eq!(
        texts,
        [
            "reading 5",
            "reading 4",
            "reading 3",
            "reading 2",
            "reading 1"
        ]
    );
    assert!(ids.windows(2).all(|pair| pair[0] > pair[1]), "{ids:?}");
}

#[tokio::test]
async fn a_bad_cursor_or_limit_is_a_400() {
    let app = spawn_app().await;
    post_ok(&app, fixture("sms_mo.xml")).await;

    for (query, code) in [
        ("cursor=abc", "INVALID_CURSOR"),
        ("cursor=-1", "INVALID_CURSOR"),
        ("cursor=1234567890123456789", "INVALID_CURSOR"),
        ("limit=0", "INVALID_PARAMETER"),
        ("limit=1001", "INVALID_PARAMETER"),
    ] {
        let response = app
            .get_api(&format!("/api/v1/devices/MDN/{SMS_MDN}/messages?{query}"))
            .await;
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
}

#[tokio::test]
async fn the_device_view_finds_a_device_known_only_by_its_messages_and_links_them() {
    let app = spawn_app().await;
    post_ok(&app, fixture("sms_mo.xml")).await;

    let view = app
        .get_json(&format!("/api/v1/devices/mdn/{SMS_MDN}"))
        .await;

    assert_eq!(view["latest"], Value::Null, "{view}");
    assert_eq!(view["history"], serde_json::json!([]));
    assert_eq!(
        view["identifiers"],
        serde_json::json!([{"kind": "MDN", "id": SMS_MDN}, {"kind": "MEID", "id": "A1000000444461"}])
    );
    assert_eq!(
        view["messages"]["href"],
        format!("/api/v1/devices/MDN/{SMS_MDN}/messages")
    );
    assert_eq!(view["messages"]["latest"]["text"], SMS_TEXT, "{view}");
    // The link answers.
    let linked = app
        .get_json(view["messages"]["href"].as_str().unwrap())
        .await;
    assert_eq!(linked["items"][0], view["messages"]["latest"]);
    // A device nothing ever named is still not found.
    let unknown = app.get_api("/api/v1/devices/MDN/5096306089").await;
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn the_device_view_of_a_reported_device_links_its_latest_message() {
    let app = spawn_app().await;
    post_ok(
        &app,
        carrier_callback(
            "activation",
            &[("ICCID", "89148000000800000001")],
            CarrierResult::Activated { mdn: "5096300001" },
        ),
    )
    .await;
    let before = app
        .get_json("/api/v1/devices/ICCID/89148000000800000001")
        .await;
    assert_eq!(before["latest"]["status"], "succeeded", "{before}");
    assert_eq!(before["messages"]["latest"], Value::Null, "{before}");
    assert_eq!(
        before["messages"]["href"],
        "/api/v1/devices/ICCID/89148000000800000001/messages"
    );

    post_ok(&app, fixture("json_nidd_uplink.json")).await;
    let after = app
        .get_json("/api/v1/devices/ICCID/89148000000800000001")
        .await;

    assert_eq!(after["latest"]["status"], "succeeded", "{after}");
    assert_eq!(after["history"].as_array().unwrap().len(), 1);
    assert_eq!(after["messages"]["latest"]["channel"], "nidd", "{after}");
    assert_eq!(after["messages"]["latest"]["payload"], NIDD_PAYLOAD);
    // The identifiers the uplink lists are the device's too.
    let kinds: Vec<&str> = after["identifiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|identifier| identifier["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ICCID", "IMEI", "IMSI", "MDN", "MIN", "MSISDN"]);
}
