//! Text as PostgreSQL stores it: without NUL, and indexed values bounded in length. Pure.

use std::borrow::Cow;

/// Text as PostgreSQL stores it: `text` cannot hold NUL, which a JSON callback can carry
/// (`\u0000`); it becomes U+FFFD. The raw body keeps the original bytes.
/// Borrowed unless there was a NUL to replace: nothing is copied in the usual case.
pub(super) fn clean(value: &str) -> Cow<'_, str> {
    if value.contains('\0') {
        Cow::Owned(value.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(value)
    }
}

pub(super) fn clean_option(value: Option<&str>) -> Option<Cow<'_, str>> {
    value.map(clean)
}

/// [`clean`] for text made here (a JSON rendering), without copying it again.
pub(super) fn clean_owned(value: String) -> Cow<'static, str> {
    match clean(&value) {
        Cow::Borrowed(_) => Cow::Owned(value),
        Cow::Owned(cleaned) => Cow::Owned(cleaned),
    }
}

/// Longest indexed text (request ids, device identifiers) kept as sent: PostgreSQL's B-tree
/// refuses entries past about 2,700 bytes, which would refuse such a callback on every retry.
const MAX_KEY_BYTES: usize = 1024;

/// Text of an indexed column: [`clean`], and past [`MAX_KEY_BYTES`] a prefix and a digest of the
/// whole (lookups apply the same, so the full value still finds it).
pub(super) fn clean_key(value: &str) -> Cow<'_, str> {
    use sha2::Digest;
    let cleaned = clean(value);
    if cleaned.len() <= MAX_KEY_BYTES {
        return cleaned;
    }
    let digest = hex::encode(&sha2::Sha256::digest(cleaned.as_bytes())[..16]);
    let mut end = MAX_KEY_BYTES - digest.len() - 4;
    while !cleaned.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…{digest}", &cleaned[..end]))
}
