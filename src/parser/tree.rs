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

/// Builds the tree, or says why the document is not well-formed (or not acceptable).
pub(crate) fn build(input: &str) -> Result<Element, String> {
    let mut reader = Reader::from_str(input);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut elements = 0usize;

    loop {
        let event = reader
            .read_event()
            .map_err(|error| format!("XML error at byte {}: {error}", reader.error_position()))?;
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
            }
            Event::Empty(start) => {
                elements += 1;
                check_element_count(elements)?;
                let element = open_element(&start)?;
                attach(&mut stack, &mut root, element)?;
            }
            Event::End(_) => {
                let mut element = stack
                    .pop()
                    .ok_or_else(|| "closing tag without an opening tag".to_owned())?;
                trim_in_place(&mut element.text);
                attach(&mut stack, &mut root, element)?;
            }
            Event::Text(text) => append_text(&mut stack, &text.xml10_content())?,
            Event::CData(cdata) => append_text(&mut stack, &cdata.xml10_content())?,
            Event::GeneralRef(reference) => {
                let resolved = match reference.resolve_char_ref() {
                    Ok(Some(character)) => character,
                    Ok(None) => predefined_entity(&reference.xml10_content())?,
                    Err(error) => return Err(format!("bad character reference: {error}")),
                };
                let mut buffer = [0u8; 4];
                append_text(&mut stack, resolved.encode_utf8(&mut buffer))?;
            }
            // Entity declarations are how "billion laughs" and external-entity attacks start; no
            // callback carries a DTD, so none is accepted.
            Event::DocType(_) => return Err("a DTD is not allowed in a callback".to_owned()),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(format!("document ends inside <{}>", open.name));
    }
    root.ok_or_else(|| "no root element".to_owned())
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

fn append_text(stack: &mut [Element], text: &str) -> Result<(), String> {
    match stack.last_mut() {
        // Leading white space would be trimmed anyway; skipping it saves an allocation for every
        // indented container element.
        Some(open) if open.text.is_empty() && text.trim().is_empty() => Ok(()),
        Some(open) => {
            open.text.push_str(text);
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

    #[test]
    fn local_names_trimmed_text_and_nil_are_recorded() {
        let root = build(
            r#"<a:Root xmlns:a="urn:x" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
                 <a:Name> value &amp; more </a:Name><Gone i:nil="true"/><Empty/></a:Root>"#,
        )
        .unwrap();
        assert_eq!(root.name, "Root");
        assert_eq!(root.child("name").unwrap().value(), Some("value & more"));
        assert!(root.child("Gone").unwrap().nil);
        assert_eq!(root.child("Gone").unwrap().value(), None);
        assert!(!root.child("Empty").unwrap().is_present());
    }

    #[test]
    fn character_references_and_cdata_become_text() {
        let root = build("<R><A>&#65;&#x42;</A><B><![CDATA[<x>]]></B></R>").unwrap();
        assert_eq!(root.child_value("A").as_deref(), Some("AB"));
        assert_eq!(root.child_value("B").as_deref(), Some("<x>"));
    }

    #[test]
    fn malformed_and_hostile_documents_are_refused() {
        for bad in [
            "<R><A>1</A/></R>",
            "<R><A></R>",
            "<R/><S/>",
            "<R>",
            "",
            "not xml",
            "<R>&unknown;</R>",
            r#"<!DOCTYPE r [<!ENTITY a "aaaa">]><R>&a;</R>"#,
        ] {
            assert!(build(bad).is_err(), "accepted {bad:?}");
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert!(build(&deep).unwrap_err().contains("deeper"));
    }
}
