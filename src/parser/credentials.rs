//! The callback's own credentials, found before the body is parsed: a wrong or missing password is
//! refused after one linear pass that builds nothing, whatever the rest of the body holds.
//!
//! - XML: a streaming read (no tree) up to the first `CallbackRequest`/`SmsCallbackRequest`
//!   element and its direct `Username` and `Password` children; it stops as soon as both are read.
//!   An element that is absent counts as empty, as the full parse treats it.
//! - JSON: one pass over the document that keeps only the top-level `username` and `password`
//!   (keys matched ignoring ASCII case) and skips every other value without building it; it
//!   stops once both were read in their usual spelling.
//!
//! A body that is not well-formed up to that point falls back to the lenient scan the quarantine
//! uses (both values must be found), so a broken body with valid credentials is still kept.

use std::fmt;

use quick_xml::Reader;
use quick_xml::events::Event;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::domain::Secret;

/// The credentials a callback presents.
pub struct Presented {
    pub username: String,
    pub password: Secret,
}

/// The callback's credentials, or `None` when the body carries none to check (not a callback).
pub fn credentials(body: &[u8]) -> Option<Presented> {
    let presented = if super::looks_like_json(body) {
        json_credentials(body).or_else(|| {
            let text = String::from_utf8_lossy(body);
            lenient(
                super::json::scan_string(&text, "username"),
                super::json::scan_string(&text, "password"),
            )
        })
    } else {
        xml_credentials(body).or_else(|| {
            let text = String::from_utf8_lossy(body);
            lenient(
                super::scan_element(&text, "Username"),
                super::scan_element(&text, "Password"),
            )
        })
    };
    presented.map(|(username, password)| Presented {
        username,
        password: Secret::new(password),
    })
}

fn lenient(username: Option<String>, password: Option<String>) -> Option<(String, String)> {
    Some((username?, password?))
}

/// What the streaming read found; `None` when the body is not well-formed XML up to the
/// credentials, or holds no callback element.
fn xml_credentials(body: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(body).ok()?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = Reader::from_str(text);
    // Depth of the open element; the callback element's depth once it is found.
    let mut depth = 0usize;
    let mut callback_depth: Option<usize> = None;
    // Which credential the open element is (only directly inside the callback element).
    let mut reading: Option<Credential> = None;
    let (mut username, mut password): (Option<String>, Option<String>) = (None, None);
    loop {
        match reader.read_event().ok()? {
            Event::Start(start) => {
                depth += 1;
                if depth > super::tree::MAX_DEPTH {
                    return None;
                }
                let name = start.local_name();
                match callback_depth {
                    None if is_callback(name.as_ref()) => callback_depth = Some(depth),
                    // Text of an element nested in a credential is not the credential's.
                    Some(at) if depth > at + 1 => reading = None,
                    Some(at) if depth == at + 1 => {
                        reading = Credential::named(name.as_ref());
                        let nil = is_nil(&start);
                        match reading {
                            Some(Credential::Username) if username.is_none() => {
                                username = Some(String::new());
                                if nil {
                                    reading = None;
                                }
                            }
                            Some(Credential::Password) if password.is_none() => {
                                password = Some(String::new());
                                if nil {
                                    reading = None;
                                }
                            }
                            // A second Username: the full parse reads the first.
                            _ => reading = None,
                        }
                    }
                    _ => {}
                }
            }
            Event::Empty(start) => {
                if callback_depth.is_none() && is_callback(start.local_name().as_ref()) {
                    // `<CallbackRequest/>`: a callback without credentials.
                    return Some((String::new(), String::new()));
                }
                if callback_depth.is_some_and(|at| depth == at) {
                    match Credential::named(start.local_name().as_ref()) {
                        Some(Credential::Username) => {
                            username.get_or_insert_with(String::new);
                        }
                        Some(Credential::Password) => {
                            password.get_or_insert_with(String::new);
                        }
                        None => {}
                    }
                }
            }
            Event::End(_) => {
                if reading.take().is_some() && username.is_some() && password.is_some() {
                    break;
                }
                if callback_depth == Some(depth) {
                    break; // the callback element ends: an absent credential is empty
                }
                depth = depth.checked_sub(1)?;
            }
            Event::Text(content) => {
                if let Some(value) =
                    reading.and_then(|which| which.value(&mut username, &mut password))
                {
                    value.push_str(&content.xml10_content());
                }
            }
            Event::CData(content) => {
                if let Some(value) =
                    reading.and_then(|which| which.value(&mut username, &mut password))
                {
                    value.push_str(&content.xml10_content());
                }
            }
            Event::GeneralRef(reference) => {
                if let Some(value) =
                    reading.and_then(|which| which.value(&mut username, &mut password))
                {
                    let character = match reference.resolve_char_ref().ok()? {
                        Some(character) => character,
                        None => predefined_entity(&reference.xml10_content())?,
                    };
                    value.push(character);
                }
            }
            // The full parse refuses a DTD; the lenient scan decides, as it does there.
            Event::DocType(_) => return None,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => {
                callback_depth?;
                break;
            }
        }
    }
    Some((
        username
            .map(|value| value.trim().to_owned())
            .unwrap_or_default(),
        password
            .map(|value| value.trim().to_owned())
            .unwrap_or_default(),
    ))
}

