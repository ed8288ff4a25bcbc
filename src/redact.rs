//! Secrets masked out of a stored callback body, for `GET /api/v1/deliveries/{id}/raw`.
//!
//! Pure: bytes in, bytes out, no IO. The bodies that operators read raw are above all the
//! quarantined ones, which are malformed, truncated or not even UTF-8, so this is not a parser
//! but a lenient byte scan that finds what the parser, strict or lenient, could have taken for a
//! secret, and over-masks rather than misses. Every step moves forward through the body (searches
//! that come back empty are remembered), so a body of any shape is masked in time linear in its
//! length.
//!
//! What is masked:
//! - XML: the content of every element whose local name is `Password` (any prefix, any case),
//!   which covers the callback's own password and every `DeviceCredential` password, and of every
//!   `Username` element that is not inside a `DeviceCredential` (the callback's own username; a
//!   device credential's username is shown, as `/devices` shows it).
//! - JSON (a body whose first non-blank byte is `{`, as the parser decides): the value of every
//!   `"password"` key at any depth, and of the top-level `"username"` (and of the first
//!   `"username"` of the body, which is the one the lenient scan of a malformed body takes).
//!
//! A masked value becomes [`MASK`], whatever its length, so the answer does not tell how long a
//! secret is. An empty value (`<Password/>`, `"password": ""`, `null`) is left as it is: it hides
//! nothing, and seeing that the platform sent none is useful.

use std::borrow::Cow;
use std::ops::Range;

/// What a masked value is replaced by.
pub const MASK: &str = "********";

/// `body` with its secrets masked; borrowed when there was nothing to mask.
pub fn redact(body: &[u8]) -> Cow<'_, [u8]> {
    let replacements = if looks_like_json(body) {
        json_secrets(body)
    } else {
        xml_secrets(body)
    };
    apply(body, &replacements)
}

/// One stretch of the body to replace by the mask.
#[derive(Debug, PartialEq, Eq)]
struct Replacement {
    range: Range<usize>,
    /// The mask goes in quotes: a JSON value that was not a string (a number, an object) becomes
    /// the string `"********"`, so the masked body stays valid JSON.
    quoted: bool,
}

fn apply<'a>(body: &'a [u8], replacements: &[Replacement]) -> Cow<'a, [u8]> {
    if replacements.is_empty() {
        return Cow::Borrowed(body);
    }
    let mut masked = Vec::with_capacity(body.len());
    let mut copied = 0;
    for replacement in replacements {
        masked.extend_from_slice(&body[copied..replacement.range.start]);
        if replacement.quoted {
            masked.push(b'"');
            masked.extend_from_slice(MASK.as_bytes());
            masked.push(b'"');
        } else {
            masked.extend_from_slice(MASK.as_bytes());
        }
        copied = replacement.range.end;
    }
    masked.extend_from_slice(&body[copied..]);
    Cow::Owned(masked)
}

