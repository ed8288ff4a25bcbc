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
/// bare), every value escaped and cut on its way to the line.
fn escaping_fields() -> impl for<'writer> tracing_subscriber::fmt::FormatFields<'writer> + 'static {
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        if field.name() != "message" {
            write!(writer, "{}=", field.name())?;
        }
        let mut escaping = EscapingWriter {
            inner: writer,
            limit: MAX_FIELD_CHARS,
            written: 0,
            total_bytes: 0,
        };
        write!(escaping, "{value:?}")?;
        escaping.finish()
    })
    .delimited(" ")
}

/// Writes what it is given with [`needs_escape`] characters escaped, up to `limit` bytes of it
/// (characters, for the ASCII of RequestIds); [`EscapingWriter::finish`] then says how long the
/// whole was.
struct EscapingWriter<'a, W: fmt::Write + ?Sized> {
    inner: &'a mut W,
    limit: usize,
    written: usize,
    total_bytes: usize,
}

impl<W: fmt::Write + ?Sized> fmt::Write for EscapingWriter<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        self.total_bytes += text.len();
        if self.written >= self.limit {
            return Ok(());
        }
        // The usual piece: nothing to escape and room for all of it.
        if text.len() <= self.limit - self.written && !text.chars().any(needs_escape) {
            self.written += text.len();
            return self.inner.write_str(text);
        }
        for character in text.chars() {
            if self.written + character.len_utf8() > self.limit {
                self.written = self.limit;
                break;
            }
            self.written += character.len_utf8();
            if needs_escape(character) {
                write!(self.inner, "{}", character.escape_default())?;
            } else {
                self.inner.write_char(character)?;
            }
        }
        Ok(())
    }
}

impl<W: fmt::Write + ?Sized> EscapingWriter<'_, W> {
    fn finish(self) -> fmt::Result {
        if self.written >= self.limit && self.total_bytes > self.written {
            write!(self.inner, "…[{} bytes in all]", self.total_bytes)?;
        }
        Ok(())
    }
}

/// A value from the wire as a log field: control characters (and the Unicode characters that
/// reorder or break lines) escaped, cut to [`MAX_WIRE_CHARS`] characters with the full length.
pub struct Wire<'a>(pub &'a str);

impl fmt::Display for Wire<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut escaping = EscapingWriter {
            inner: formatter,
            limit: MAX_WIRE_CHARS,
            written: 0,
            total_bytes: 0,
        };
        escaping.write_str(self.0)?;
        escaping.finish()
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
