//! `m2m-listener jobs add|show|list`: the jobs API from a terminal.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use comfy_table::{ColumnConstraint, Width};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::{emit, report};
use crate::client::ApiClient;
use crate::configuration::Settings;

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// The listener's API, e.g. http://127.0.0.1:9090 (default: from api.listen).
    #[arg(long, env = "M2M_API_URL", global = true)]
    api_url: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: JobsCommand,
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Register a job: the RequestId the platform returned, and what it was for.
    Add {
        #[arg(value_parser = request_id)]
        request_id: String,
        /// activate, deactivate, suspend, restore, upload_devices, ...
        #[arg(long)]
        operation: String,
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        label: Option<String>,
        /// How many devices the request covers (else the number of --device).
        #[arg(long)]
        expected_devices: Option<u64>,
        /// A device of the request, as KIND:ID (e.g. IMEI:990000862471854); repeatable.
        #[arg(long = "device", value_name = "KIND:ID")]
        devices: Vec<String>,
        /// Deadline in seconds after registration (default jobs.default_timeout_s).
        #[arg(long)]
        timeout_s: Option<u64>,
    },
    /// Show one job, and with --devices its devices.
    Show {
        #[arg(value_parser = request_id)]
        request_id: String,
        #[arg(long)]
        devices: bool,
    },
    /// List jobs, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        operation: Option<String>,
        #[arg(long)]
        registered: Option<bool>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
}

/// A request id argument: not blank. `jobs show ''` would otherwise ask for `/api/v1/jobs/`, the
/// listing, and print it as if it were one job.
fn request_id(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("a request id is required (the RequestId the platform returned)".to_owned());
    }
    Ok(text.to_owned())
}

pub fn run(settings: &Settings, arguments: JobsArgs) -> ExitCode {
    let JobsArgs {
        api_url,
        json,
        command,
    } = arguments;
    super::run_against_api(settings, api_url.as_deref(), async move |client| {
        execute(&client, command, json).await
    })
}

async fn execute(
    client: &ApiClient,
    command: JobsCommand,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let (status, body) = match &command {
        JobsCommand::Add {
            request_id,
            operation,
            account,
            label,
            expected_devices,
            devices,
            timeout_s,
        } => {
            let mut parsed = Vec::with_capacity(devices.len());
            for device in devices {
                let Some((kind, id)) = device.split_once(':') else {
                    report(format_args!(
                        "--device {device}: expected KIND:ID, e.g. IMEI:990000862471854"
                    ));
                    return Ok(ExitCode::from(2));
                };
                parsed.push(json!({"kind": kind, "id": id}));
            }
            let mut registration = json!({"request_id": request_id, "operation": operation});
            for (key, value) in [
                ("account", account.clone().map(Value::from)),
                ("label", label.clone().map(Value::from)),
                ("expected_devices", expected_devices.map(Value::from)),
                ("timeout_s", timeout_s.map(Value::from)),
            ] {
                if let Some(value) = value {
                    registration[key] = value;
                }
            }
            if !parsed.is_empty() {
                registration["devices"] = Value::from(parsed);
            }
            client
                .send(Method::POST, "/api/v1/jobs", Some(registration.to_string()))
                .await?
        }
        JobsCommand::Show {
            request_id,
            devices,
        } => {
            let path = if *devices {
                format!("/api/v1/jobs/{}/devices", encode(request_id))
            } else {
                format!("/api/v1/jobs/{}", encode(request_id))
            };
            client.send(Method::GET, &path, None).await?
        }
        JobsCommand::List {
            state,
            operation,
            registered,
            limit,
            cursor,
        } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("limit", &limit.to_string());
            for (key, value) in [
                ("state", state.clone()),
                ("operation", operation.clone()),
                (
                    "registered",
                    registered.map(|registered| registered.to_string()),
                ),
                ("cursor", cursor.clone()),
            ] {
                if let Some(value) = value {
                    query.append_pair(key, &value);
                }
            }
            client
                .send(
                    Method::GET,
                    &format!("/api/v1/jobs?{}", query.finish()),
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
            JobsCommand::Add { .. } => {
                let verb = if status == StatusCode::CREATED {
                    "registered"
                } else {
                    "already registered"
                };
                format!(
                    "{verb}: {}\n{}",
                    value["request_id"].as_str().unwrap_or_default(),
                    job_text(&value)
                )
            }
            JobsCommand::Show { devices: false, .. } => job_text(&value),
            JobsCommand::Show { devices: true, .. } => devices_text(&value),
            JobsCommand::List { .. } => job_list_text(&value),
        }
    };
    Ok(emit(&shown).err().unwrap_or(ExitCode::SUCCESS))
}