/// The parser's own rule: the first non-blank byte (after a UTF-8 byte order mark) opens a JSON
/// object.
fn looks_like_json(body: &[u8]) -> bool {
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    body.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{')
}

/// Whether `range` of `body` holds anything but white space.
fn has_content(body: &[u8], range: &Range<usize>) -> bool {
    body[range.clone()]
        .iter()
        .any(|byte| !byte.is_ascii_whitespace())
}

/// The next position at or after a given one where a predicate holds, remembering the last answer.
/// Asked from positions that never go back, it answers every question of one scan in linear time
/// in total, also when there is no match at all (the case that makes a naive search quadratic:
/// a million `<Password` and no `>`).
struct NextMatch {
    /// Where the last search started, and what it found (`None`: nothing from there to the end).
    last: Option<(usize, Option<usize>)>,
}

impl NextMatch {
    fn new() -> Self {
        Self { last: None }
    }

    fn find(
        &mut self,
        body: &[u8],
        from: usize,
        matches: impl Fn(&[u8], usize) -> bool,
    ) -> Option<usize> {
        if let Some((started, found)) = self.last {
            if from >= started {
                match found {
                    // Nothing matched in `started..found`, so nothing does in `from..found`.
                    Some(found) if found >= from => return Some(found),
                    None => return None,
                    Some(_) => {}
                }
            }
        }
        let found = (from..body.len()).find(|&position| matches(body, position));
        self.last = Some((from, found));
        found
    }
}

// ---------------------------------------------------------------------------------------------
// XML

/// Where an element name that starts at `start` ends (white space, `>`, `/`, `<` or the end), and
/// where its local name (after the last `:`) starts.
fn tag_name(body: &[u8], start: usize) -> (Range<usize>, usize) {
    let mut local_start = start;
    let mut end = start;
    while let Some(&byte) = body.get(end) {
        match byte {
            b'>' | b'/' | b'<' => break,
            byte if byte.is_ascii_whitespace() => break,
            b':' => local_start = end + 1,
            _ => {}
        }
        end += 1;
    }
    (local_start..end, end)
}

/// Whether a closing tag `</[prefix:]name` starts at `position`.
fn closes(body: &[u8], position: usize, name: &[u8]) -> bool {
    if !body[position..].starts_with(b"</") {
        return false;
    }
    let (local, _) = tag_name(body, position + 2);
    body[local].eq_ignore_ascii_case(name)
}

fn xml_secrets(body: &[u8]) -> Vec<Replacement> {
    let mut replacements = Vec::new();
    let mut next_tag_end = NextMatch::new();
    let mut next_password_close = NextMatch::new();
    let mut next_username_close = NextMatch::new();
    // Open `DeviceCredential` elements around the current position.
    let mut credential_depth = 0usize;
    let mut position = 0;
    while let Some(offset) = body[position..].iter().position(|&byte| byte == b'<') {
        let open = position + offset;
        let closing = body.get(open + 1) == Some(&b'/');
        let (local, name_end) = tag_name(body, open + 1 + usize::from(closing));
        position = name_end.max(open + 1);
        let local = &body[local];
        if closing {
            if local.eq_ignore_ascii_case(b"DeviceCredential") {
                credential_depth = credential_depth.saturating_sub(1);
            }
            continue;
        }
        let credential = local.eq_ignore_ascii_case(b"DeviceCredential");
        let password = local.eq_ignore_ascii_case(b"Password");
        let username = local.eq_ignore_ascii_case(b"Username") && credential_depth == 0;
        if !(credential || password || username) {
            continue;
        }
        // The tag ends at the first `>`, as the parser's lenient scan has it (over-masking an
        // attribute that holds a `>` is the safe side).
        let Some(tag_end) =
            next_tag_end.find(body, name_end, |body, position| body[position] == b'>')
        else {
            continue;
        };
        let self_closing = tag_end > name_end && body[tag_end - 1] == b'/';
        if credential {
            if !self_closing {
                credential_depth += 1;
            }
            continue;
        }
        if self_closing {
            position = tag_end + 1;
            continue;
        }
        let value_start = tag_end + 1;
        let (name, next_close): (&[u8], _) = if password {
            (b"Password", &mut next_password_close)
        } else {
            (b"Username", &mut next_username_close)
        };
        // Up to the closing tag: the parser joins every text of the element, also text after a
        // child element or a comment, so everything up to the end of the element is masked.
        let value_end = next_close
            .find(body, value_start, |body, position| {
                closes(body, position, name)
            })
            .unwrap_or_else(|| unclosed_value_end(body, value_start));
        let value = value_start..value_end;
        if has_content(body, &value) {
            replacements.push(Replacement {
                range: value,
                quoted: false,
            });
        }
        position = value_end.max(value_start);
    }
    replacements
}

/// The end of the value of an element that is never closed: the next tag, past any CDATA section
/// or comment (their text is the value too), or the end of the body.
fn unclosed_value_end(body: &[u8], start: usize) -> usize {
    let mut position = start;
    loop {
        let Some(offset) = body[position..].iter().position(|&byte| byte == b'<') else {
            return body.len();
        };
        let open = position + offset;
        let rest = &body[open..];
        let terminator: &[u8] = if rest.starts_with(b"<![CDATA[") {
            b"]]>"
        } else if rest.starts_with(b"<!--") {
            b"-->"
        } else {
            return open;
        };
        match find_bytes(&body[open + 4..], terminator) {
            Some(at) => position = open + 4 + at + terminator.len(),
            None => return body.len(),
        }
    }
}

/// Where `needle` (a few bytes) first occurs in `haystack`: linear, as the needle is short.
fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

// ---------------------------------------------------------------------------------------------
// JSON

#[derive(Clone, Copy, PartialEq, Eq)]
enum SecretKey {
    Password,
    Username,
}

/// Whether `"password"` or `"username"` (any case), then `:`, starts at `position`; and where the
/// value after the colon starts.
fn secret_key_at(body: &[u8], position: usize) -> Option<(SecretKey, usize)> {
    let quoted = body.get(position..position + 10)?;
    if quoted[0] != b'"' || quoted[9] != b'"' {
        return None;
    }
    let key = if quoted[1..9].eq_ignore_ascii_case(b"password") {
        SecretKey::Password
    } else if quoted[1..9].eq_ignore_ascii_case(b"username") {
        SecretKey::Username
    } else {
        return None;
    };
    let colon = skip_blanks(body, position + 10);
    (body.get(colon) == Some(&b':')).then(|| (key, skip_blanks(body, colon + 1)))
}

fn skip_blanks(body: &[u8], mut position: usize) -> usize {
    while body.get(position).is_some_and(u8::is_ascii_whitespace) {
        position += 1;
    }
    position
}

/// A JSON scan that keeps track of strings and nesting, so that it knows the top level, while
/// recognising a secret key wherever its text occurs: a body with a broken string (a dropped
/// quote) still has its password found by the parser's lenient scan, which looks for the text
/// `"password"` and a colon, and so it is masked here too.
fn json_secrets(body: &[u8]) -> Vec<Replacement> {
    let mut replacements = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut seen_username = false;
    let mut position = 0;
    while let Some(&byte) = body.get(position) {
        if byte == b'"' {
            if let Some((key, value_start)) = secret_key_at(body, position) {
                let top_level_key = !in_string && !escaped && depth == 1;
                let mask = match key {
                    SecretKey::Password => true,
                    SecretKey::Username => top_level_key || !seen_username,
                };
                seen_username |= key == SecretKey::Username;
                if mask {
                    let (replacement, value_end) = json_value(body, value_start);
                    replacements.extend(replacement);
                    // The value is consumed whole; what follows it is outside any string.
                    position = value_end.max(position + 1);
                    in_string = false;
                    escaped = false;
                    continue;
                }
            }
        }
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        position += 1;
    }
    replacements
}

/// The replacement for the value starting at `start` (none when it is empty or `null`), and where
/// the value ends.
fn json_value(body: &[u8], start: usize) -> (Option<Replacement>, usize) {
    match body.get(start) {
        None => (None, start),
        Some(b'"') => {
            let end = string_end(body, start + 1);
            let inside = start + 1..end.min(body.len());
            let replacement = has_content(body, &inside).then_some(Replacement {
                range: inside,
                quoted: false,
            });
            (replacement, (end + 1).min(body.len()))
        }
        Some(b'{' | b'[') => {
            let end = container_end(body, start);
            let replacement = Replacement {
                range: start..end,
                quoted: true,
            };
            (Some(replacement), end)
        }
        Some(_) => {
            // A scalar, up to the delimiters the lenient scan stops at.
            let end = body[start..]
                .iter()
                .position(|byte| matches!(byte, b',' | b'}' | b']' | b'\n'))
                .map_or(body.len(), |offset| start + offset);
            let mut trimmed = end;
            while trimmed > start && body[trimmed - 1].is_ascii_whitespace() {
                trimmed -= 1;
            }
            let value = start..trimmed;
            let replacement = (&body[value.clone()] != b"null" && has_content(body, &value))
                .then_some(Replacement {
                    range: value,
                    quoted: true,
                });
            (replacement, end)
        }
    }
}

/// The position of the quote that closes a string whose content starts at `start` (the body's
/// length when it is never closed).
fn string_end(body: &[u8], start: usize) -> usize {
    let mut escaped = false;
    for (offset, &byte) in body[start..].iter().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return start + offset,
            _ => {}
        }
    }
    body.len()
}

