//! Signed batches: what one synchronizer hands another (a RabbitMQ message's body, a message of
//! a `Sync.Subscribe` stream) is a `SignedBatch`, an encoded `SyncBatch` with a MAC over its
//! origin, its sequence range and its bytes, keyed from the deployment's cluster token.
//!
//! Invariants:
//! - **Verified before decoded.** [`open`] checks the MAC over the bytes as received before it
//!   decodes a single event, then checks that the decoded batch has the signed origin and
//!   range: a batch is applied only as its origin's synchronizer sealed it.
//! - **A key means every batch is signed.** A consumer with a key refuses an unsigned batch as
//!   it refuses a badly signed one ([`Refusal::BadMac`]). Without a key (no cluster token)
//!   batches go unsigned and are taken as they come: anyone who can publish can forge events.
//! - The key is `HMAC-SHA256(token, "`[`KEY_LABEL`]`")`, never the token itself, so a MAC
//!   tells nothing about the token that `Log` and `Sync` calls carry.

use hmac::{Hmac, KeyInit, Mac};
use prost::Message as _;
use sha2::Sha256;
use sns_proto::sns_v1::SignedBatch;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::grpc::raw::EncodedBatch;
use crate::ids::ClusterId;
use crate::sync::encode_batch;

/// The domain-separation label the batch key is derived with from the cluster token.
pub const KEY_LABEL: &str = "tiny-sns sync batch key v1";
/// What every MAC starts with: the protobuf message it signs.
const MAC_LABEL: &[u8] = b"sns.v1.SignedBatch";
/// Bytes in a MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// The key that signs and checks a deployment's sync batches, derived from its cluster token.
#[derive(Clone)]
pub struct SyncKey {
    key: [u8; MAC_LEN],
}

impl std::fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncKey(..)")
    }
}

impl SyncKey {
    /// The key of the deployment whose cluster token is `token`:
    /// `HMAC-SHA256(key = token, message = KEY_LABEL)`.
    pub fn from_token(token: &str) -> Self {
        let mut mac = hmac(token.as_bytes());
        mac.update(KEY_LABEL.as_bytes());
        Self {
            key: mac.finalize().into_bytes().into(),
        }
    }

    /// The MAC state over a batch's signed fields: the label, the origin, the range, the bytes.
    fn mac(&self, origin: u32, first: u64, last: u64, batch: &[u8]) -> HmacSha256 {
        let mut mac = hmac(&self.key);
        mac.update(MAC_LABEL);
        mac.update(&origin.to_be_bytes());
        mac.update(&first.to_be_bytes());
        mac.update(&last.to_be_bytes());
        mac.update(batch);
        mac
    }
}

fn hmac(key: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length: a longer one is hashed, a shorter one padded.
    match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    }
}

/// Why a signed batch was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The consumer has a key and the batch has no MAC, or one that does not match it: a
    /// forgery, a batch altered on the way, or a peer with another cluster token.
    #[error("a sync batch with a missing or bad MAC: {0}")]
    BadMac(String),
    /// The batch is not one its origin could have sent: it does not decode, or does not hold
    /// the origin and range it was signed for.
    #[error("not a valid sync batch: {0}")]
    Invalid(Error),
}

/// `origin`'s `events` (consecutive, oldest first, at least one) as a [`SignedBatch`], signed
/// with `key` (unsigned, with an empty MAC, without one).
pub fn seal(key: Option<&SyncKey>, origin: ClusterId, events: &[Event]) -> Result<SignedBatch> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Err(Error::invalid("an empty batch is not sealed"));
    };
    Ok(seal_body(
        key,
        origin,
        (first.id.seq, last.id.seq),
        encode_batch(origin, events),
    ))
}

/// [`seal`] for a batch in the encoding it arrived in: the bytes are signed as they are.
pub fn seal_encoded(key: Option<&SyncKey>, batch: &EncodedBatch) -> Result<SignedBatch> {
    let events = batch.events();
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Err(Error::invalid("an empty batch is not sealed"));
    };
    Ok(seal_body(
        key,
        batch.origin(),
        (first.id.seq, last.id.seq),
        batch.body().to_vec(),
    ))
}

/// Signs `batch`, the encoding of `origin`'s events `first..=last`.
fn seal_body(
    key: Option<&SyncKey>,
    origin: ClusterId,
    (first, last): (u64, u64),
    batch: Vec<u8>,
) -> SignedBatch {
    let mac = match key {
        Some(key) => key
            .mac(origin.get(), first, last, &batch)
            .finalize()
            .into_bytes()
            .to_vec(),
        None => Vec::new(),
    };
    SignedBatch {
        origin: origin.get(),
        first,
        last,
        batch,
        mac,
    }
}

