//! Any bytes into the callback parser: the credential read that comes first and the full parse
//! must each return (credentials or none; a callback or an unreadable body), never panic, never
//! allocate without bound. Run with `-timeout` and `-report_slow_units` so that an input shape
//! that makes either super-linear shows up as a slow unit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let _ = m2m_listener::parser::credentials(body);
    let _ = m2m_listener::parser::parse(body);
});
