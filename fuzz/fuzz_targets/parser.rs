//! Any bytes into the callback parser: it must return (a callback or an unreadable body), never
//! panic, never allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let _ = m2m_listener::parser::parse(body);
});