/// Just past the bracket that closes the object or array opening at `start` (the body's length
/// when it is never closed).
fn container_end(body: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut position = start;
    while let Some(&byte) = body.get(position) {
        match byte {
            b'"' => position = string_end(body, position + 1),
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return position + 1;
                }
            }
            _ => {}
        }
        position += 1;
    }
    body.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
    }

    fn redacted(body: &str) -> String {
        String::from_utf8(redact(body.as_bytes()).into_owned()).expect("UTF-8 stays UTF-8")
    }

    /// The JSON fixtures with a real pair instead of the empty one of the examples.
    fn with_credentials(json: &str) -> String {
        json.replacen(r#""username": """#, r#""username": "fleet-ops""#, 1)
            .replacen(r#""password": """#, r#""password": "s3cret-rotation-A""#, 1)
    }

    #[test]
    fn seed_004_device_credential_password_is_masked_and_nothing_else_changes() {
        let body = fixture("activate_seed004.xml");
        let masked = redacted(&body);
        assert!(
            !masked.contains("<Password>5096306081</Password>"),
            "{masked}"
        );
        assert_eq!(
            masked,
            body.replace(
                "<Password>5096306081</Password>",
                "<Password>********</Password>"
            ),
            "only the device password changes; its username, the MDN and the empty callback \
             pair stay as received"
        );
    }

    #[test]
    fn seed_001_callback_credentials_are_masked_whatever_their_namespace() {
        let body = fixture("upload_seed001.xml");
        let masked = redacted(&body);
        let expected = body
            .replace(
                r#"<Username xmlns="http://nphase.com/unifiedwebservice/v2">test </Username>"#,
                r#"<Username xmlns="http://nphase.com/unifiedwebservice/v2">********</Username>"#,
            )
            .replace(
                r#"<Password xmlns="http://nphase.com/unifiedwebservice/v2">test </Password>"#,
                r#"<Password xmlns="http://nphase.com/unifiedwebservice/v2">********</Password>"#,
            );
        assert_ne!(expected, body, "the fixture has the pair this test expects");
        assert_eq!(masked, expected);
    }

    #[test]
    fn the_callback_pair_of_a_bare_callback_is_masked() {
        let masked = redacted(&fixture("deactivate_bare.xml"));
        assert!(!masked.contains("fleet-ops"), "{masked}");
        assert!(!masked.contains("s3cret-rotation-A"), "{masked}");
        assert!(masked.contains("<Username>********</Username>"), "{masked}");
        assert!(masked.contains("<Password>********</Password>"), "{masked}");
    }

    #[test]
    fn a_malformed_activation_still_has_its_secrets_masked() {
        let body = fixture("activate_seed004_malformed.xml")
            .replace("<Username/>", "<Username>fleet-ops</Username>")
            .replace("<Password/>", "<Password>s3cret-rotation-A</Password>");
        // Truncated in the middle of the device credential's password, as a cut upload would be.
        let truncated = &body[..body.find("5096306081</Password>").unwrap() + 6];
        for body in [body.as_str(), truncated] {
            let masked = redacted(body);
            assert!(!masked.contains("s3cret-rotation-A"), "{masked}");
            assert!(!masked.contains("fleet-ops"), "{masked}");
            assert!(!masked.contains("<Password>5096"), "{masked}");
            assert!(
                masked.contains("<Username>5096306081@vzw3g.com</Username>"),
                "a device credential's username is shown: {masked}"
            );
        }
    }

    #[test]
    fn prefixes_case_attributes_cdata_comments_and_mixed_content_are_all_masked() {
        for (body, secret) in [
            ("<a:Password>p1</a:Password>", "p1"),
            ("<x:y:PASSWORD>p2</x:y:PASSWORD>", "p2"),
            (r#"<Password xmlns="urn:v2" note="a>b">p3</Password>"#, "p3"),
            ("<Password><![CDATA[p4<]]></Password>", "p4"),
            ("<Password>p5a<!-- c -->p5b</Password>", "p5b"),
            ("<Password>p6a<i/>p6b</Password>", "p6b"),
            ("<R><Password>p7", "p7"),
            ("<R><Password><![CDATA[p8</R>", "p8"),
            (
                "<DeviceCredential><Password>p9</Password></DeviceCredential>",
                "p9",
            ),
            ("<Password\n>p10</Password>", "p10"),
        ] {
            let masked = redacted(body);
            assert!(!masked.contains(secret), "{body} became {masked}");
            assert!(masked.contains(MASK), "{body} became {masked}");
        }
    }

    #[test]
    fn empty_and_nil_values_and_longer_names_are_left_alone() {
        for body in [
            "<R><Username/><Password/></R>",
            r#"<R><Password xsi:nil="true"/></R>"#,
            "<R><Password>  </Password></R>",
            "<R><PasswordHint>kept</PasswordHint><NewUsername>kept</NewUsername></R>",
            "<R>Password Username x:Password</R>",
        ] {
            assert_eq!(redacted(body), body);
        }
    }

    #[test]
    fn a_body_that_is_not_utf8_is_masked_byte_for_byte_around_the_secret() {
        let mut body = b"\xff\xfe<Username>op\xe9rator</Username>\x80".to_vec();
        body.extend_from_slice(b"<Password>s\xffcret</Password>\xc3");
        let masked = redact(&body);
        assert_eq!(
            &masked[..],
            &b"\xff\xfe<Username>********</Username>\x80<Password>********</Password>\xc3"[..]
        );
    }

    #[test]
    fn json_fixtures_have_their_pair_and_every_password_masked() {
        for name in [
            "json_fault.json",
            "json_change_identifier.json",
            "json_malformed.json",
        ] {
            let body = with_credentials(&fixture(name));
            let masked = redacted(&body);
            assert!(!masked.contains("fleet-ops"), "{name}: {masked}");
            assert!(!masked.contains("s3cret-rotation-A"), "{name}: {masked}");
            assert_eq!(
                masked,
                body.replace("fleet-ops", MASK)
                    .replace("s3cret-rotation-A", MASK),
                "{name}: only the two values change"
            );
        }
    }

    #[test]
    fn json_passwords_at_any_depth_are_masked_and_nested_usernames_shown() {
        let body = r#"{"username": "fleet-ops", "password": "top",
            "deviceResponse": {"activateResponse": {"deviceCredential":
                {"username": "5096306081@vzw3g.com", "Password": "deep"}}},
            "list": [{"password": 12345}, {"password": {"nested": "obj"}}, {"password": null}]}"#;
        let masked = redacted(body);
        for secret in ["fleet-ops", "top", "deep", "12345", "obj"] {
            assert!(!masked.contains(secret), "{secret}: {masked}");
        }
        assert!(masked.contains("5096306081@vzw3g.com"), "{masked}");
        assert!(masked.contains(r#"{"password": null}"#), "{masked}");
        let parsed: serde_json::Value = serde_json::from_str(&masked).expect("still JSON");
        assert_eq!(parsed["list"][0]["password"], MASK);
        assert_eq!(parsed["list"][1]["password"], MASK);
        assert_eq!(parsed["username"], MASK);
    }

    #[test]
    fn json_strings_with_escapes_and_broken_strings_are_masked() {
        for (body, secret) in [
            (r#"{"password": "a\"b\\c"}"#, r#"a\"b\\c"#),
            // A dropped quote: the lenient scan still finds this pair, so it is masked too.
            (
                r#"{"requestId": "abc, "username": "u1", "password": "p1"}"#,
                "p1",
            ),
            (r#"{"password": "never closed"#, "never closed"),
            (r#"  {"PASSWORD" :	"spaced" }"#, "spaced"),
        ] {
            let masked = redacted(body);
            assert!(!masked.contains(secret), "{body} became {masked}");
        }
        let broken = redacted(r#"{"requestId": "abc, "username": "u1", "password": "p1"}"#);
        assert!(!broken.contains("u1"), "{broken}");
    }

    #[test]
    fn nothing_to_mask_borrows_the_body() {
        let body = fixture("sms_mo.xml");
        assert!(matches!(redact(body.as_bytes()), Cow::Borrowed(_)));
    }

    /// Seconds to mask `body`: the best of a few runs, so that a busy machine does not decide.
    fn masking_time(body: &[u8]) -> f64 {
        (0..7)
            .map(|_| {
                let started = std::time::Instant::now();
                std::hint::black_box(redact(std::hint::black_box(body)));
                started.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    #[test]
    fn hostile_shapes_are_masked_in_linear_time() {
        let shapes: [(&str, &str, usize); 9] = [
            // The shape of the issue: 10 MB, then 40 MB.
            ("", "x:Password", 1_000_000),
            // Shapes that would make a naive search quadratic (a search to the end per tag or key);
            // smaller, so that a regression fails in seconds rather than hanging.
            ("", "<x:Password", 2_000),
            ("", "<Password>", 2_000),
            ("", "<Password>a<![CDATA[", 2_000),
            ("", "<DeviceCredential <Username", 2_000),
            ("{", r#""password""#, 2_000),
            ("{", r#""username":"#, 2_000),
            ("{", r#""password":{"#, 2_000),
            ("{", r#""password":""#, 2_000),
        ];
        for (head, unit, count) in shapes {
            let body = |count: usize| format!("{head}{}", unit.repeat(count)).into_bytes();
            let (single, eightfold) = (body(count), body(8 * count));
            // Warm the allocator and caches with the larger one first.
            masking_time(&eightfold);
            let ratio = masking_time(&eightfold) / masking_time(&single);
            // Linear is about 8; quadratic would be about 64. The margin is for a busy machine:
            // the smaller inputs take only microseconds.
            assert!(
                ratio < 24.0,
                "{unit:?} x {count}: 8x the input took {ratio:.1}x the time"
            );
        }
    }
}