#[derive(Clone, Copy)]
enum Credential {
    Username,
    Password,
}

impl Credential {
    fn named(local_name: &str) -> Option<Self> {
        match local_name {
            "Username" => Some(Self::Username),
            "Password" => Some(Self::Password),
            _ => None,
        }
    }

    fn value<'a>(
        self,
        username: &'a mut Option<String>,
        password: &'a mut Option<String>,
    ) -> Option<&'a mut String> {
        match self {
            Self::Username => username.as_mut(),
            Self::Password => password.as_mut(),
        }
    }
}

fn is_callback(local_name: &str) -> bool {
    local_name == "CallbackRequest" || local_name == "SmsCallbackRequest"
}

fn is_nil(start: &quick_xml::events::BytesStart<'_>) -> bool {
    start.attributes().flatten().any(|attribute| {
        attribute.key.local_name().as_ref() == "nil"
            && matches!(attribute.value.trim(), "true" | "1")
    })
}

fn predefined_entity(name: &str) -> Option<char> {
    match name {
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        _ => None,
    }
}

/// The top-level `username` and `password` of a JSON object, absent ones empty; `None` when the
/// body is not a well-formed JSON object. The read stops once both keys were seen as spelled.
fn json_credentials(body: &[u8]) -> Option<(String, String)> {
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let mut found = TopLevelCredentials::default();
    let read = deserializer.deserialize_map(TopLevel(&mut found));
    let complete = match read {
        Ok(()) => deserializer.end().is_ok(),
        Err(_) => found.username.exact.is_some() && found.password.exact.is_some(),
    };
    complete.then(|| (found.username.read(), found.password.read()))
}

#[derive(Default)]
struct TopLevelCredentials {
    username: Key,
    password: Key,
}

/// One key as the full parse reads it (`field` in `json.rs`): the exact spelling when present
/// (even as `null`), else a spelling in another case.
#[derive(Default)]
struct Key {
    exact: Option<Option<String>>,
    other_case: Option<String>,
}

impl Key {
    fn read(self) -> String {
        match self.exact {
            Some(value) => value.unwrap_or_default(),
            None => self.other_case.unwrap_or_default(),
        }
    }
}

/// Fills in what it finds; ends the read early (with an error the caller recognises by what was
/// found) once both keys were seen in their exact spelling.
struct TopLevel<'a>(&'a mut TopLevelCredentials);

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let found = self.0;
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let key = if name.eq_ignore_ascii_case("username") {
                &mut found.username
            } else if name.eq_ignore_ascii_case("password") {
                &mut found.password
            } else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let value = map.next_value::<ScalarText>()?.0;
            if name == "username" || name == "password" {
                key.exact = Some(value);
                if found.username.exact.is_some() && found.password.exact.is_some() {
                    return Err(de::Error::custom("both credentials read"));
                }
            } else if key.other_case.is_none() {
                key.other_case = value;
            }
        }
        Ok(())
    }
}

