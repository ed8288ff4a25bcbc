//! `m2m-listener errors show|search`: the fault catalog from a terminal. The catalog is built
//! into the binary, so these commands answer without a running listener, with the same lookup
//! (and the same JSON, `--json`) as `GET /api/v1/errors/{code}` and `GET /api/v1/errors`.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{emit, report};
use crate::catalog::{self, CatalogEntry, CatalogSearch, Explanation};

#[derive(Debug, Args)]
pub struct ErrorsArgs {
    /// Print the JSON the API answers instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: ErrorsCommand,
}

#[derive(Debug, Subcommand)]
enum ErrorsCommand {
    /// Explain one code, bare or as a fault carries it (CarrierService.INPUT_INVALID...); a code
    /// the catalog does not list gets the guidance of its class.
    Show { code: String },
    /// List the catalog entries whose code or text contains QUERY (any case), of a class and a
    /// source; all of them without filters.
    Search {
        query: Option<String>,
        /// input_invalid, request_failed, upload_line, ... (any case).
        #[arg(long)]
        class: Option<String>,
        /// thingspace_sync_errors, thingspace_upload_devices, imiconnect_status,
        /// provisioning_api_errors (any case).
        #[arg(long)]
        source: Option<String>,
    },
}

pub fn run(arguments: ErrorsArgs) -> ExitCode {
    let catalog = catalog::catalog();
    let shown = match arguments.command {
        ErrorsCommand::Show { code } => match catalog.explain(&code) {
            Some(explanation) if arguments.json => json_text(&explanation),
            Some(explanation) => explanation_text(&explanation),
            None => {
                report(format_args!(
                    "ERROR_CODE_NOT_FOUND: {code} is not in the fault catalog and names no class of it"
                ));
                return ExitCode::FAILURE;
            }
        },
        ErrorsCommand::Search {
            query,
            class,
            source,
        } => {
            let class = match filter("--class", class.as_deref(), catalog.classes(), |class| {
                catalog.class_named(class)
            }) {
                Ok(class) => class,
                Err(code) => return code,
            };
            let source = match filter("--source", source.as_deref(), catalog.sources(), |source| {
                catalog.source_named(source)
            }) {
                Ok(source) => source,
                Err(code) => return code,
            };
            let found = catalog.search(&CatalogSearch {
                query: query.as_deref(),
                class,
                source,
            });
            if arguments.json {
                json_text(&serde_json::json!({ "items": found }))
            } else {
                search_text(&found)
            }
        }
    };
    emit(&shown).err().unwrap_or(ExitCode::SUCCESS)
}

/// A `--class` or `--source` value the catalog has, as it spells it; else exit code 2 naming the
/// values it has.
fn filter(
    option: &str,
    value: Option<&str>,
    allowed: &[String],
    named: impl Fn(&str) -> Option<&'static str>,
) -> Result<Option<&'static str>, ExitCode> {
    let Some(value) = value else {
        return Ok(None);
    };
    named(value).map(Some).ok_or_else(|| {
        report(format_args!(
            "{option} {value}: must be one of {}",
            allowed.join(", ")
        ));
        ExitCode::from(2)
    })
}

fn json_text(value: &impl serde::Serialize) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

fn explanation_text(explanation: &Explanation) -> String {
    let entry = &explanation.entry;
    let matched = match explanation.matched {
        catalog::Match::Exact => "exact",
        catalog::Match::Text => "text",
        catalog::Match::Class => "class (the code is not in the catalog: its class's guidance)",
    };
    let rows = [
        ("code", entry.code.as_str()),
        ("match", matched),
        ("class", entry.class.as_str()),
        ("retryable", if entry.retryable { "yes" } else { "no" }),
        ("source", entry.source.as_str()),
        ("message", entry.message.as_str()),
        ("cause", entry.cause.as_deref().unwrap_or("-")),
        ("resolution", entry.resolution.as_deref().unwrap_or("-")),
    ];
    rows.iter()
        .map(|(key, value)| format!("{key:<11} {value}\n"))
        .collect()
}

fn search_text(found: &[&CatalogEntry]) -> String {
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|entry| {
            vec![
                entry.code.clone(),
                entry.class.clone(),
                if entry.retryable { "yes" } else { "no" }.to_owned(),
                entry.message.clone(),
            ]
        })
        .collect();
    let mut text = super::jobs::table(&["CODE", "CLASS", "RETRY", "MESSAGE"], &rows);
    text.push_str(&format!(
        "{} of {} entries\n",
        found.len(),
        catalog::catalog().len()
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_lists_every_field_one_per_line() {
        let explanation = catalog::catalog()
            .explain("CarrierService.REQUEST_FAILED.NotListed")
            .unwrap();
        let text = explanation_text(&explanation);
        assert!(text.starts_with("code        REQUEST_FAILED.NotListed\nmatch       class"));
        assert_eq!(text.lines().count(), 8, "{text}");
    }

    #[test]
    fn search_is_a_table_with_the_count_below() {
        let found = catalog::catalog().search(&CatalogSearch {
            query: Some("SessionToken.Expired"),
            ..CatalogSearch::default()
        });
        let text = search_text(&found);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CODE"), "{text}");
        assert!(lines[1].starts_with("REQUEST_FAILED.SessionToken.Expired  request_failed"));
        assert!(lines[2].starts_with("1 of "), "{text}");
    }
}