/// [`seal`], encoded: the body of a RabbitMQ message.
pub fn seal_bytes(key: Option<&SyncKey>, origin: ClusterId, events: &[Event]) -> Result<Vec<u8>> {
    Ok(seal(key, origin, events)?.encode_to_vec())
}

/// The origin and events of a [`SignedBatch`]: with a key, only if its MAC is there and
/// matches (checked before anything else); then only if the batch decodes (checked as
/// `Log.Apply` checks one) and holds the origin and range it was signed for.
pub fn open(
    key: Option<&SyncKey>,
    signed: SignedBatch,
) -> std::result::Result<(ClusterId, Vec<Event>), Refusal> {
    let batch = open_encoded(key, signed)?;
    Ok((batch.origin(), batch.into_events()))
}

/// [`open`], keeping the batch's encoding, to be applied as it arrived.
pub fn open_encoded(
    key: Option<&SyncKey>,
    signed: SignedBatch,
) -> std::result::Result<EncodedBatch, Refusal> {
    let SignedBatch {
        origin,
        first,
        last,
        batch,
        mac,
    } = signed;
    if let Some(key) = key {
        if mac.is_empty() {
            return Err(Refusal::BadMac(format!(
                "batch {origin}:{first}-{last} is not signed"
            )));
        }
        key.mac(origin, first, last, &batch)
            .verify_slice(&mac)
            .map_err(|_| {
                Refusal::BadMac(format!(
                    "the MAC of batch {origin}:{first}-{last} does not match"
                ))
            })?;
    }
    let decoded = EncodedBatch::decode(batch.into()).map_err(Refusal::Invalid)?;
    let decoded_origin = decoded.origin();
    let events = decoded.events();
    let range = events
        .first()
        .zip(events.last())
        .map(|(f, l)| (f.id.seq, l.id.seq));
    if decoded_origin.get() != origin || range != Some((first, last)) {
        let held = match range {
            Some((f, l)) => format!("{decoded_origin}:{f}-{l}"),
            None => format!("no event of cluster {decoded_origin}"),
        };
        return Err(Refusal::Invalid(Error::Corrupt(format!(
            "a batch signed as {origin}:{first}-{last} holds {held}"
        ))));
    }
    Ok(decoded)
}

/// [`open`] for the bytes of a [`SignedBatch`] (a RabbitMQ message's body).
pub fn open_bytes(
    key: Option<&SyncKey>,
    bytes: &[u8],
) -> std::result::Result<(ClusterId, Vec<Event>), Refusal> {
    let batch = open_bytes_encoded(key, bytes)?;
    Ok((batch.origin(), batch.into_events()))
}

