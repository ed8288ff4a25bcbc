//! A small owned element tree built from quick-xml events.
//!
//! Callbacks are small documents (a 10,000-line upload is about 3 MB) whose meaning depends on
//! which sibling is non-nil, so a tree is simpler to interpret than a streaming state machine.
//! Names are local names (prefixes and namespaces dropped, as the platform mixes them freely);
//! text is trimmed; `xsi:nil="true"` is recorded so that interpretation can treat it as absent.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// Deeper than any real callback (the upload callback nests 8 levels); bounds the stack.
pub(crate) const MAX_DEPTH: usize = 64;
/// Longest element name a repair line quotes (a hostile body may send a megabyte-long one).
const SHOWN_NAME: usize = 64;
/// More repairs than this and a body is too broken for its meaning to be trusted.
pub(crate) const MAX_REPAIRS: usize = 16;
/// About five times the elements of a 10,000-line upload; bounds memory on hostile input.
const MAX_ELEMENTS: usize = 500_000;

#[derive(Debug, Default)]
pub(crate) struct Element {
    /// Local name, as written.
    pub name: String,
    /// `xsi:nil="true"`: the platform's way of saying "absent".
    pub nil: bool,
    /// Text content, trimmed. Empty for container elements.
    pub text: String,
    pub children: Vec<Element>,
    /// Still open when the body ended, and closed there by the repair: its content may have been
    /// cut short.
    pub closed_at_end: bool,
}

impl Element {
    /// Whether the name matches, ignoring ASCII case (the platform is not consistent either).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|child| child.is(name))
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |child| child.is(name))
    }

    /// The text, unless the element is nil or empty.
    pub fn value(&self) -> Option<&str> {
        (!self.nil && !self.text.is_empty()).then_some(self.text.as_str())
    }

    pub fn child_value(&self, name: &str) -> Option<String> {
        self.child(name).and_then(Element::value).map(str::to_owned)
    }

    /// Not nil and carrying something. `<ChangeDeviceCustomFields/>` (empty, not nil) occurs in real
    /// activation callbacks beside the one meaningful element, so empty counts as absent.
    pub fn is_present(&self) -> bool {
        !self.nil && (!self.children.is_empty() || !self.text.is_empty())
    }
}

/// A tree, and what was repaired to build it.
#[derive(Debug)]
pub(crate) struct Document {
    pub root: Element,
    /// One line per repair, in body order; empty for a well-formed document.
    pub repairs: Vec<String>,
}

