//! Upgrades keep data. Each database under `tests/fixtures/upgrade/` was written by a released
//! binary (one per released schema: `sqlite-v<N>.db`, `postgres-v<N>.sql`, made by
//! `scripts/make-upgrade-fixture.py`), beside the answers that release's API gave about it
//! (`.expected.json`). This code opens a copy, migrates it, must give every one of those answers
//! again, and must go on taking callbacks.
//!
//! What may differ from the release's answer: nothing that release answered. A field this code
//! adds to an object is not a difference (the API grows); a field missing, a value changed, an
//! item more or less in a list, another status or content type, a byte of a body: each is. The
//! one exception is an answer an issue changed on purpose ([`SUPERSEDED`]): it is checked for
//! what the issue made of it instead.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::helpers::{Backend, CarrierResult, TestApp, carrier_callback, spawn_app_on};
use m2m_listener::domain::Secret;

/// The fixtures of this backend, oldest schema first, each with its expected answers.
fn released_databases() -> Vec<(PathBuf, PathBuf)> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade");
    let (prefix, extension) = match crate::BACKEND {
        Backend::Sqlite => ("sqlite-v", "db"),
        Backend::Postgres => ("postgres-v", "sql"),
    };
    let mut found: Vec<(u32, PathBuf, PathBuf)> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let version = name
                .strip_prefix(prefix)?
                .strip_suffix(&format!(".{extension}"))?
                .parse()
                .ok()?;
            let expected = directory.join(format!("{prefix}{version}.expected.json"));
            Some((version, path, expected))
        })
        .collect();
    found.sort();
    found
        .into_iter()
        .map(|(_, database, expected)| (database, expected))
        .collect()
}

/// Answers of a release that a later issue changed on purpose, by path (any query), and why.
/// [`superseded_answers_are_what_their_issue_made_of_them`] checks what is answered now instead;
/// every other recorded answer must be given again.
const SUPERSEDED: &[(&str, &str)] = &[(
    "/api/v1/devices/MEID/A1000000449999",
    "issue 14: a device a registered job lists is found before any callback reports it \
     (the release answered 404 DEVICE_NOT_FOUND)",
)];

fn is_superseded(path: &str) -> bool {
    let without_query = path.split('?').next().unwrap_or(path);
    SUPERSEDED
        .iter()
        .any(|(superseded, _)| *superseded == without_query)
}

/// The fixture's MEID A1000000449999 is listed by a registered job with a one-second deadline
/// that no callback reported: it is found, `missing` in that job, with no history.
async fn superseded_answers_are_what_their_issue_made_of_them(app: &TestApp, token: &str) {
    for (path, why) in SUPERSEDED {
        let device = get(app, token, path).await;
        assert_eq!(device["history"], serde_json::json!([]), "{why}: {device}");
        assert_eq!(device["latest"]["status"], "missing", "{why}: {device}");
        let jobs = device["jobs"].as_array().expect("jobs");
        assert_eq!(jobs.len(), 1, "{why}: {device}");
        assert_eq!(jobs[0]["registered"], true, "{why}: {device}");
        assert_eq!(jobs[0]["status"], "missing", "{why}: {device}");
        assert_eq!(jobs[0]["job_state"], "timed_out", "{why}: {device}");
        assert_eq!(device["latest"]["request_id"], jobs[0]["request_id"]);
    }
}

/// Every field of `old` as it was, recursively; fields only `new` has are allowed.
fn differences(at: &str, old: &Value, new: &Value, found: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            for (key, old_value) in old {
                match new.get(key) {
                    Some(new_value) => {
                        differences(&format!("{at}.{key}"), old_value, new_value, found)
                    }
                    None => found.push(format!("{at}.{key}: gone (was {old_value})")),
                }
            }
        }
        (Value::Array(old_items), Value::Array(new_items)) => {
            if old_items.len() != new_items.len() {
                found.push(format!(
                    "{at}: {} items became {} (was {old})",
                    old_items.len(),
                    new_items.len()
                ));
            }
            for (index, (old_item, new_item)) in old_items.iter().zip(new_items).enumerate() {
                differences(&format!("{at}[{index}]"), old_item, new_item, found);
            }
        }
        _ if old == new => {}
        _ => found.push(format!("{at}: {old} became {new}")),
    }
}

