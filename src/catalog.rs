//! The fault-code catalog: every error and status code in the seed documents, with its message, cause,
//! resolution, class and whether a retry can help, for `GET /api/v1/errors` (search),
//! `GET /api/v1/errors/{code}`, `m2m-listener errors` and for classifying the faults and upload line
//! statuses that callbacks carry.
//!
//! A ThingSpace code is `<ServiceName>.<CLASS>.<Specific>`, and the platform advises matching on
//! the code without the service name: [`Catalog::explain`] finds the catalog entry whatever prefix
//! the code carries, and a code the catalog does not list still gets the guidance of its class
//! ([`CLASS_GUIDANCE`], written from the seeds), marked [`Match::Class`].
//!
//! `catalog/error-catalog.json` is generated from the seeds by `scripts/extract_catalog.py` (which
//! documents how ambiguous seed rows were split and what `class` and `retryable` mean) and embedded at
//! compile time. This module only parses and indexes it.
//!
//! Architecture Invariant: no IO and no panics. A lookup takes any string a caller or the platform
//! sends, and a catalog that failed to parse is empty rather than fatal.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

const EMBEDDED_CATALOG_JSON: &str = include_str!("../catalog/error-catalog.json");

/// The `class` of seed 001 package-level upload errors, which fail a whole upload.
const UPLOAD_PACKAGE_CLASS: &str = "upload_package";

/// When one text is in several sources, the one the listener actually receives wins: upload line
/// statuses first, then ThingSpace faults, then the two secondary catalogs.
const SOURCES_BY_TEXT_PRIORITY: [&str; 4] = [
    "thingspace_upload_devices",
    "thingspace_sync_errors",
    "imiconnect_status",
    "provisioning_api_errors",
];

/// Real codes, even with a service-name prefix, are under 100 bytes. Anything far longer cannot be in
/// the catalog, and refusing it up front bounds the cost of trying every suffix of it.
const LONGEST_CODE_LOOKED_UP: usize = 512;

/// The longest catalog message is a few hundred bytes; a filled placeholder adds a device id or an
/// email address. Longer input cannot match, and refusing it bounds the cost of template matching.
const LONGEST_TEXT_LOOKED_UP: usize = 8 * 1024;

/// A template whose fixed text is shorter than this would match almost anything, so such a message is
/// only ever matched exactly.
const SHORTEST_TEMPLATE_LITERAL_TEXT: usize = 8;

/// One code of the catalog, as `GET /api/v1/errors/{code}` returns it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The code as the platform sends it (`INPUT_INVALID.Device.Kind.Invalid`, `7500`, `S2004`), or a
    /// synthesized one for texts that have no code (`UPLOAD_LINE.ImeiInvalid`). A second message the
    /// seeds list under the same code is a variant, `CODE~TAG`.
    pub code: String,
    /// The text the platform returns with the code (SOAP faultstring, line status, status message),
    /// placeholders such as `(deviceId)` or `{account name}` left in.
    pub message: String,
    /// What the request did to cause it, where the seed says.
    pub cause: Option<String>,
    /// What to change before sending the request again, where known.
    pub resolution: Option<String>,
    /// A small per-source vocabulary (`input_invalid`, `request_failed`, `upload_line`,
    /// `delivery_failed`, ...) so callers can group codes without knowing each one.
    pub class: String,
    /// Whether sending the same request again later can succeed.
    pub retryable: bool,
    /// Which seed document the code comes from (`thingspace_sync_errors`, ...).
    pub source: String,
}

/// How an explanation was found.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Match {
    /// The code is in the catalog (whatever service prefix it carried).
    Exact,
    /// The code is not, but the fault's text (or an upload line status) is a catalog message.
    Text,
    /// Neither is: the guidance of the code's class (`INPUT_INVALID`, `REQUEST_FAILED`, ...).
    Class,
}

/// What the catalog says about a code: an entry, or its class's guidance, and which of the two.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    /// For [`Match::Class`], `code` is the code asked about without its service prefix, and the
    /// texts are the class's.
    #[serde(flatten)]
    pub entry: CatalogEntry,
    #[serde(rename = "match")]
    pub matched: Match,
}

/// What a class of codes means, for a code of that class the catalog does not list.
#[derive(Debug)]
pub struct ClassGuidance {
    /// The leading segment of a code of this class, as the platform spells it.
    pub code_segment: &'static str,
    /// The catalog class it is (the seeds' `INVALID_INPUT` spelling is `input_invalid` too).
    pub class: &'static str,
    pub message: &'static str,
    pub cause: &'static str,
    pub resolution: &'static str,
    pub retryable: bool,
    /// The seed document whose vocabulary the class is.
    pub source: &'static str,
}

