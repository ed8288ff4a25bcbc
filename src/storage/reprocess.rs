//! `reprocess`: the current parser over stored raw bodies of quarantined deliveries. What both
//! backends share: the selection, what a stored body becomes, and the report. Each backend
//! reads and locks the rows, and writes what is decided here through its own write path (the
//! same one callbacks take, so outcomes, job counters and states move exactly as if the body
//! had been read when it arrived).

use serde::Serialize;
use time::OffsetDateTime;

use super::{DeliveryContent, NewDelivery};
use crate::domain::{Callback, CallbackKind};
use crate::metrics::CallbackTally;
use crate::parser::{self, Parsed};

/// Which deliveries to read again. Only quarantined first deliveries are: a stored one was read
/// already (its outcomes are facts that were acted on), a duplicate has no body of its own.
#[derive(Clone, Debug, Default)]
pub struct ReprocessQuery {
    /// These deliveries (any that is not quarantined is reported as skipped; one that does not
    /// exist as such).
    pub ids: Vec<i64>,
    /// Those the current parser reads as this kind (`nidd`, `carrier_service`...).
    pub kind: Option<CallbackKind>,
    /// Those received at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Decide and report, write nothing.
    pub dry_run: bool,
}

/// What reprocess did (or, on a dry run, would do) with each delivery it looked at.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReprocessReport {
    pub dry_run: bool,
    /// Read and stored: their outcomes are stored, their jobs moved.
    pub stored: usize,
    /// Read, and found to be re-deliveries of a message stored since.
    pub duplicates: usize,
    /// Still unreadable (the reason is updated if it changed).
    pub quarantined: usize,
    /// Not quarantined, or not of the kind asked for: left as they are.
    pub skipped: usize,
    pub items: Vec<ReprocessItem>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReprocessItem {
    pub delivery_id: i64,
    /// `stored`, `duplicate`, `quarantined` or `skipped`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// Why it is still quarantined, or why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the edge counts for a stored one, as for a callback that arrived stored.
    #[serde(skip)]
    pub tally: Option<CallbackTally>,
}

impl ReprocessReport {
    pub(crate) fn add(&mut self, item: ReprocessItem) {
        match item.result {
            "stored" => self.stored += 1,
            "duplicate" => self.duplicates += 1,
            "quarantined" => self.quarantined += 1,
            _ => self.skipped += 1,
        }
        self.items.push(item);
    }

    pub(crate) fn skipped(&mut self, delivery_id: i64, reason: impl Into<String>) {
        self.add(ReprocessItem {
            delivery_id,
            result: "skipped",
            duplicate_of: None,
            kind: None,
            reason: Some(reason.into()),
            tally: None,
        });
    }
}

/// A quarantined delivery as stored, to be read again.
pub(crate) struct StoredQuarantine {
    pub received_at: OffsetDateTime,
    pub content_type: Option<String>,
    pub source_address: Option<String>,
    pub account: Option<String>,
    pub parse_error: Option<String>,
    pub body: Vec<u8>,
}

/// What the current parser makes of a stored body.
pub(crate) enum Reread {
    /// Still unreadable; `changed` when the reason is not the one stored.
    Unreadable { reason: String, changed: bool },
    /// Readable, but not of the kind asked for.
    OtherKind(CallbackKind),
    /// Readable: the delivery as it would have been had it been read when it arrived.
    Readable(Box<NewDelivery>),
}

impl StoredQuarantine {
    pub fn reread(self, kind: Option<CallbackKind>) -> Reread {
        match parser::parse(&self.body) {
            Parsed::Unreadable(unreadable) => Reread::Unreadable {
                changed: self.parse_error.as_deref() != Some(unreadable.reason.as_str()),
                reason: unreadable.reason,
            },
            Parsed::Callback(callback) if kind.is_some_and(|kind| kind != callback.kind) => {
                Reread::OtherKind(callback.kind)
            }
            Parsed::Callback(callback) => Reread::Readable(Box::new(NewDelivery {
                received_at: self.received_at,
                body: self.body.into(),
                content_type: self.content_type,
                source_address: self.source_address,
                account: self.account,
                content: DeliveryContent::Callback(callback),
                prepared: Default::default(),
            })),
        }
    }
}

/// The report line of a delivery that was read: stored, or a re-delivery of `duplicate_of`.
pub(crate) fn read_item(
    delivery_id: i64,
    callback: &Callback,
    duplicate_of: Option<i64>,
    job_operation: Option<crate::domain::Operation>,
) -> ReprocessItem {
    let tally = CallbackTally::of(callback);
    ReprocessItem {
        delivery_id,
        result: if duplicate_of.is_some() {
            "duplicate"
        } else {
            "stored"
        },
        duplicate_of,
        kind: Some(callback.kind.as_str()),
        reason: None,
        tally: duplicate_of.is_none().then(|| match job_operation {
            Some(operation) => tally.under(operation),
            None => tally,
        }),
    }
}

/// The report line of a delivery still unreadable.
pub(crate) fn unreadable_item(delivery_id: i64, reason: String) -> ReprocessItem {
    ReprocessItem {
        delivery_id,
        result: "quarantined",
        duplicate_of: None,
        kind: None,
        reason: Some(reason),
        tally: None,
    }
}

/// A parameter of [`selection`]'s clause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Selected {
    Id(i64),
    Since(String),
}

/// The deliveries a run looks at, as a `WHERE` clause over `deliveries d` with `placeholder(n)`
/// for the n-th parameter (from 1), and the parameters' values.
pub(crate) fn selection(
    query: &ReprocessQuery,
    placeholder: impl Fn(usize) -> String,
) -> (String, Vec<Selected>) {
    let mut values = Vec::new();
    let mut clause = String::new();
    if query.ids.is_empty() {
        clause.push_str("d.duplicate_of IS NULL AND d.result = 'quarantined'");
    } else {
        let list: Vec<String> = query
            .ids
            .iter()
            .map(|id| {
                values.push(Selected::Id(*id));
                placeholder(values.len())
            })
            .collect();
        // Named deliveries are looked at whatever they are, so that one read already (or found
        // to be a re-delivery) is reported as skipped, not as unknown.
        clause.push_str(&format!("d.id IN ({})", list.join(", ")));
    }
    if let Some(since) = query.since {
        values.push(Selected::Since(super::timestamp(since)));
        clause.push_str(&format!(
            " AND d.received_at >= {}",
            placeholder(values.len())
        ));
    }
    (clause, values)
}

/// The most deliveries one run looks at (the CLI and API can be run again for the rest).
pub const MAX_PER_RUN: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selection_is_quarantined_deliveries_unless_ids_are_named() {
        let (clause, values) = selection(&ReprocessQuery::default(), |n| format!("?{n}"));
        assert_eq!(
            clause,
            "d.duplicate_of IS NULL AND d.result = 'quarantined'"
        );
        assert!(values.is_empty());
        let query = ReprocessQuery {
            ids: vec![4, 9],
            since: Some(OffsetDateTime::UNIX_EPOCH),
            ..ReprocessQuery::default()
        };
        let (clause, values) = selection(&query, |n| format!("${n}"));
        assert_eq!(clause, "d.id IN ($1, $2) AND d.received_at >= $3");
        assert_eq!(
            values,
            [
                Selected::Id(4),
                Selected::Id(9),
                Selected::Since("1970-01-01T00:00:00.000000Z".to_owned())
            ]
        );
    }
}