/// Builds the tree, or says why the document is not well-formed (or not acceptable).
///
/// Three malformations whose meaning is not in doubt are repaired, each reported in
/// [`Document::repairs`]: an end tag written `</Name/>` (seed 004's `</MaxCallbackThreshold/>`)
/// is read as `</Name>`; an end tag that closes no open element is ignored; elements still open
/// when the body ends (after a complete tag, not inside a value) are closed there and marked
/// [`Element::closed_at_end`], so that interpretation can refuse a callback whose content may
/// have been cut short. Anything else stays an error: an end tag naming an element that is open
/// but not the innermost one could mean more than one tree. `offset` is where `input` starts in
/// the body as received, so that the byte positions reported name the raw body.
pub(crate) fn build(input: &str, offset: usize) -> Result<Document, String> {
    let mut reader = Reader::from_str(input);
    // End tags are checked here, against the qualified names of the open elements, so that the
    // unambiguous malformations can be repaired instead of refused.
    reader.config_mut().check_end_names = false;
    reader.config_mut().allow_unmatched_ends = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut open_names = OpenNames::default();
    let mut repairs = Repairs::default();
    let mut root: Option<Element> = None;
    let mut elements = 0usize;
    // Non-blank text since the last tag: a body that ends here ends inside a value.
    let mut text_pending = false;

    loop {
        let at =
            offset.saturating_add(usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX));
        let event = reader.read_event().map_err(|error| {
            format!(
                "XML error at byte {}: {error}",
                offset
                    .saturating_add(usize::try_from(reader.error_position()).unwrap_or(usize::MAX))
            )
        })?;
        match event {
            Event::Start(start) | Event::Empty(start) if stack.len() >= MAX_DEPTH => {
                return Err(format!(
                    "element <{}> nests deeper than {MAX_DEPTH} levels",
                    String::from_utf8_lossy(start.local_name().as_ref().as_bytes())
                ));
            }
            Event::Start(start) => {
                elements += 1;
                check_element_count(elements)?;
                stack.push(open_element(&start)?);
                open_names.push(start.name().as_ref());
                text_pending = false;
            }
            Event::Empty(start) => {
                elements += 1;
                check_element_count(elements)?;
                let element = open_element(&start)?;
                attach(&mut stack, &mut root, element)?;
                text_pending = false;
            }
            Event::End(end) => {
                let qualified = end.name();
                let written: &str = qualified.as_ref();
                let name = match written.strip_suffix('/') {
                    Some(name) => {
                        let name = name.trim_end();
                        repairs.push(format!(
                            "`</{}>` read as `</{}>` at byte {at}",
                            shown(written),
                            shown(name)
                        ))?;
                        name
                    }
                    None => written,
                };
                if open_names.innermost() != Some(name) {
                    if open_names.is_open(name) {
                        let innermost = open_names.innermost().unwrap_or_default();
                        return Err(format!(
                            "XML error at byte {at}: `</{}>` while `<{}>` is open: which element \
                             was meant to close is ambiguous",
                            shown(name),
                            shown(innermost)
                        ));
                    }
                    repairs.push(format!("stray `</{}>` at byte {at} ignored", shown(name)))?;
                    continue;
                }
                open_names.pop();
                let mut element = stack
                    .pop()
                    .ok_or_else(|| "closing tag without an opening tag".to_owned())?;
                trim_in_place(&mut element.text);
                attach(&mut stack, &mut root, element)?;
                text_pending = false;
            }
            Event::Text(text) => append_text(&mut stack, &text.xml10_content(), &mut text_pending)?,
            Event::CData(cdata) => {
                append_text(&mut stack, &cdata.xml10_content(), &mut text_pending)?
            }
            Event::GeneralRef(reference) => {
                let resolved = match reference.resolve_char_ref() {
                    Ok(Some(character)) => character,
                    Ok(None) => predefined_entity(&reference.xml10_content())?,
                    Err(error) => return Err(format!("bad character reference: {error}")),
                };
                let mut buffer = [0u8; 4];
                append_text(
                    &mut stack,
                    resolved.encode_utf8(&mut buffer),
                    &mut text_pending,
                )?;
            }
            // Entity declarations are how "billion laughs" and external-entity attacks start; no
            // callback carries a DTD, so none is accepted.
            Event::DocType(_) => return Err("a DTD is not allowed in a callback".to_owned()),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        if text_pending {
            return Err(format!(
                "document ends inside the text of <{}>",
                shown(&open.name)
            ));
        }
    }
    let end = offset.saturating_add(input.len());
    while let Some(mut element) = stack.pop() {
        let name = open_names.pop().unwrap_or_default();
        repairs.push(format!(
            "`<{}>` left open: closed at the end of the body (byte {end})",
            shown(&name)
        ))?;
        trim_in_place(&mut element.text);
        element.closed_at_end = true;
        attach(&mut stack, &mut root, element)?;
    }
    let root = root.ok_or_else(|| "no root element".to_owned())?;
    Ok(Document {
        root,
        repairs: repairs.lines,
    })
}

/// The qualified names of the open elements, innermost last, in one buffer (one allocation for
/// the document rather than one per element).
#[derive(Default)]
struct OpenNames {
    buffer: String,
    starts: Vec<usize>,
}

impl OpenNames {
    fn push(&mut self, name: &str) {
        self.starts.push(self.buffer.len());
        self.buffer.push_str(name);
    }

    fn pop(&mut self) -> Option<String> {
        let start = self.starts.pop()?;
        Some(self.buffer.split_off(start))
    }

    fn innermost(&self) -> Option<&str> {
        self.starts.last().map(|&start| &self.buffer[start..])
    }

    /// At most [`MAX_DEPTH`] names to compare.
    fn is_open(&self, name: &str) -> bool {
        let ends = self
            .starts
            .iter()
            .skip(1)
            .copied()
            .chain([self.buffer.len()]);
        self.starts
            .iter()
            .zip(ends)
            .any(|(&start, end)| &self.buffer[start..end] == name)
    }
}

/// The repairs made so far, at most [`MAX_REPAIRS`].
#[derive(Default)]
struct Repairs {
    lines: Vec<String>,
}

impl Repairs {
    fn push(&mut self, line: String) -> Result<(), String> {
        if self.lines.len() >= MAX_REPAIRS {
            return Err(format!(
                "XML error: more than {MAX_REPAIRS} repairs needed, too broken to read with \
                 confidence (the first: {})",
                self.lines.first().map(String::as_str).unwrap_or_default()
            ));
        }
        self.lines.push(line);
        Ok(())
    }
}

/// A name from the body as a repair line shows it: at most [`SHOWN_NAME`] characters.
pub(crate) fn shown(name: &str) -> String {
    match name.char_indices().nth(SHOWN_NAME) {
        Some((cut, _)) => format!("{}...", &name[..cut]),
        None => name.to_owned(),
    }
}

fn check_element_count(elements: usize) -> Result<(), String> {
    if elements > MAX_ELEMENTS {
        return Err(format!("more than {MAX_ELEMENTS} elements"));
    }
    Ok(())
}