/// Asks this code every request the release answered, and lists what it answers otherwise.
async fn answers_that_differ(app: &TestApp, expected: &Value, token: &str) -> Vec<String> {
    let answers = expected["answers"].as_array().expect("answers");
    assert!(!answers.is_empty(), "the fixture records no answer");
    let mut found = Vec::new();
    for answer in answers {
        let method = answer["method"].as_str().expect("method");
        let path = answer["path"].as_str().expect("path");
        let at = format!("{method} {path}");
        if is_superseded(path) {
            continue;
        }
        let url = format!("{}{path}", app.api_url);
        let request = match method {
            "GET" => app.client.get(url),
            "POST" => app
                .client
                .post(url)
                .header("Content-Type", "application/json")
                .body(answer["body"].to_string()),
            other => panic!("{at}: no such method in a fixture: {other}"),
        };
        let response = request
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|error| panic!("{at}: {error}"));
        let status = response.status().as_u16();
        if Some(u64::from(status)) != answer["status"].as_u64() {
            found.push(format!("{at}: status {status}, was {}", answer["status"]));
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        if content_type.as_deref() != answer["content_type"].as_str() {
            found.push(format!(
                "{at}: content type {content_type:?}, was {}",
                answer["content_type"]
            ));
        }
        let body = response.bytes().await.expect("answer body");
        if let Some(old) = answer.get("json") {
            match serde_json::from_slice::<Value>(&body) {
                Ok(new) => differences(&at, old, &new, &mut found),
                Err(error) => found.push(format!("{at}: not JSON any more ({error})")),
            }
        } else if let Some(old) = answer.get("text") {
            if body != old.as_str().expect("text").as_bytes() {
                found.push(format!(
                    "{at}: body {:?}, was {old}",
                    String::from_utf8_lossy(&body)
                ));
            }
        } else {
            panic!(
                "{at}: the fixture records neither json nor text (a base64 body needs a decoder here)"
            );
        }
    }
    found
}

/// The recorded answer to `GET path`.
fn recorded<'a>(expected: &'a Value, path: &str) -> &'a Value {
    expected["answers"]
        .as_array()
        .expect("answers")
        .iter()
        .find(|answer| answer["method"] == "GET" && answer["path"] == path)
        .map(|answer| &answer["json"])
        .unwrap_or_else(|| panic!("the fixture recorded no GET {path}"))
}

async fn get(app: &TestApp, token: &str, path: &str) -> Value {
    let response = app
        .client
        .get(format!("{}{path}", app.api_url))
        .bearer_auth(token)
        .send()
        .await
        .expect("API request");
    assert_eq!(response.status(), 200, "GET {path}");
    serde_json::from_slice(&response.bytes().await.expect("answer body")).expect("JSON answer")
}