/// A scalar as the full parse reads it (`text_of` in `json.rs`): strings trimmed, numbers and
/// booleans as written, anything else (null, arrays, objects) absent.
struct ScalarText(Option<String>);

impl<'de> de::Deserialize<'de> for ScalarText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = ScalarText;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<ScalarText, E> {
                Ok(ScalarText(Some(value.trim().to_owned())))
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<ScalarText, E> {
                Ok(ScalarText(Some(value.to_string())))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<ScalarText, E> {
                Ok(ScalarText(Some(value.to_string())))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<ScalarText, E> {
                Ok(ScalarText(Some(value.to_string())))
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<ScalarText, E> {
                Ok(ScalarText(
                    serde_json::Number::from_f64(value).map(|n| n.to_string()),
                ))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ScalarText, E> {
                Ok(ScalarText(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<ScalarText, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ScalarText(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ScalarText, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ScalarText(None))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
    }

    fn pair(body: &[u8]) -> Option<(String, String)> {
        credentials(body).map(|found| (found.username, found.password.expose().to_owned()))
    }

    fn owned(username: &str, password: &str) -> Option<(String, String)> {
        Some((username.to_owned(), password.to_owned()))
    }

    #[test]
    fn every_fixture_presents_what_its_callback_element_holds() {
        assert_eq!(pair(&fixture("upload_seed001.xml")), owned("test", "test"));
        // Seed 004: empty elements, and a DeviceCredential pair further down that is not ours.
        assert_eq!(pair(&fixture("activate_seed004.xml")), owned("", ""));
        assert_eq!(
            pair(&fixture("deactivate_bare.xml")).map(|p| p.0),
            Some("fleet-ops".to_owned())
        );
        assert_eq!(pair(&fixture("json_change_identifier.json")), owned("", ""));
        // Broken bodies: the lenient scan, as for quarantine.
        assert_eq!(
            pair(&fixture("activate_seed004_malformed.xml")),
            owned("", "")
        );
        assert_eq!(pair(&fixture("json_malformed.json")), owned("", ""));
    }

    #[test]
    fn values_are_unescaped_trimmed_and_absent_ones_empty() {
        let body = b"<s:Envelope xmlns:s='x'><s:Body><CallbackRequest><a:Username xmlns:a='y'> ops &amp; co&#33; </a:Username><Other><Password>not-this</Password></Other></CallbackRequest></s:Body></s:Envelope>";
        assert_eq!(pair(body), owned("ops & co!", ""));
        let nil = b"<CallbackRequest><Username xsi:nil=\"true\" xmlns:xsi=\"x\"></Username><Password><![CDATA[ p<w ]]></Password></CallbackRequest>";
        assert_eq!(pair(nil), owned("", "p<w"));
        assert_eq!(pair(b"<CallbackRequest/>"), owned("", ""));
    }

    #[test]
    fn json_keys_match_in_any_case_at_the_top_level_only() {
        let body = br#"{"deviceResponse": {"username": "device", "password": "device"},
                        "UserName": "ops", "password": 1234, "deviceIds": [[[{}]]]}"#;
        assert_eq!(pair(body), owned("ops", "1234"));
        assert_eq!(pair(br#"{"requestId": "r"}"#), owned("", ""));
    }

    #[test]
    fn garbage_presents_nothing() {
        for garbage in [
            &b"hello world"[..],
            b"\xff\xfe\x00garbage",
            b"{\"json\": true",
            b"<html><body>hi</body></html>",
        ] {
            assert!(credentials(garbage).is_none(), "{garbage:?}");
        }
    }

    #[test]
    fn the_read_stops_at_the_credentials() {
        // Everything after the credentials is never looked at: not even its well-formedness.
        let body = b"<CallbackRequest><Username>u</Username><Password>p</Password><Data><<<<";
        assert_eq!(pair(body), owned("u", "p"));
        let json = br#"{"username": "u", "password": "p", "deviceIds": [[[[[ broken"#;
        assert_eq!(pair(json), owned("u", "p"));
    }
}