fn open_element(start: &BytesStart<'_>) -> Result<Element, String> {
    let mut nil = false;
    for attribute in start.attributes() {
        let attribute = attribute.map_err(|error| format!("bad attribute: {error}"))?;
        if attribute.key.local_name().as_ref() == "nil" {
            let value = attribute.value.trim();
            nil = value == "true" || value == "1";
        }
    }
    Ok(Element {
        name: start.local_name().as_ref().to_owned(),
        nil,
        text: String::new(),
        children: Vec::new(),
        closed_at_end: false,
    })
}

fn attach(
    stack: &mut [Element],
    root: &mut Option<Element>,
    element: Element,
) -> Result<(), String> {
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None if root.is_none() => *root = Some(element),
        None => return Err(format!("second root element <{}>", element.name)),
    }
    Ok(())
}

fn append_text(stack: &mut [Element], text: &str, text_pending: &mut bool) -> Result<(), String> {
    let blank = text.trim().is_empty();
    match stack.last_mut() {
        // Leading white space would be trimmed anyway; skipping it saves an allocation for every
        // indented container element.
        Some(open) if open.text.is_empty() && blank => Ok(()),
        Some(open) => {
            open.text.push_str(text);
            *text_pending |= !blank;
            Ok(())
        }
        None if text.trim().is_empty() => Ok(()),
        None => Err("text outside the root element".to_owned()),
    }
}

fn predefined_entity(name: &str) -> Result<char, String> {
    match name {
        "amp" => Ok('&'),
        "lt" => Ok('<'),
        "gt" => Ok('>'),
        "quot" => Ok('"'),
        "apos" => Ok('\''),
        other => Err(format!("unknown entity &{other};")),
    }
}

fn trim_in_place(text: &mut String) {
    let trimmed = text.trim();
    if trimmed.len() != text.len() {
        *text = trimmed.to_owned();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(input: &str) -> Element {
        let document = build(input, 0).unwrap();
        assert!(document.repairs.is_empty(), "{:?}", document.repairs);
        document.root
    }

    #[test]
    fn local_names_trimmed_text_and_nil_are_recorded() {
        let root = tree(
            r#"<a:Root xmlns:a="urn:x" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
                 <a:Name> value &amp; more </a:Name><Gone i:nil="true"/><Empty/></a:Root>"#,
        );
        assert_eq!(root.name, "Root");
        assert_eq!(root.child("name").unwrap().value(), Some("value & more"));
        assert!(root.child("Gone").unwrap().nil);
        assert_eq!(root.child("Gone").unwrap().value(), None);
        assert!(!root.child("Empty").unwrap().is_present());
    }

    #[test]
    fn character_references_and_cdata_become_text() {
        let root = tree("<R><A>&#65;&#x42;</A><B><![CDATA[<x>]]></B></R>");
        assert_eq!(root.child_value("A").as_deref(), Some("AB"));
        assert_eq!(root.child_value("B").as_deref(), Some("<x>"));
    }

    #[test]
    fn malformed_and_hostile_documents_are_refused() {
        for bad in [
            "<R><A></R>",
            "<R><A>1</B></R>",
            "<R><A>cut",
            "<R/><S/>",
            "",
            "not xml",
            "<R><A",
            "<R>&unknown;</R>",
            r#"<!DOCTYPE r [<!ENTITY a "aaaa">]><R>&a;</R>"#,
        ] {
            assert!(build(bad, 0).is_err(), "accepted {bad:?}");
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert!(build(&deep, 0).unwrap_err().contains("deeper"));
    }

    #[test]
    fn unambiguous_malformations_are_repaired_and_reported_at_their_byte() {
        let document = build("<R><A>1</A/><B/></C></R></R>", 3).unwrap();
        assert_eq!(document.root.child_value("A").as_deref(), Some("1"));
        assert_eq!(
            document.repairs,
            [
                "`</A/>` read as `</A>` at byte 10",
                "stray `</C>` at byte 19 ignored",
                "stray `</R>` at byte 27 ignored",
            ]
        );
        let open = build("<x:R><A>1</A><B>", 0).unwrap();
        assert!(open.root.closed_at_end);
        assert!(open.root.child("B").unwrap().closed_at_end);
        assert!(!open.root.child("A").unwrap().closed_at_end);
        assert_eq!(
            open.repairs,
            [
                "`<B>` left open: closed at the end of the body (byte 16)",
                "`<x:R>` left open: closed at the end of the body (byte 16)",
            ]
        );
    }

    #[test]
    fn names_in_repair_lines_are_cut() {
        let long = "N".repeat(10_000);
        let document = build(&format!("<R></{long}></R>"), 0).unwrap();
        assert!(document.repairs[0].len() < 200, "{}", document.repairs[0]);
    }
}
