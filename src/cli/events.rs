//! `m2m-listener events list|show|redeliver`: the event feed from a terminal.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::Value;

use super::emit;
use crate::client::ApiClient;
use crate::configuration::Settings;

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// The listener's API, e.g. http://127.0.0.1:9090 (default: from api.listen).
    #[arg(long, env = "M2M_API_URL", global = true)]
    api_url: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// List events, oldest first (resume with --after the last id seen).
    List {
        /// job.finished, device.outcome, device.message, delivery.quarantined
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one event with where it stands at each sink and every attempt.
    Show { id: String },
    /// Send an event again to every sink it went to (a recorded, manual attempt).
    Redeliver { id: String },
}

pub fn run(settings: &Settings, arguments: EventsArgs) -> ExitCode {
    let EventsArgs {
        api_url,
        json,
        command,
    } = arguments;
    super::run_against_api(settings, api_url.as_deref(), async move |client| {
        execute(&client, command, json).await
    })
}

fn segment(id: &str) -> String {
    form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

async fn execute(
    client: &ApiClient,
    command: EventsCommand,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let (status, body) = match &command {
        EventsCommand::List { kind, after, limit } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("limit", &limit.to_string());
            for (key, value) in [("type", kind), ("after", after)] {
                if let Some(value) = value {
                    query.append_pair(key, value);
                }
            }
            client
                .send(
                    Method::GET,
                    &format!("/api/v1/events?{}", query.finish()),
                    None,
                )
                .await?
        }
        EventsCommand::Show { id } => {
            client
                .send(
                    Method::GET,
                    &format!("/api/v1/events/{}", segment(id)),
                    None,
                )
                .await?
        }
        EventsCommand::Redeliver { id } => {
            client
                .send(
                    Method::POST,
                    &format!("/api/v1/events/{}/redeliver", segment(id)),
                    None,
                )
                .await?
        }
    };
    let value = match super::api_answer(status, &body) {
        Ok(value) => value,
        Err(code) => return Ok(code),
    };
    let shown = if as_json {
        format!("{}\n", serde_json::to_string_pretty(&value)?)
    } else {
        match command {
            EventsCommand::List { .. } => list_text(&value),
            EventsCommand::Show { .. } => detail_text(&value),
            EventsCommand::Redeliver { id } => {
                let sinks: Vec<&str> = value["sinks"]
                    .as_array()
                    .map(|sinks| sinks.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                format!("{id}: scheduled again for {}\n", sinks.join(", "))
            }
        }
    };
    Ok(emit(&shown).err().unwrap_or(ExitCode::SUCCESS))
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    format!("{table}\n")
}

fn list_text(page: &Value) -> String {
    let rows = page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|event| {
                    let data = &event["data"];
                    vec![
                        cell(&event["id"]),
                        cell(&event["type"]),
                        cell(&event["timestamp"]),
                        cell(&data["request_id"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let mut text = table(&["ID", "TYPE", "TIMESTAMP", "REQUEST"], rows);
    if let Some(cursor) = page["next_cursor"].as_str() {
        text.push_str(&format!("more: --after {cursor}\n"));
    }
    text
}

fn detail_text(detail: &Value) -> String {
    let mut text = format!(
        "{} {} at {}\n{}\n\n",
        cell(&detail["id"]),
        cell(&detail["type"]),
        cell(&detail["timestamp"]),
        serde_json::to_string_pretty(&detail["data"]).unwrap_or_default()
    );
    let deliveries = detail["deliveries"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    ["sink", "state", "attempts", "next_attempt_at", "last_error"]
                        .iter()
                        .map(|key| cell(&row[*key]))
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    text.push_str(&table(
        &["SINK", "STATE", "ATTEMPTS", "NEXT", "LAST ERROR"],
        deliveries,
    ));
    let attempts = detail["attempts"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    [
                        "sink",
                        "attempt",
                        "attempted_at",
                        "status",
                        "latency_ms",
                        "result",
                        "manual",
                        "error",
                    ]
                    .iter()
                    .map(|key| cell(&row[*key]))
                    .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    text.push('\n');
    text.push_str(&table(
        &[
            "SINK", "ATTEMPT", "AT", "STATUS", "MS", "RESULT", "MANUAL", "ERROR",
        ],
        attempts,
    ));
    text
}