fn encode(segment: &str) -> String {
    form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// A JSON value as a table cell.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn job_text(job: &Value) -> String {
    let rows = [
        "request_id",
        "registered",
        "operation",
        "account",
        "label",
        "state",
        "expected_devices",
        "devices_reported",
        "succeeded",
        "failed",
        "pending",
        "deliveries",
        "duplicates",
        "registered_at",
        "first_callback_at",
        "last_callback_at",
        "completed_at",
        "deadline",
    ];
    let mut text = String::new();
    for key in rows {
        text.push_str(&format!("{key:<18} {}\n", cell(&job[key])));
    }
    if let Some(upload) = job["upload"].as_object() {
        text.push_str(&format!(
            "{:<18} total {} / pending {} / success {} / failed {}{}\n",
            "upload",
            cell(&upload["total_lines"]),
            cell(&upload["pending_lines"]),
            cell(&upload["success_lines"]),
            cell(&upload["failed_lines"]),
            upload["package_error"]
                .as_str()
                .map(|error| format!(" / package error: {error}"))
                .unwrap_or_default()
        ));
    }
    text
}

fn job_list_text(page: &Value) -> String {
    let rows: Vec<Vec<String>> = page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|job| {
                    vec![
                        cell(&job["request_id"]),
                        cell(&job["operation"]),
                        cell(&job["state"]),
                        format!(
                            "{}/{}",
                            cell(&job["devices_reported"]),
                            cell(&job["expected_devices"])
                        ),
                        cell(&job["failed"]),
                        cell(&job["registered"]),
                        cell(&job["last_callback_at"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let mut text = table(
        &[
            "REQUEST_ID",
            "OPERATION",
            "STATE",
            "REPORTED",
            "FAILED",
            "REGISTERED",
            "LAST_CALLBACK",
        ],
        &rows,
    );
    if let Some(cursor) = page["next_cursor"].as_str() {
        text.push_str(&format!("more: --cursor {cursor}\n"));
    }
    text
}

fn devices_text(page: &Value) -> String {
    let rows: Vec<Vec<String>> = page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|device| {
                    let identifiers: Vec<String> = device["identifiers"]
                        .as_array()
                        .map(|identifiers| {
                            identifiers
                                .iter()
                                .map(|id| format!("{}:{}", cell(&id["kind"]), cell(&id["id"])))
                                .collect()
                        })
                        .unwrap_or_default();
                    vec![
                        identifiers.join(" "),
                        cell(&device["status"]),
                        device["fault"]["code"]
                            .as_str()
                            .or(device["line_status"].as_str())
                            .unwrap_or("-")
                            .to_owned(),
                        cell(&device["fault"]["resolution"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["DEVICE", "STATUS", "FAULT", "RESOLUTION"], &rows)
}

/// Columns as wide as their widest value up to [`MAX_COLUMN_WIDTH`] display columns, two spaces
/// apart, no borders; a longer value is cut (at a word boundary where there is one), and a
/// value spanning lines shows its first, so every row stays one line.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_truncation_indicator("")
        .set_header(header.to_vec());
    for row in rows {
        let mut row = comfy_table::Row::from(row);
        row.max_height(1);
        table.add_row(row);
    }
    for column in table.column_iter_mut() {
        // Two spaces after every column (trimmed at the end of a line); the width a constraint
        // bounds includes them.
        column
            .set_padding((0, 2))
            .set_constraint(ColumnConstraint::UpperBoundary(Width::Fixed(
                MAX_COLUMN_WIDTH + 2,
            )));
    }
    format!("{}\n", table.trim_fmt())
}

/// The widest a table column gets: a long resolution hint is cut rather than wrapping the row.
const MAX_COLUMN_WIDTH: u16 = 60;

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| value.to_string()).collect()
    }

    #[test]
    fn a_table_is_left_aligned_two_spaces_apart_without_trailing_blanks() {
        let text = table(
            &["DEVICE", "STATUS", "FAULT"],
            &[
                row(&["IMEI:990000862471854", "pending", ""]),
                row(&["MEID:1", "failed", "E1"]),
            ],
        );
        assert_eq!(
            text,
            "DEVICE                STATUS   FAULT\n\
             IMEI:990000862471854  pending\n\
             MEID:1                failed   E1\n"
        );
        assert_eq!(table(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn a_long_value_is_cut_at_sixty_columns_and_a_multi_line_one_shows_its_first_line() {
        let long = "x".repeat(80);
        let text = table(
            &["A", "B"],
            &[row(&[&long, "b"]), row(&["two\nlines", "c"])],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1], format!("{}  b", "x".repeat(60)));
        assert_eq!(lines[2], format!("two{}  c", " ".repeat(57)));
        let sentence = "The device is not eligible because the account has reached its limit";
        let text = table(&["RESOLUTION"], &[row(&[sentence])]);
        assert_eq!(
            text.lines().nth(1),
            Some("The device is not eligible because the account has reached")
        );
    }

    #[test]
    fn columns_align_on_display_width_so_wide_characters_take_two() {
        let text = table(&["A", "B"], &[row(&["ünïcødé", "1"]), row(&["漢字", "2"])]);
        assert_eq!(text, "A        B\nünïcødé  1\n漢字     2\n");
    }
}
