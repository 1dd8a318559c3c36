//! Messages passed on as the bytes they arrived in. A synchronizer reads its cluster's events
//! and signs them, or opens another cluster's batch and applies it: it decodes each batch once,
//! to check it, and passes on the encoding it received instead of encoding the events again.
//!
//! Invariant: the bytes passed on decode to exactly the events checked (an [`EncodedBatch`] is
//! only made from bytes that decoded to its events, or by encoding them); they need not be the
//! canonical encoding, and the receiver decodes and checks them again.

use prost::Message as _;
use prost::bytes::{BufMut, Bytes};
use sns_proto::sns_v1::SyncBatch;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::events::{batch_from_wire, batch_to_wire};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::ids::ClusterId;

/// One origin's batch of events with its wire encoding (a `SyncBatch`), decoded once: what a
/// synchronizer signs or applies as it received it.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    origin: ClusterId,
    events: Vec<Event>,
    body: Bytes,
}

impl EncodedBatch {
    /// Decodes `body` (a `SyncBatch`) once, checking its shape as `Log.Apply` would.
    pub fn decode(body: Bytes) -> Result<Self> {
        let batch = SyncBatch::decode(body.clone())
            .map_err(|e| Error::Corrupt(format!("not a sync batch: {e}")))?;
        let origin = ClusterId::new(batch.origin)
            .ok_or_else(|| Error::Corrupt("a sync batch of cluster 0".to_string()))?;
        Ok(Self {
            origin,
            events: batch_from_wire(batch)?,
            body,
        })
    }

    /// `origin`'s `events`, encoded.
    pub fn encode(origin: ClusterId, events: Vec<Event>) -> Self {
        let body = Bytes::from(batch_to_wire(origin, &events).encode_to_vec());
        Self {
            origin,
            events,
            body,
        }
    }

    /// The cluster the batch says its events come from.
    pub fn origin(&self) -> ClusterId {
        self.origin
    }

    /// The events.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The encoding of the events.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The events, without their encoding.
    pub fn into_events(self) -> Vec<Event> {
        self.events
    }
}

/// A codec that moves message bodies as bytes, neither encoding nor decoding them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        use prost::bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::EventKind;
    use crate::ids::{EventId, Timestamp, UserId};

    fn posts(origin: u32, seqs: std::ops::RangeInclusive<u64>) -> Vec<Event> {
        let origin = ClusterId::new(origin).expect("cluster");
        seqs.map(|seq| Event {
            id: EventId { origin, seq },
            at: Timestamp(seq as i64),
            kind: EventKind::Posted {
                author: UserId::new(origin.get()).expect("user"),
                text: Arc::from(format!("post {seq}")),
                key: None,
            },
        })
        .collect()
    }

    #[test]
    fn a_decoded_batch_keeps_the_exact_bytes_it_came_in() {
        let encoded = EncodedBatch::encode(ClusterId::new(2).expect("cluster"), posts(2, 1..=3));
        let again = EncodedBatch::decode(encoded.body().clone()).expect("decodes");
        assert_eq!(again.events(), encoded.events());
        assert_eq!(again.body(), encoded.body());
    }

    #[test]
    fn bytes_that_are_not_a_valid_batch_are_refused() {
        assert!(EncodedBatch::decode(Bytes::from_static(b"\xff\xff\xff")).is_err());
        let mut holes = posts(2, 1..=1);
        holes.extend(posts(2, 3..=3));
        let body =
            Bytes::from(batch_to_wire(ClusterId::new(2).expect("cluster"), &holes).encode_to_vec());
        assert!(EncodedBatch::decode(body).is_err(), "not consecutive");
    }
}