/// The classes a code names in its leading segment (after the service name): seed 000's ThingSpace
/// codes, and the `UPLOAD_LINE.` / `UPLOAD_PACKAGE.` codes synthesized from seed 001. Numeric codes
/// (seeds 002 and 003) carry no class, so an unknown one stays unknown. Written from the seeds'
/// messages and resolutions; `retryable` is the class's usual answer (an individual code, such as
/// `REQUEST_FAILED.UnexpectedError`, may differ).
pub const CLASS_GUIDANCE: &[ClassGuidance] = &[
    ClassGuidance {
        code_segment: "INPUT_INVALID",
        class: "input_invalid",
        message: "The platform refused the request: a value in it is missing, empty, too long, \
                  in the wrong format or not one of the allowed values.",
        cause: "A field of the request did not pass the platform's validation (the fault string \
                names it); nothing was changed.",
        resolution: "Fix the field the fault string names and resend the request; sent \
                     unchanged, it fails the same way.",
        retryable: false,
        source: "thingspace_sync_errors",
    },
    ClassGuidance {
        code_segment: "INVALID_INPUT",
        class: "input_invalid",
        message: "The platform refused the request: a value in it is missing, empty, too long, \
                  in the wrong format or not one of the allowed values.",
        cause: "A field of the request did not pass the platform's validation (the fault string \
                names it); nothing was changed.",
        resolution: "Fix the field the fault string names and resend the request; sent \
                     unchanged, it fails the same way.",
        retryable: false,
        source: "thingspace_sync_errors",
    },
    ClassGuidance {
        code_segment: "REQUEST_FAILED",
        class: "request_failed",
        message: "The request was well formed, but the platform could not carry it out.",
        cause: "Something the request names does not exist or does not allow the change: the \
                account, device, service plan, group or request was not found, the device is not \
                in a state that allows it, or the session expired.",
        resolution: "Check the device's current state, service plan and account on the platform \
                     (GetDeviceInformation) and the names in the request, then send a corrected \
                     request. After a session expiry log in again first; an unexpected error may \
                     succeed on a retry, and if it happens twice, contact Customer Support.",
        retryable: false,
        source: "thingspace_sync_errors",
    },
    ClassGuidance {
        code_segment: "INPUT_MISSING",
        class: "input_missing",
        message: "A field the request needs was not in it.",
        cause: "The request lacked a required field (the fault string names it).",
        resolution: "Add the field the fault string names and resend the request.",
        retryable: false,
        source: "thingspace_sync_errors",
    },
    ClassGuidance {
        code_segment: "UPLOAD_LINE",
        class: "upload_line",
        message: "The platform refused one device line of an UploadDevices request; the other \
                  lines are not affected.",
        cause: "The line's identifiers (IMEI, ICCID, EID), service plan or ZIP code are missing, \
                invalid or duplicated; the line status says which.",
        resolution: "Correct the device's values as the line status says and upload that device \
                     again.",
        retryable: false,
        source: "thingspace_upload_devices",
    },
    ClassGuidance {
        code_segment: "UPLOAD_PACKAGE",
        class: "upload_package",
        message: "The platform refused the whole UploadDevices request; none of its devices was \
                  uploaded.",
        cause: "A value of the package (DeviceSku, UploadType, EmailAddress, the device list) is \
                missing or invalid, or the upload has more than 10,000 lines.",
        resolution: "Fix the request as the text says and resubmit the whole upload.",
        retryable: false,
        source: "thingspace_upload_devices",
    },
];

/// What a catalog search keeps: each given filter must hold. `query` is a case-insensitive
/// substring of the code (its error-code part, service prefix removed) or of the message, cause
/// or resolution; `class` and `source` are compared without regard to case.
#[derive(Clone, Copy, Debug, Default)]
pub struct CatalogSearch<'a> {
    pub query: Option<&'a str>,
    pub class: Option<&'a str>,
    pub source: Option<&'a str>,
}

/// The error-code part of `code` and its class: `CarrierService.INPUT_INVALID.Device.Kind.Invalid`
/// gives `INPUT_INVALID.Device.Kind.Invalid` and the `INPUT_INVALID` guidance. The leading
/// `.`- or `:`-separated segments before a class segment (service names, a SOAP QName prefix) are
/// dropped; `None` when no segment names a class.
fn class_of_code(code: &str) -> Option<(&str, &'static ClassGuidance)> {
    let segment_starts = std::iter::once(0).chain(
        code.char_indices()
            .filter(|(_, character)| matches!(character, '.' | ':'))
            .map(|(separator, _)| separator + 1),
    );
    segment_starts
        .filter_map(|start| code.get(start..))
        .find_map(|rest| {
            let segment = rest.split(['.', ':']).next().unwrap_or_default();
            CLASS_GUIDANCE
                .iter()
                .find(|guidance| guidance.code_segment.eq_ignore_ascii_case(segment))
                .map(|guidance| (rest, guidance))
        })
}

impl ClassGuidance {
    /// The guidance as the answer for `code` (the code asked about, its service prefix removed).
    fn explain(&self, code: &str) -> Explanation {
        Explanation {
            entry: CatalogEntry {
                code: code.to_owned(),
                message: self.message.to_owned(),
                cause: Some(self.cause.to_owned()),
                resolution: Some(self.resolution.to_owned()),
                class: self.class.to_owned(),
                retryable: self.retryable,
                source: self.source.to_owned(),
            },
            matched: Match::Class,
        }
    }
}

/// The catalog with its lookup indexes, built once.
pub struct Catalog {
    /// Every entry in file order (by source, then code).
    entries: Vec<CatalogEntry>,
    /// Lower-cased code → position in `entries`.
    by_lowercase_code: HashMap<String, usize>,
    /// Normalized message → positions in `entries`, highest text priority first.
    by_normalized_message: HashMap<String, Vec<usize>>,
    /// Messages with placeholders, highest text priority first.
    message_templates: Vec<(MessageTemplate, usize)>,
    /// Per entry, in `entries` order: its code, and its message, cause and resolution, lower-cased
    /// once so that a search does not lower-case the whole catalog again.
    search_texts: Vec<(String, String)>,
    /// Every class and every source, sorted and unique: what the search filters accept.
    classes: Vec<String>,
    sources: Vec<String>,
}

/// The embedded catalog. If the embedded JSON failed to parse (a build defect), an empty catalog —
/// never a panic.
pub fn catalog() -> &'static Catalog {
    static EMBEDDED_CATALOG: OnceLock<Catalog> = OnceLock::new();
    EMBEDDED_CATALOG.get_or_init(|| Catalog::parse_or_empty(EMBEDDED_CATALOG_JSON))
}

