//! What follows the first bad record of a segment: nothing that continues the log (a torn
//! tail, what an interrupted append leaves), or something no interrupted write makes (a whole,
//! checksummed record that is wrong, or valid records after the bad one), which is damage.
//! Pure: it reads only the segment's bytes.

use crate::event::LogEntry;
use crate::ids::LogIndex;
use crate::storage::file::format::{MAX_READ_RECORD_BYTES, RECORD_HEADER, parse_segment};

/// What follows the first bad record of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tail {
    /// Nothing that continues the log: what an interrupted append leaves.
    Torn,
    /// The bad record is whole and passes its checksum, yet does not decode or does not
    /// continue the log: no interrupted write makes that.
    BadRecord,
    /// A record that continues the log follows, at byte `offset`; `records` valid ones
    /// from there.
    ValidAfter { offset: usize, records: u64 },
}

/// Classifies what follows the bad record at byte `bad` of `bytes`, whose index should have
/// been `expected` (see the module documentation).
pub(super) fn classify(bytes: &[u8], bad: usize, expected: LogIndex) -> Tail {
    if whole_record(bytes, bad).is_some() {
        return Tail::BadRecord;
    }
    for offset in bad + 1..bytes.len() {
        let continues = whole_record(bytes, offset)
            .and_then(|payload| LogEntry::from_bytes(payload).ok())
            .filter(|entry| entry.index >= expected);
        if let Some(entry) = continues {
            let (found, _, _) = parse_segment(&bytes[offset..], entry.index);
            return Tail::ValidAfter {
                offset,
                records: found.len() as u64,
            };
        }
    }
    Tail::Torn
}

/// The payload of the record framed at byte `offset` of `bytes`, if it is whole (header and
/// body inside `bytes`), not empty, within the maximum length, and passes its checksum.
fn whole_record(bytes: &[u8], offset: usize) -> Option<&[u8]> {
    let header = bytes.get(offset..offset.checked_add(RECORD_HEADER)?)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_READ_RECORD_BYTES {
        return None;
    }
    let body = offset + RECORD_HEADER;
    let payload = bytes.get(body..body + len as usize)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}
