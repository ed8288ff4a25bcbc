//! Log output: human-readable or JSON lines, filtered by `telemetry.level` or `RUST_LOG`.
//!
//! A log line cannot be forged from the wire. Values that come from a sender (usernames,
//! RequestIds, parser reasons) are logged through [`Wire`], which escapes control characters and
//! cuts them to [`MAX_WIRE_CHARS`] with their full length; in the text format every field is also
//! escaped once more on its way out ([`escaping_fields`]), so that a value logged without `Wire`
//! cannot break a line either. The JSON format escapes by itself (it is JSON).

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;

use crate::configuration::{LogFormat, TelemetrySettings};

/// The most characters of one wire value a log line shows: the limit of a RequestId the
/// registration API accepts (`jobs::MAX_REQUEST_ID_CHARS`), so that every id a job can be
/// registered under is logged whole and a longer one is visibly cut.
pub const MAX_WIRE_CHARS: usize = crate::jobs::MAX_REQUEST_ID_CHARS;
/// The most characters of any one field of a text line (error chains included).
const MAX_FIELD_CHARS: usize = 4096;

pub fn init(settings: &TelemetrySettings) -> anyhow::Result<()> {
    let filter = match EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(_) => EnvFilter::try_new(&settings.level).map_err(|error| {
            anyhow::anyhow!("invalid telemetry.level {:?}: {error}", settings.level)
        })?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    let installed = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.fmt_fields(escaping_fields()).try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("cannot install the log subscriber: {error}"))
}

/// The text format's fields as the default formatter writes them (`name=value`, the message
/// bare), every value escaped and cut.
fn escaping_fields() -> impl for<'writer> tracing_subscriber::fmt::FormatFields<'writer> + 'static {
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let mut text = String::new();
        write!(text, "{value:?}")?;
        let escaped = Escaped {
            text: &text,
            limit: MAX_FIELD_CHARS,
        };
        if field.name() == "message" {
            write!(writer, "{escaped}")
        } else {
            write!(writer, "{}={escaped}", field.name())
        }
    })
    .delimited(" ")
}

/// A value from the wire as a log field: control characters (and the Unicode characters that
/// reorder or break lines) escaped, cut to [`MAX_WIRE_CHARS`] characters with the full length.
pub struct Wire<'a>(pub &'a str);

impl fmt::Display for Wire<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        Escaped {
            text: self.0,
            limit: MAX_WIRE_CHARS,
        }
        .fmt(formatter)
    }
}

/// An error and its sources as one log field or message: `error: source: source...`, the way
/// `anyhow` shows a chain with `{:#}`. The edge logs a store failure once, through this.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(formatter, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

struct Escaped<'a> {
    text: &'a str,
    limit: usize,
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, character) in self.text.chars().enumerate() {
            if shown == self.limit {
                return write!(formatter, "…[{} bytes in all]", self.text.len());
            }
            if needs_escape(character) {
                write!(formatter, "{}", character.escape_default())?;
            } else {
                formatter.write_char(character)?;
            }
        }
        Ok(())
    }
}

/// Control characters (newlines, ESC...), and the separators and direction overrides that can
/// make a line read as something else.
fn needs_escape(character: char) -> bool {
    character.is_control()
        || matches!(character, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_are_escaped_and_cut() {
        assert_eq!(Wire("plain-id").to_string(), "plain-id");
        assert_eq!(
            Wire("ops\nINFO forged\r\u{1b}[31m").to_string(),
            "ops\\nINFO forged\\r\\u{1b}[31m"
        );
        assert_eq!(Wire("a\u{202e}b").to_string(), "a\\u{202e}b");
        let long = "r".repeat(1_000_000);
        let shown = Wire(&long).to_string();
        assert_eq!(
            shown,
            format!("{}…[1000000 bytes in all]", "r".repeat(MAX_WIRE_CHARS))
        );
        assert_eq!(
            Wire(&"r".repeat(MAX_WIRE_CHARS)).to_string().len(),
            MAX_WIRE_CHARS
        );
    }
}