impl Catalog {
    /// An unparsable catalog becomes an empty one: explaining codes is a convenience, and must not
    /// take the listener down. The unit tests make sure the embedded file parses.
    fn parse_or_empty(json: &str) -> Self {
        let entries: Vec<CatalogEntry> = serde_json::from_str(json).unwrap_or_default();
        Self::from_entries(entries)
    }

    fn from_entries(entries: Vec<CatalogEntry>) -> Self {
        let mut by_lowercase_code = HashMap::with_capacity(entries.len());
        for (position, entry) in entries.iter().enumerate() {
            by_lowercase_code
                .entry(entry.code.to_lowercase())
                .or_insert(position);
        }

        let mut by_text_priority: Vec<(usize, &CatalogEntry)> =
            entries.iter().enumerate().collect();
        by_text_priority
            .sort_by_key(|(position, entry)| (text_priority_of_source(&entry.source), *position));
        let mut by_normalized_message: HashMap<String, Vec<usize>> = HashMap::new();
        let mut message_templates = Vec::new();
        for (position, entry) in by_text_priority {
            let normalized_message = normalize_text(&entry.message);
            if let Some(template) = MessageTemplate::parse(&normalized_message) {
                message_templates.push((template, position));
            }
            by_normalized_message
                .entry(normalized_message)
                .or_default()
                .push(position);
        }

        let search_texts = entries
            .iter()
            .map(|entry| {
                let text = [
                    Some(entry.message.as_str()),
                    entry.cause.as_deref(),
                    entry.resolution.as_deref(),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("\n");
                (entry.code.to_lowercase(), text.to_lowercase())
            })
            .collect();
        let sorted_unique = |field: fn(&CatalogEntry) -> &str| {
            let mut values: Vec<String> = entries
                .iter()
                .map(|entry| field(entry).to_owned())
                .collect();
            values.sort();
            values.dedup();
            values
        };
        let classes = sorted_unique(|entry| &entry.class);
        let sources = sorted_unique(|entry| &entry.source);

        Self {
            entries,
            by_lowercase_code,
            by_normalized_message,
            message_templates,
            search_texts,
            classes,
            sources,
        }
    }

    /// By code as it appears in a callback fault or an API path: bare `INPUT_INVALID.Device.Kind.Invalid`,
    /// or prefixed by an M2M service name `CarrierService.INPUT_INVALID.Device.Kind.Invalid`,
    /// `UnifiedWebService.REQUEST_FAILED.UnexpectedError`, also with a SOAP QName prefix like
    /// `s:Client.`: leading `.`- or `:`-separated segments that are not part of a known code are
    /// stripped. Case-insensitive. Numeric codes (`7500`), synthesized upload codes and variants
    /// (`REQUEST_FAILED.UnexpectedError~TriggerIdInvalid`) too. The seed spells two codes
    /// `INVALID_INPUT.*`; either spelling finds them.
    pub fn lookup(&self, code: &str) -> Option<&CatalogEntry> {
        let trimmed = code.trim();
        if trimmed.is_empty() || trimmed.len() > LONGEST_CODE_LOOKED_UP {
            return None;
        }
        let lowercase_code = trimmed.to_lowercase();
        // The longest candidate first, so a known code is never shortened into another known code.
        let candidate_starts = std::iter::once(0).chain(
            lowercase_code
                .char_indices()
                .filter(|(_, character)| matches!(character, '.' | ':'))
                .map(|(separator, _)| separator + 1),
        );
        candidate_starts
            .filter_map(|start| lowercase_code.get(start..))
            .find_map(|candidate| self.position_of_lowercase_code(candidate))
            .and_then(|position| self.entries.get(position))
    }

    fn position_of_lowercase_code(&self, candidate: &str) -> Option<usize> {
        if let Some(&position) = self.by_lowercase_code.get(candidate) {
            return Some(position);
        }
        let other_spelling = if let Some(rest) = candidate.strip_prefix("input_invalid.") {
            format!("invalid_input.{rest}")
        } else if let Some(rest) = candidate.strip_prefix("invalid_input.") {
            format!("input_invalid.{rest}")
        } else {
            return None;
        };
        self.by_lowercase_code.get(&other_spelling).copied()
    }

    /// By message text (upload line statuses and package-level texts from seed 001 arrive as text,
    /// not codes): trimmed, case-insensitive, runs of whitespace and one trailing full stop ignored.
    /// A placeholder in the catalog text — `(deviceId)` or `{account name}` — matches any non-empty
    /// value or the placeholder itself, so "IMEI 12345 is invalid" and "IMEI (deviceId) is invalid"
    /// both find `UPLOAD_LINE.ImeiInvalid`. An exact match wins over a placeholder match.
    pub fn lookup_text(&self, text: &str) -> Option<&CatalogEntry> {
        self.find_by_text(text, |_| true)
    }

    /// Whether this text is a seed 001 package-level upload error (fails the whole upload).
    pub fn is_upload_package_error(&self, text: &str) -> bool {
        self.find_by_text(text, |entry| entry.class == UPLOAD_PACKAGE_CLASS)
            .is_some()
    }

    /// What the catalog says about `code`: its entry ([`Match::Exact`], as [`Self::lookup`]
    /// finds it), else the guidance of the class the code names ([`Match::Class`]); `None` for a
    /// code of no known class.
    pub fn explain(&self, code: &str) -> Option<Explanation> {
        if let Some(entry) = self.lookup(code) {
            return Some(Explanation {
                entry: entry.clone(),
                matched: Match::Exact,
            });
        }
        let trimmed = code.trim();
        if trimmed.len() > LONGEST_CODE_LOOKED_UP {
            return None;
        }
        class_of_code(trimmed).map(|(error_code, guidance)| guidance.explain(error_code))
    }

    /// The explanation of a stored fault, as every API view of an outcome shows it: by code, else
    /// by its text (a message the catalog lists, placeholders filled), else by the code's class.
    pub fn explain_fault(&self, code: Option<&str>, message: Option<&str>) -> Option<Explanation> {
        if let Some(entry) = code.and_then(|code| self.lookup(code)) {
            return Some(Explanation {
                entry: entry.clone(),
                matched: Match::Exact,
            });
        }
        if let Some(entry) = message.and_then(|message| self.lookup_text(message)) {
            return Some(Explanation {
                entry: entry.clone(),
                matched: Match::Text,
            });
        }
        code.and_then(|code| self.explain(code))
    }

    /// The entries `search` keeps, in catalog order, except that the entry the query names as a
    /// code (see [`Self::lookup`]) comes first.
    pub fn search(&self, search: &CatalogSearch<'_>) -> Vec<&CatalogEntry> {
        let query = search
            .query
            .map(str::trim)
            .filter(|query| !query.is_empty());
        if query.is_some_and(|query| query.len() > LONGEST_TEXT_LOOKED_UP) {
            return Vec::new();
        }
        let filters_kept = |entry: &CatalogEntry| {
            search
                .class
                .is_none_or(|class| entry.class.eq_ignore_ascii_case(class.trim()))
                && search
                    .source
                    .is_none_or(|source| entry.source.eq_ignore_ascii_case(source.trim()))
        };
        let named = query
            .and_then(|query| self.lookup(query))
            .filter(|entry| filters_kept(entry));
        let lowercase_query = query.map(str::to_lowercase);
        // The code without its service name, so that `CarrierService.REQUEST_FAILED.ServicePlan`
        // finds the `REQUEST_FAILED.ServicePlan.*` codes.
        let lowercase_code_query = lowercase_query
            .as_deref()
            .map(|query| class_of_code(query).map_or(query, |(error_code, _)| error_code));
        let query_kept =
            |(code, text): &(String, String)| match (&lowercase_query, lowercase_code_query) {
                (Some(query), Some(code_query)) => {
                    code.contains(code_query) || text.contains(query.as_str())
                }
                _ => true,
            };
        let mut found: Vec<&CatalogEntry> = named.into_iter().collect();
        for (entry, texts) in self.entries.iter().zip(&self.search_texts) {
            let already_first = named.is_some_and(|first| std::ptr::eq(first, entry));
            if !already_first && filters_kept(entry) && query_kept(texts) {
                found.push(entry);
            }
        }
        found
    }

    /// The class named `name` (case-insensitive) as the catalog spells it, if any entry has it.
    pub fn class_named(&self, name: &str) -> Option<&str> {
        let name = name.trim();
        self.classes
            .iter()
            .find(|class| class.eq_ignore_ascii_case(name))
            .map(String::as_str)
    }

    /// The source named `name` (case-insensitive) as the catalog spells it, if any entry has it.
    pub fn source_named(&self, name: &str) -> Option<&str> {
        let name = name.trim();
        self.sources
            .iter()
            .find(|source| source.eq_ignore_ascii_case(name))
            .map(String::as_str)
    }

    /// Every class of the catalog, sorted.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Every source of the catalog, sorted.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// Every entry, in catalog order.
    pub fn entries(&self) -> &[CatalogEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find_by_text(
        &self,
        text: &str,
        is_wanted: impl Fn(&CatalogEntry) -> bool,
    ) -> Option<&CatalogEntry> {
        if text.len() > LONGEST_TEXT_LOOKED_UP {
            return None;
        }
        let normalized_text = normalize_text(text);
        if normalized_text.is_empty() {
            return None;
        }
        let exact_match = self
            .by_normalized_message
            .get(&normalized_text)
            .into_iter()
            .flatten()
            .filter_map(|&position| self.entries.get(position))
            .find(|entry| is_wanted(entry));
        exact_match.or_else(|| {
            self.message_templates
                .iter()
                .filter(|(template, _)| template.matches(&normalized_text))
                .filter_map(|&(_, position)| self.entries.get(position))
                .find(|entry| is_wanted(entry))
        })
    }
}

fn text_priority_of_source(source: &str) -> usize {
    SOURCES_BY_TEXT_PRIORITY
        .iter()
        .position(|known| *known == source)
        .unwrap_or(SOURCES_BY_TEXT_PRIORITY.len())
}

/// The form both catalog messages and looked-up texts are compared in: the platform pads values with
/// spaces (seed 001's upload callback does) and is not consistent about case or a final full stop.
fn normalize_text(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let lowercase = collapsed.to_lowercase();
    match lowercase.strip_suffix('.') {
        Some(without_full_stop) => without_full_stop.trim_end().to_owned(),
        None => lowercase,
    }
}

/// A normalized catalog message split at its placeholders: `literal_parts` has one more element than
/// there are placeholders, and each placeholder matches at least one character.
struct MessageTemplate {
    literal_parts: Vec<String>,
}

impl MessageTemplate {
    /// `None` when the message has no placeholder (it is only matched exactly) or too little fixed
    /// text to be a safe pattern.
    fn parse(normalized_message: &str) -> Option<Self> {
        let mut literal_parts = Vec::new();
        let mut literal_start = 0;
        let mut search_from = 0;
        while let Some(offset) = normalized_message.get(search_from..)?.find(['(', '{']) {
            let opening = search_from + offset;
            let placeholder_end = placeholder_length_at(normalized_message.get(opening..)?)
                .map(|length| opening + length);
            match placeholder_end {
                Some(end) => {
                    literal_parts.push(normalized_message.get(literal_start..opening)?.to_owned());
                    literal_start = end;
                    search_from = end;
                }
                None => search_from = opening + 1,
            }
        }
        if literal_parts.is_empty() {
            return None;
        }
        literal_parts.push(normalized_message.get(literal_start..)?.to_owned());
        let literal_text_length: usize = literal_parts.iter().map(String::len).sum();
        (literal_text_length >= SHORTEST_TEMPLATE_LITERAL_TEXT).then_some(Self { literal_parts })
    }

    fn matches(&self, normalized_text: &str) -> bool {
        let Some((first_literal, later_literals)) = self.literal_parts.split_first() else {
            return false;
        };
        let Some((last_literal, middle_literals)) = later_literals.split_last() else {
            return false;
        };
        if !normalized_text.starts_with(first_literal.as_str()) {
            return false;
        }
        // The leftmost occurrence of each middle literal is always a safe choice: it leaves the most
        // text for the literals after it, so this never rejects a text that some split would accept.
        let mut position = first_literal.len();
        for literal in middle_literals {
            let Some(search_start) = position_after_one_character(normalized_text, position) else {
                return false;
            };
            let Some(found) = normalized_text
                .get(search_start..)
                .and_then(|rest| rest.find(literal.as_str()))
            else {
                return false;
            };
            position = search_start + found + literal.len();
        }
        let Some(earliest_last_literal_start) =
            position_after_one_character(normalized_text, position)
        else {
            return false;
        };
        normalized_text.len() >= earliest_last_literal_start + last_literal.len()
            && normalized_text.ends_with(last_literal.as_str())
    }
}

/// The byte length of the placeholder `text` starts with, if it starts with one: `(` + an identifier
/// of two or more letters, digits or underscores + `)` (seed 001: `(deviceId)`, but not the `(s)` of
/// "identifier(s)"), or `{` + anything without braces + `}` (seed 000: `{account name}`).
fn placeholder_length_at(text: &str) -> Option<usize> {
    if let Some(after_opening) = text.strip_prefix('(') {
        let closing = after_opening.find(')')?;
        let name = after_opening.get(..closing)?;
        let starts_with_letter = name.chars().next().is_some_and(char::is_alphabetic);
        let is_identifier = name
            .chars()
            .all(|character| character.is_alphanumeric() || character == '_');
        (name.chars().count() >= 2 && starts_with_letter && is_identifier).then_some(closing + 2)
    } else if let Some(after_opening) = text.strip_prefix('{') {
        let closing = after_opening.find('}')?;
        let name = after_opening.get(..closing)?;
        (!name.is_empty() && !name.contains('{')).then_some(closing + 2)
    } else {
        None
    }
}

/// The position just after the character at `position`, or `None` at the end of the text: a
/// placeholder must take at least one whole character, and byte arithmetic alone could land inside one.
fn position_after_one_character(text: &str, position: usize) -> Option<usize> {
    let character = text.get(position..)?.chars().next()?;
    Some(position + character.len_utf8())
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    /// What `scripts/extract_catalog.py` printed when it wrote the embedded file.
    const EXPECTED_ENTRIES_PER_SOURCE: [(&str, usize); 4] = [
        ("thingspace_sync_errors", 154),
        ("thingspace_upload_devices", 30),
        ("imiconnect_status", 201),
        ("provisioning_api_errors", 56),
    ];

    fn code_of(entry: Option<&CatalogEntry>) -> Option<&str> {
        entry.map(|entry| entry.code.as_str())
    }

    #[test]
    fn the_embedded_catalog_parses_with_the_counts_the_extraction_script_printed() {
        let entries: Vec<CatalogEntry> =
            serde_json::from_str(EMBEDDED_CATALOG_JSON).expect("embedded catalog must parse");
        let mut entries_per_source: HashMap<&str, usize> = HashMap::new();
        for entry in &entries {
            *entries_per_source.entry(entry.source.as_str()).or_default() += 1;
        }
        let expected: HashMap<&str, usize> = EXPECTED_ENTRIES_PER_SOURCE.into_iter().collect();
        assert_eq!(entries_per_source, expected);
        assert_eq!(catalog().len(), 441);
        assert!(!catalog().is_empty());
    }

    #[test]
    fn every_entry_has_a_code_message_class_and_source_and_codes_are_unique() {
        let entries: Vec<CatalogEntry> =
            serde_json::from_str(EMBEDDED_CATALOG_JSON).expect("embedded catalog must parse");
        let mut seen_codes = HashSet::new();
        for entry in &entries {
            assert!(!entry.code.trim().is_empty(), "{entry:?}");
            assert!(!entry.message.trim().is_empty(), "{entry:?}");
            assert!(!entry.class.trim().is_empty(), "{entry:?}");
            assert!(!entry.source.trim().is_empty(), "{entry:?}");
            // Lookups are case-insensitive, so uniqueness must be too.
            assert!(
                seen_codes.insert(entry.code.to_lowercase()),
                "duplicate code {}",
                entry.code
            );
            // Every code must find itself (no code is shadowed by another one's index entry).
            assert_eq!(
                code_of(catalog().lookup(&entry.code)),
                Some(entry.code.as_str())
            );
        }
    }

    #[test]
    fn device_state_invalid_is_found_with_a_message_and_a_resolution() {
        let entry = catalog()
            .lookup("INPUT_INVALID.DeviceState.Invalid")
            .expect("INPUT_INVALID.DeviceState.Invalid is in seed 000");
        assert_eq!(
            entry.message,
            "The given device state is invalid, valid State values are Active, Active.Ready and Active.Test"
        );
        assert!(
            entry
                .resolution
                .as_deref()
                .is_some_and(|text| !text.is_empty())
        );
        assert_eq!(entry.class, "input_invalid");
        assert!(!entry.retryable);
        assert_eq!(entry.source, "thingspace_sync_errors");
    }

    #[test]
    fn a_seed_000_row_is_split_into_message_cause_and_resolution() {
        let entry = catalog()
            .lookup("INPUT_INVALID.Device.Kind.Invalid")
            .expect("in seed 000");
        assert_eq!(
            entry.message,
            "The device kind was not recognized as valid. Valid ones are ICCID, MEID, IMSI, MDN, IMEI, MSISDN, or ESN."
        );
        assert_eq!(
            entry.cause.as_deref(),
            Some("The \"Kind\" field for DeviceIdentifier did not contain a recognized value.")
        );
        assert_eq!(
            entry.resolution.as_deref(),
            Some("Retry the request with \"Kind\" set to one of the valid values.")
        );
    }

    #[test]
    fn codes_prefixed_by_a_service_name_or_a_soap_qname_resolve() {
        let catalog = catalog();
        for (sent, expected) in [
            (
                "CarrierService.INPUT_INVALID.Device.Kind.Invalid",
                "INPUT_INVALID.Device.Kind.Invalid",
            ),
            (
                "UnifiedWebService.REQUEST_FAILED.UnexpectedError",
                "REQUEST_FAILED.UnexpectedError",
            ),
            (
                "s:Client.INPUT_INVALID.DeviceState.Invalid",
                "INPUT_INVALID.DeviceState.Invalid",
            ),
            (
                "s:Client.CarrierService.REQUEST_FAILED.SessionToken.Expired",
                "REQUEST_FAILED.SessionToken.Expired",
            ),
            (
                "  carrierservice.input_invalid.device.kind.invalid  ",
                "INPUT_INVALID.Device.Kind.Invalid",
            ),
            (
                "CarrierService.DeserializationFailed",
                "DeserializationFailed",
            ),
        ] {
            assert_eq!(code_of(catalog.lookup(sent)), Some(expected), "{sent}");
        }
    }

    #[test]
    fn numeric_synthesized_and_variant_codes_resolve() {
        let catalog = catalog();
        let delivered = catalog.lookup("7500").expect("7500 is in seed 002");
        assert_eq!(delivered.message, "Delivered");
        assert_eq!(delivered.class, "delivered");
        assert_eq!(
            catalog.lookup("7501").map(|entry| entry.message.as_str()),
            Some("Submitted")
        );
        assert!(catalog.lookup("7201").is_some_and(|entry| entry.retryable));
        assert!(catalog.lookup("7203").is_some_and(|entry| !entry.retryable));
        assert_eq!(code_of(catalog.lookup("s2004")), Some("S2004"));
        assert_eq!(
            code_of(catalog.lookup("upload_line.imeiinvalid")),
            Some("UPLOAD_LINE.ImeiInvalid")
        );
        // The bare code is the general row; the trigger rows that reuse it are variants.
        let unexpected = catalog
            .lookup("REQUEST_FAILED.UnexpectedError")
            .expect("in seed 000");
        assert!(unexpected.retryable);
        assert!(unexpected.message.starts_with("Unexpected error occurred."));
        assert_eq!(
            code_of(
                catalog.lookup("UnifiedWebService.REQUEST_FAILED.UnexpectedError~TriggerIdInvalid")
            ),
            Some("REQUEST_FAILED.UnexpectedError~TriggerIdInvalid")
        );
    }

    #[test]
    fn both_spellings_of_the_seeds_invalid_input_codes_resolve() {
        let catalog = catalog();
        for sent in [
            "INVALID_INPUT.NPANXXRequiredForB2B",
            "INPUT_INVALID.NPANXXRequiredForB2B",
            "CarrierService.INPUT_INVALID.NPANXXRequiredForB2B",
        ] {
            assert_eq!(
                code_of(catalog.lookup(sent)),
                Some("INVALID_INPUT.NPANXXRequiredForB2B"),
                "{sent}"
            );
        }
    }

    #[test]
    fn an_unknown_code_returns_none() {
        let catalog = catalog();
        for sent in [
            "INPUT_INVALID.No.Such.Code",
            "CarrierService.REQUEST_FAILED.Nope",
            "9999",
            "CarrierService.",
            "",
            "   ",
            ".",
            "~",
        ] {
            assert_eq!(code_of(catalog.lookup(sent)), None, "{sent:?}");
        }
    }

    #[test]
    fn upload_line_texts_resolve_with_placeholders_filled_or_not() {
        let catalog = catalog();
        for (sent, expected) in [
            ("IMEI 12345 is invalid", "UPLOAD_LINE.ImeiInvalid"),
            ("IMEI (deviceId) is invalid", "UPLOAD_LINE.ImeiInvalid"),
            (
                "  imei   990000862471854 IS INVALID.  ",
                "UPLOAD_LINE.ImeiInvalid",
            ),
            (
                "IMEI 990000862471854 not provided",
                "UPLOAD_LINE.ImeiNotProvided",
            ),
            (
                "Duplicate Device ID 990000862471854 found in the request",
                "UPLOAD_LINE.DuplicateDeviceId",
            ),
            (
                "SIM Id 89148000000800000000 is invalid",
                "UPLOAD_LINE.SimIdInvalid",
            ),
            (
                "EID 89049032000000000000000000000000 not provided",
                "UPLOAD_LINE.EidNotProvided",
            ),
            (
                "Device upload request submitted",
                "UPLOAD_LINE.DeviceUploadRequestSubmitted",
            ),
            (
                "Device upload successful",
                "UPLOAD_LINE.DeviceUploadSuccessful",
            ),
            // Exactly as the upload callback example in seed 001 sends it, trailing space included.
            (
                "Line has been uploaded successfully ",
                "UPLOAD_LINE.LineUploadedSuccessfully",
            ),
            (
                "No Profile found for email address ops@example.com",
                "UPLOAD_PACKAGE.NoProfileForEmailAddress",
            ),
            // A ThingSpace faultstring with its {placeholder} filled in.
            (
                "Could not find device \"IMEI 990000862471854\".",
                "REQUEST_FAILED.DeviceNotFound",
            ),
        ] {
            assert_eq!(
                code_of(catalog.lookup_text(sent)),
                Some(expected),
                "{sent:?}"
            );
        }
        assert!(
            catalog
                .lookup_text("Device upload successful")
                .is_some_and(|entry| !entry.retryable && entry.class == "upload_line")
        );
        assert_eq!(code_of(catalog.lookup_text("IMEI is invalid")), None);
        assert_eq!(
            code_of(catalog.lookup_text("Nothing like any catalog text")),
            None
        );
    }

    #[test]
    fn package_level_upload_errors_are_told_apart_from_line_statuses() {
        let catalog = catalog();
        assert!(catalog.is_upload_package_error("Device SKU is not Certified"));
        assert!(catalog.is_upload_package_error(" device sku is not certified "));
        assert!(catalog.is_upload_package_error("Device SKU ABC-123 not provided"));
        assert!(catalog.is_upload_package_error("Processing failed due to an unknown error"));
        assert!(!catalog.is_upload_package_error("Device upload successful"));
        assert!(!catalog.is_upload_package_error("IMEI 12345 is invalid"));
        assert!(!catalog.is_upload_package_error(""));
    }

    #[test]
    fn lookups_never_panic_on_odd_input() {
        let catalog = catalog();
        let very_long_code = "CarrierService.".repeat(100_000);
        let very_long_text = "IMEI (".repeat(100_000);
        let just_under_the_text_limit = format!("IMEI {} is invalid", "é".repeat(4_000));
        for sent in [
            "",
            " ",
            ".",
            "..",
            ":",
            "(",
            "((((",
            "{",
            "{}",
            "()",
            "é",
            "İİİ.ÅÄÖ",
            "日本語.コード",
            "IMEI é is invalid",
            "IMEI (é) is invalid",
            "\u{0}\u{feff}",
            very_long_code.as_str(),
            very_long_text.as_str(),
            just_under_the_text_limit.as_str(),
        ] {
            let _ = catalog.lookup(sent);
            let _ = catalog.lookup_text(sent);
            let _ = catalog.is_upload_package_error(sent);
        }
        assert_eq!(
            code_of(catalog.lookup_text("IMEI é is invalid")),
            Some("UPLOAD_LINE.ImeiInvalid")
        );
        assert_eq!(
            code_of(catalog.lookup_text(&just_under_the_text_limit)),
            Some("UPLOAD_LINE.ImeiInvalid")
        );
    }

    #[test]
    fn an_unparsable_catalog_is_empty_rather_than_a_panic() {
        let broken = Catalog::parse_or_empty("[{\"code\": ");
        assert!(broken.is_empty());
        assert_eq!(broken.len(), 0);
        assert!(broken.lookup("7500").is_none());
        assert!(broken.lookup_text("Device SKU is not Certified").is_none());
        assert!(!broken.is_upload_package_error("Device SKU is not Certified"));
    }

    #[test]
    fn templates_need_each_placeholder_filled_and_the_fixed_text_in_order() {
        let template = MessageTemplate::parse(&normalize_text(
            "Could not find device \"{kind} {identifier}\".",
        ))
        .expect("has placeholders");
        assert!(template.matches("could not find device \"imei 1\""));
        assert!(template.matches("could not find device \"{kind} {identifier}\""));
        assert!(!template.matches("could not find device \"imei\""));
        assert!(!template.matches("could not find device \" \""));
        assert!(!template.matches("could not find device"));
        assert!(MessageTemplate::parse("invalid device identifier(s) present").is_none());
        assert!(MessageTemplate::parse("({a})").is_none());
    }

    fn search_codes(search: CatalogSearch<'_>) -> Vec<&'static str> {
        catalog()
            .search(&search)
            .into_iter()
            .map(|entry| entry.code.as_str())
            .collect()
    }

    #[test]
    fn explain_finds_a_listed_code_whatever_its_service_prefix_as_an_exact_match() {
        for code in [
            "REQUEST_FAILED.ServicePlan.NotFound",
            "CarrierService.REQUEST_FAILED.ServicePlan.NotFound",
            "s:Client.carrierservice.request_failed.serviceplan.notfound",
        ] {
            let explained = catalog().explain(code).expect(code);
            assert_eq!(explained.matched, Match::Exact, "{code}");
            assert_eq!(explained.entry.code, "REQUEST_FAILED.ServicePlan.NotFound");
        }
    }

    #[test]
    fn an_unlisted_code_of_a_known_class_gets_the_class_guidance() {
        let cases = [
            (
                "CarrierService.INPUT_INVALID.Something.New",
                "INPUT_INVALID.Something.New",
                "input_invalid",
            ),
            (
                "UnifiedWebService.REQUEST_FAILED.DeviceAlreadyActive",
                "REQUEST_FAILED.DeviceAlreadyActive",
                "request_failed",
            ),
            ("INVALID_INPUT.Foo", "INVALID_INPUT.Foo", "input_invalid"),
            (
                "s:Client.INPUT_MISSING.Bar",
                "INPUT_MISSING.Bar",
                "input_missing",
            ),
            ("UPLOAD_LINE.Unheard", "UPLOAD_LINE.Unheard", "upload_line"),
            ("request_failed", "request_failed", "request_failed"),
        ];
        for (asked, code, class) in cases {
            let explained = catalog().explain(asked).expect(asked);
            assert_eq!(explained.matched, Match::Class, "{asked}");
            assert_eq!(explained.entry.code, code, "{asked}");
            assert_eq!(explained.entry.class, class, "{asked}");
            assert!(explained.entry.resolution.is_some(), "{asked}");
            assert!(
                catalog().classes().contains(&explained.entry.class),
                "{asked}"
            );
            assert!(
                catalog().sources().contains(&explained.entry.source),
                "{asked}"
            );
        }
        for unknown in [
            "Completely.Unknown",
            "7999",
            "",
            "CarrierService.",
            "INPUT_INVALIDX.A",
        ] {
            assert_eq!(catalog().explain(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn a_fault_is_explained_by_code_then_text_then_class() {
        let by_code = catalog()
            .explain_fault(
                Some("CarrierService.INPUT_INVALID.DeviceState.Invalid"),
                Some("x"),
            )
            .unwrap();
        let by_text = catalog()
            .explain_fault(Some("E1"), Some("IMEI 12345 is invalid"))
            .unwrap();
        let by_class = catalog()
            .explain_fault(
                Some("CarrierService.REQUEST_FAILED.New"),
                Some("not listed"),
            )
            .unwrap();
        assert_eq!(
            (by_code.matched, by_code.entry.code.as_str()),
            (Match::Exact, "INPUT_INVALID.DeviceState.Invalid")
        );
        assert_eq!(
            (by_text.matched, by_text.entry.code.as_str()),
            (Match::Text, "UPLOAD_LINE.ImeiInvalid")
        );
        assert_eq!(by_class.matched, Match::Class);
        assert_eq!(
            catalog().explain_fault(Some("E1"), Some("nothing known")),
            None
        );
        assert_eq!(catalog().explain_fault(None, None), None);
    }

    #[test]
    fn the_explanation_serializes_flat_with_its_match() {
        let explained = catalog().explain("REQUEST_FAILED.New").unwrap();
        let value = serde_json::to_value(&explained).unwrap();
        assert_eq!(value["match"], "class");
        assert_eq!(value["code"], "REQUEST_FAILED.New");
        for field in [
            "message",
            "cause",
            "resolution",
            "class",
            "retryable",
            "source",
        ] {
            assert!(value.get(field).is_some(), "{field} in {value}");
        }
    }

    #[test]
    fn a_search_without_filters_is_the_whole_catalog() {
        assert_eq!(
            catalog().search(&CatalogSearch::default()).len(),
            catalog().len()
        );
        assert_eq!(
            catalog()
                .search(&CatalogSearch {
                    query: Some("   "),
                    ..CatalogSearch::default()
                })
                .len(),
            catalog().len()
        );
    }

    #[test]
    fn a_search_matches_the_code_without_its_service_prefix_or_the_texts() {
        let prefixed = search_codes(CatalogSearch {
            query: Some("CarrierService.REQUEST_FAILED.ServicePlan.NotFound"),
            ..CatalogSearch::default()
        });
        assert_eq!(prefixed, ["REQUEST_FAILED.ServicePlan.NotFound"]);
        let partial = search_codes(CatalogSearch {
            query: Some("carrierservice.request_failed.sessiontoken"),
            ..CatalogSearch::default()
        });
        assert_eq!(
            partial,
            [
                "REQUEST_FAILED.SessionToken.Expired",
                "REQUEST_FAILED.SessionToken.Format"
            ]
        );
        let by_text = search_codes(CatalogSearch {
            query: Some("SESSION HAS EXPIRED"),
            ..CatalogSearch::default()
        });
        assert_eq!(by_text, ["REQUEST_FAILED.SessionToken.Expired"]);
        // The code the query names exactly comes first, even where catalog order differs.
        let named_first = search_codes(CatalogSearch {
            query: Some("7003"),
            ..CatalogSearch::default()
        });
        assert_eq!(named_first.first(), Some(&"7003"));
    }

    #[test]
    fn class_and_source_filters_are_case_insensitive_and_combine_with_the_query() {
        let request_failed = catalog().search(&CatalogSearch {
            class: Some("REQUEST_FAILED"),
            ..CatalogSearch::default()
        });
        assert_eq!(request_failed.len(), 28);
        let kinds = catalog().search(&CatalogSearch {
            query: Some("kind"),
            class: Some("input_invalid"),
            source: Some("THINGSPACE_SYNC_ERRORS"),
        });
        assert!(!kinds.is_empty());
        assert!(kinds.iter().all(|entry| entry.class == "input_invalid"));
        let nothing = catalog().search(&CatalogSearch {
            query: Some("INPUT_INVALID.Device.Kind.Invalid"),
            class: Some("request_failed"),
            ..CatalogSearch::default()
        });
        assert!(nothing.is_empty());
        assert_eq!(
            catalog().class_named("Input_Invalid"),
            Some("input_invalid")
        );
        assert_eq!(catalog().class_named("nope"), None);
        assert_eq!(
            catalog().source_named("imiconnect_STATUS"),
            Some("imiconnect_status")
        );
    }

    #[test]
    fn searches_and_explanations_never_panic_on_odd_input() {
        let long = "a.".repeat(10_000);
        for odd in [
            "",
            ".",
            ":",
            "..::..",
            "漢字.INPUT_INVALID.é",
            "\u{0}",
            "~",
            long.as_str(),
            "INPUT_INVALID.",
            "ä:REQUEST_FAILED",
        ] {
            let _ = catalog().explain(odd);
            let _ = catalog().explain_fault(Some(odd), Some(odd));
            let _ = catalog().search(&CatalogSearch {
                query: Some(odd),
                class: Some(odd),
                source: Some(odd),
            });
        }
    }

    #[test]
    fn every_class_guidance_names_a_class_and_source_of_the_catalog() {
        for guidance in CLASS_GUIDANCE {
            assert!(
                catalog()
                    .classes()
                    .iter()
                    .any(|class| class == guidance.class),
                "{}",
                guidance.class
            );
            assert!(
                catalog()
                    .sources()
                    .iter()
                    .any(|source| source == guidance.source),
                "{}",
                guidance.source
            );
        }
    }
}
