//! Generated and mutated callbacks: the parser never panics, the server never answers 5xx to
//! them, and no authenticated body that was answered 200 is lost.

use proptest::prelude::*;

use crate::helpers::{TestApp, fixture, spawn_app};

const FIXTURES: &[&str] = &[
    "activate_seed004.xml",
    "activate_seed004_malformed.xml",
    "activate_seed004_ambiguous.xml",
    "upload_seed001.xml",
    "activate_failed.xml",
    "deactivate_bare.xml",
    "sms_mo.xml",
    "promo_change.xml",
    "resume_tracking.xml",
    "json_change_identifier.json",
    "json_fault.json",
    "json_malformed.json",
    "json_nidd_uplink.json",
    "json_nidd_mt_queued.json",
    "json_nidd_mt_failed.json",
];

/// The ways a real body gets damaged or twisted.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    /// Copy the bytes `[from, from + length)` to `at`: duplicated elements.
    Duplicate {
        from: usize,
        length: usize,
        at: usize,
    },
    /// Swap two ranges: reordered elements.
    Swap {
        first: usize,
        second: usize,
        length: usize,
    },
    /// Overwrite one byte: odd encodings, broken tags.
    Flip {
        at: usize,
        byte: u8,
    },
    /// Blow one position up into a huge value.
    Inflate {
        at: usize,
        repeat: usize,
    },
    /// Prepend a byte order mark (UTF-8 or UTF-16).
    ByteOrderMark(bool),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1usize..64, any::<usize>())
            .prop_map(|(from, length, at)| Mutation::Duplicate { from, length, at }),
        (any::<usize>(), any::<usize>(), 1usize..32).prop_map(|(first, second, length)| {
            Mutation::Swap {
                first,
                second,
                length,
            }
        }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Flip { at, byte }),
        (any::<usize>(), 1usize..20_000).prop_map(|(at, repeat)| Mutation::Inflate { at, repeat }),
        any::<bool>().prop_map(Mutation::ByteOrderMark),
    ]
}

fn apply(body: &mut Vec<u8>, mutation: &Mutation) {
    if body.is_empty() {
        return;
    }
    let length = body.len();
    match *mutation {
        Mutation::Truncate(at) => body.truncate(at % length),
        Mutation::Duplicate {
            from,
            length: span,
            at,
        } => {
            let from = from % length;
            let piece: Vec<u8> = body[from..(from + span).min(length)].to_vec();
            let at = at % (length + 1);
            body.splice(at..at, piece);
        }
        Mutation::Swap {
            first,
            second,
            length: span,
        } => {
            let span = span.min(length / 2);
            let (first, second) = (first % (length - span + 1), second % (length - span + 1));
            if span > 0 && (first + span <= second || second + span <= first) {
                for offset in 0..span {
                    body.swap(first + offset, second + offset);
                }
            }
        }
        Mutation::Flip { at, byte } => body[at % length] = byte,
        Mutation::Inflate { at, repeat } => {
            let at = at % length;
            let piece = vec![body[at]; repeat];
            body.splice(at..at, piece);
        }
        Mutation::ByteOrderMark(utf8) => {
            let mark: &[u8] = if utf8 { b"\xef\xbb\xbf" } else { b"\xff\xfe" };
            body.splice(0..0, mark.iter().copied());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn the_parser_never_panics_on_mutated_callbacks(index in 0..FIXTURES.len(), mutations in proptest::collection::vec(mutation(), 1..6)) {
        let mut body = fixture(FIXTURES[index]);
        for mutation in &mutations {
            apply(&mut body, mutation);
        }
        let _ = m2m_listener::parser::parse(&body);
    }

    #[test]
    fn the_parser_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = m2m_listener::parser::parse(&body);
    }
}

/// Posts `body`; checks the answer and, for a 200, that the body is kept byte for byte (secrets
/// masked on the way out).
async fn post_and_check(app: &TestApp, body: Vec<u8>) -> Result<(), String> {
    let response = app.post_callback(body.clone()).await;
    let status = response.status().as_u16();
    if ![200, 400, 403].contains(&status) {
        return Err(format!("answered {status}"));
    }
    if status != 200 {
        return Ok(());
    }
    // The latest delivery, and the one whose raw body it shares (itself, or the first delivery of
    // its message).
    let row = app.database.rows(
        "SELECT coalesce(duplicate_of, id), duplicate_of IS NOT NULL FROM deliveries
         WHERE id = (SELECT max(id) FROM deliveries)",
    );
    let Some([Some(kept_as), Some(duplicate)]) =
        row.first().map(|row| [row[0].clone(), row[1].clone()])
    else {
        return Err("answered 200 but no delivery is stored".to_owned());
    };
    let raw = app
        .get_api(&format!("/api/v1/deliveries/{kept_as}/raw"))
        .await;
    if raw.status() != 200 {
        return Err(format!(
            "answered 200 but the raw body answers {}",
            raw.status()
        ));
    }
    let kept = raw.bytes().await.map_err(|error| error.to_string())?;
    let is_duplicate = matches!(duplicate.as_str(), "1" | "t");
    // Kept as sent; the API masks its secrets on the way out, whatever shape the body has.
    if !is_duplicate && kept[..] != m2m_listener::redact::redact(&body)[..] {
        return Err("answered 200 but the body is not kept byte for byte".to_owned());
    }
    Ok(())
}

#[test]
fn mutated_callbacks_never_get_a_5xx_and_no_acknowledged_body_is_lost() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = runtime.block_on(spawn_app());
    let config = ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest::test_runner::TestRunner::new(config)
        .run(
            &(
                0..FIXTURES.len(),
                proptest::collection::vec(mutation(), 1..4),
            ),
            |(index, mutations)| {
                let mut body = fixture(FIXTURES[index]);
                for mutation in &mutations {
                    apply(&mut body, mutation);
                }
                runtime
                    .block_on(post_and_check(&app, body))
                    .map_err(TestCaseError::fail)
            },
        )
        .unwrap();
}