#[tokio::test]
async fn every_released_database_is_answered_as_its_release_answered_it_and_takes_new_callbacks() {
    let databases = released_databases();
    assert!(
        !databases.is_empty(),
        "no upgrade fixture for this backend under tests/fixtures/upgrade"
    );
    for (database, expected_path) in databases {
        let expected: Value = serde_json::from_slice(
            &std::fs::read(&expected_path)
                .unwrap_or_else(|error| panic!("{}: {error}", expected_path.display())),
        )
        .expect("expected answers are JSON");
        let token = expected["api_token"]
            .as_str()
            .expect("api_token")
            .to_owned();
        let configured = token.clone();
        let app = spawn_app_on(&database, move |settings| {
            settings.api.token = Some(Secret::new(configured));
            // The fixture's bodies are as old as the fixture: pruning them by age is another
            // test's business (tests/api/retention.rs).
            settings.storage.retention_days = 365_000;
            settings.events.retention_days = 365_000;
        })
        .await;

        let found = answers_that_differ(&app, &expected, &token).await;
        assert!(
            found.is_empty(),
            "{} (written by {}) is answered otherwise than its release answered it:\n{}",
            database.display(),
            expected["release"],
            found.join("\n")
        );
        superseded_answers_are_what_their_issue_made_of_them(&app, &token).await;

        // A re-delivery of a stored message is a duplicate of the delivery the release stored.
        let duplicates = recorded(&expected, "/api/v1/deliveries?result=duplicate&limit=1000");
        let original = duplicates["items"][0]["duplicate_of"].clone();
        assert!(
            original.is_i64(),
            "the fixture holds a duplicate: {duplicates}"
        );
        let job_path = "/api/v1/jobs/2c90bd28-ece4-42ef-9f02-7e3bd4fbff33";
        let job_before = get(&app, &token, job_path).await;
        let response = app
            .post_callback(crate::helpers::with_callback_count(
                "activate_seed004.xml",
                3,
            ))
            .await;
        assert_eq!(
            response.status(),
            200,
            "{}: re-delivery",
            database.display()
        );
        let duplicates_now = get(&app, &token, "/api/v1/deliveries?result=duplicate&limit=1").await;
        assert_eq!(duplicates_now["items"][0]["duplicate_of"], original);
        assert_eq!(duplicates_now["items"][0]["callback_count"], 3);
        let job_after = get(&app, &token, job_path).await;
        assert_eq!(
            job_after["duplicates"].as_i64(),
            job_before["duplicates"].as_i64().map(|count| count + 1)
        );
        assert_eq!(
            job_after["devices_reported"],
            job_before["devices_reported"]
        );

        // A new message is stored under an id after every stored one, with its job.
        let newest_before = recorded(&expected, "/api/v1/deliveries?limit=1000")["items"][0]["id"]
            .as_i64()
            .expect("the fixture holds deliveries");
        let request_id = "upgrade-new-job-1";
        let response = app
            .post_callback(carrier_callback(
                request_id,
                &[("IMEI", "990000862471999")],
                CarrierResult::Activated { mdn: "5096309999" },
            ))
            .await;
        assert_eq!(
            response.status(),
            200,
            "{}: new callback",
            database.display()
        );
        let stored = get(
            &app,
            &token,
            &format!("/api/v1/deliveries?request_id={request_id}"),
        )
        .await;
        assert_eq!(stored["items"][0]["result"], "stored", "{stored}");
        assert!(
            stored["items"][0]["id"].as_i64() > Some(newest_before + 1),
            "new ids follow the stored ones: {stored}"
        );
        let job = get(&app, &token, &format!("/api/v1/jobs/{request_id}")).await;
        assert_eq!(job["devices_reported"], 1, "{job}");
        let devices = get(&app, &token, "/api/v1/devices/IMEI/990000862471999").await;
        assert_eq!(devices["latest"]["status"], "succeeded", "{devices}");

        // And a new registration is a new job.
        let response = app
            .client
            .post(format!("{}/api/v1/jobs", app.api_url))
            .bearer_auth(&token)
            .header("Content-Type", "application/json")
            .body(r#"{"request_id":"upgrade-new-job-2","operation":"suspend"}"#)
            .send()
            .await
            .expect("registration sent");
        assert_eq!(
            response.status(),
            201,
            "{}: registration",
            database.display()
        );

        // What a release quarantined: the seed 004 body if that release could not read it
        // (this build can), and the broken JSON body, which stays quarantined.
        let quarantined = get(
            &app,
            &token,
            "/api/v1/deliveries?result=quarantined&limit=1000",
        )
        .await;
        let quarantined: Vec<(i64, Option<String>)> = quarantined["items"]
            .as_array()
            .expect("quarantined deliveries")
            .iter()
            .map(|item| {
                (
                    item["id"].as_i64().expect("id"),
                    item["request_id"].as_str().map(str::to_owned),
                )
            })
            .collect();
        let seed = quarantined
            .iter()
            .find(|(_, request_id)| {
                request_id.as_deref() == Some("2c90bd28-ece4-42ef-9f02-7e3bd4fbff33")
            })
            .map(|(id, _)| *id);
        // Releases before the repair (issue 14: SQLite schema 5, PostgreSQL 2) quarantined it;
        // later ones stored it on arrival, so there is nothing to reprocess.
        let repairs_on_arrival = expected["schema_version"]
            .as_i64()
            .is_some_and(|version| version >= repair_schema());
        assert_eq!(
            seed.is_none(),
            repairs_on_arrival,
            "{}: the malformed seed 004 body is quarantined exactly by the releases before the repair",
            database.display()
        );
        if let Some(seed) = seed {
            reprocess_the_repaired_seed(&app, &token, seed, &original, job_path, &database).await;
        }
        for (id, _) in quarantined.iter().filter(|(id, _)| Some(*id) != seed) {
            assert_eq!(
                reprocess(&app, &token, *id, &database).await["delivery"]["result"],
                "quarantined"
            );
        }
        app.stop().await;
    }
}

/// The first schema of this backend whose release repaired the seed 004 body on arrival.
fn repair_schema() -> i64 {
    match crate::BACKEND {
        Backend::Sqlite => 5,
        Backend::Postgres => 2,
    }
}

async fn reprocess(app: &TestApp, token: &str, id: i64, database: &Path) -> Value {
    let response = app
        .client
        .post(format!("{}/api/v1/deliveries/{id}/reprocess", app.api_url))
        .bearer_auth(token)
        .send()
        .await
        .expect("reprocess sent");
    assert_eq!(
        response.status(),
        200,
        "{}: reprocess {id}",
        database.display()
    );
    serde_json::from_slice(&response.bytes().await.expect("answer")).expect("JSON")
}

/// The release quarantined the seed 004 example with its malformed tag; this build reads it. The
/// same message was stored by its well-formed delivery, so reprocess makes it a duplicate of that
/// one (no second outcome), and the job no longer counts it quarantined. A second run changes
/// nothing.
async fn reprocess_the_repaired_seed(
    app: &TestApp,
    token: &str,
    seed: i64,
    original: &Value,
    job_path: &str,
    database: &Path,
) {
    let outcomes_before = get(app, token, &format!("{job_path}/devices")).await;
    let first = reprocess(app, token, seed, database).await;
    assert_eq!(first["delivery"]["result"], "duplicate", "{first}");
    assert_eq!(&first["delivery"]["duplicate_of"], original, "{first}");
    assert_eq!(get(app, token, job_path).await["quarantined"], 0);
    assert_eq!(
        get(app, token, &format!("{job_path}/devices")).await,
        outcomes_before
    );
    assert_eq!(
        reprocess(app, token, seed, database).await["delivery"]["result"],
        "skipped"
    );
}