/// [`open_bytes`], keeping the batch's encoding, to be applied as it arrived.
pub fn open_bytes_encoded(
    key: Option<&SyncKey>,
    bytes: &[u8],
) -> std::result::Result<EncodedBatch, Refusal> {
    let signed = SignedBatch::decode(bytes)
        .map_err(|e| Refusal::Invalid(Error::Corrupt(format!("not a signed sync batch: {e}"))))?;
    open_encoded(key, signed)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::EventKind;
    use crate::ids::{EventId, Timestamp, UserId};

    fn two() -> ClusterId {
        ClusterId::new(2).expect("cluster")
    }

    fn posts(seqs: std::ops::RangeInclusive<u64>) -> Vec<Event> {
        seqs.map(|seq| Event {
            id: EventId { origin: two(), seq },
            at: Timestamp(seq as i64),
            kind: EventKind::Posted {
                author: UserId::new(2).expect("user"),
                text: Arc::from(format!("post {seq}")),
                key: None,
            },
        })
        .collect()
    }

    fn key() -> SyncKey {
        SyncKey::from_token("s3cret")
    }

    #[test]
    fn a_sealed_batch_opens_with_the_key() {
        let events = posts(41..=43);
        let bytes = seal_bytes(Some(&key()), two(), &events).expect("seal");
        let (origin, got) = open_bytes(Some(&key()), &bytes).expect("opens");
        assert_eq!(origin, two());
        assert_eq!(got, events);
        let signed = seal(Some(&key()), two(), &events).expect("seal");
        assert_eq!((signed.origin, signed.first, signed.last), (2, 41, 43));
        assert_eq!(signed.mac.len(), MAC_LEN);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let signed = seal(Some(&key()), two(), &posts(41..=43)).expect("seal");
        let mut altered = Vec::new();
        let mut batch = signed.clone();
        let middle = batch.batch.len() / 2;
        batch.batch[middle] ^= 0x01;
        altered.push(("payload", batch));
        let mut origin = signed.clone();
        origin.origin ^= 0x01;
        altered.push(("origin", origin));
        let mut first = signed.clone();
        first.first ^= 0x01;
        altered.push(("first", first));
        let mut last = signed.clone();
        last.last ^= 0x01;
        altered.push(("last", last));
        let mut mac = signed.clone();
        mac.mac[0] ^= 0x80;
        altered.push(("mac", mac));
        let mut short = signed;
        short.mac.truncate(16);
        altered.push(("truncated mac", short));
        for (what, batch) in altered {
            let refused = open(Some(&key()), batch);
            assert!(
                matches!(refused, Err(Refusal::BadMac(_))),
                "a flipped {what}: {refused:?}"
            );
        }
    }

    #[test]
    fn another_key_or_no_mac_is_refused_when_keyed() {
        let events = posts(1..=2);
        let other = SyncKey::from_token("guess");
        let forged = seal(Some(&other), two(), &events).expect("seal");
        assert!(matches!(
            open(Some(&key()), forged),
            Err(Refusal::BadMac(_))
        ));
        let unsigned = seal(None, two(), &events).expect("seal");
        assert!(unsigned.mac.is_empty());
        assert!(matches!(
            open(Some(&key()), unsigned.clone()),
            Err(Refusal::BadMac(m)) if m.contains("not signed")
        ));
        // Without a key, as in a deployment without a cluster token, it is taken.
        let (_, got) = open(None, unsigned).expect("unkeyed consumers take unsigned batches");
        assert_eq!(got, events);
    }

    #[test]
    fn a_batch_signed_for_another_range_or_origin_is_refused() {
        let k = key();
        // Correctly signed, but the header does not describe the batch.
        let batch = encode_batch(two(), &posts(5..=6));
        let lying = |origin: u32, first: u64, last: u64| SignedBatch {
            origin,
            first,
            last,
            mac: k
                .mac(origin, first, last, &batch)
                .finalize()
                .into_bytes()
                .to_vec(),
            batch: batch.clone(),
        };
        for (origin, first, last) in [(2, 5, 7), (2, 4, 6), (3, 5, 6)] {
            let refused = open(Some(&k), lying(origin, first, last));
            assert!(
                matches!(refused, Err(Refusal::Invalid(_))),
                "{origin}:{first}-{last}: {refused:?}"
            );
        }
        assert!(open(Some(&k), lying(2, 5, 6)).is_ok());
        assert!(matches!(
            open_bytes(Some(&k), b"\xff\x00 garbage"),
            Err(Refusal::Invalid(_))
        ));
        assert!(seal(Some(&k), two(), &[]).is_err());
    }

    #[test]
    fn the_key_and_mac_are_as_documented() {
        // Computed independently (Python's hmac module) from the layout in the proto file.
        let k = key();
        assert_eq!(
            hex(&k.key),
            "876325354ac2102f7b403d833c134fa4bbef1c73dce209822eca0651ab14079b"
        );
        let mac = k.mac(2, 41, 43, b"\x08\x02").finalize().into_bytes();
        assert_eq!(
            hex(&mac),
            "f081ab7eda4c10507111d8ce8bfb372ec8cc460a87d60075b92e3dd45ec376bf"
        );
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_key_depends_on_the_token_and_is_not_shown() {
        assert_ne!(SyncKey::from_token("a").key, SyncKey::from_token("b").key);
        assert_eq!(SyncKey::from_token("a").key, SyncKey::from_token("a").key);
        assert_eq!(format!("{:?}", key()), "SyncKey(..)");
    }

    #[test]
    fn a_batch_signed_as_it_arrived_is_the_batch_signed_from_its_events() {
        let events = posts(1..=3);
        let encoded = EncodedBatch::encode(two(), events.clone());
        let from_events = seal(Some(&key()), two(), &events).expect("sealed");
        let as_arrived = seal_encoded(Some(&key()), &encoded).expect("sealed");
        assert_eq!(as_arrived, from_events);
        let opened = open_encoded(Some(&key()), from_events).expect("opens");
        assert_eq!(
            opened.body(),
            encoded.body(),
            "the encoding is kept as it came"
        );
        assert_eq!(opened.events(), &events[..]);
    }
}
