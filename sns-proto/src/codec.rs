//! The codec of every generated service: prost's encoding, with one change at the edge. A
//! message that does not decode (bad protobuf, a `string` field that is not UTF-8) is the
//! sender's mistake, so it is answered `INVALID_ARGUMENT` rather than prost's `INTERNAL`. The
//! decoding error is kept as the status's source: on the receiving side of a reply it tells a
//! broken peer from an answer (a source never travels over the wire).

use std::marker::PhantomData;
use std::sync::Arc;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// prost's codec, answering undecodable messages with `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct WireCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for WireCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = WireDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder { _type: PhantomData }
    }
}

/// Decodes `U` with prost; see [`WireCodec`].
#[derive(Debug, Clone, Default)]
pub struct WireDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for WireDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(undecodable)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The status of a message that does not decode.
fn undecodable(error: prost::DecodeError) -> Status {
    let mut status = Status::invalid_argument(format!("undecodable message: {error}"));
    status.set_source(Arc::new(error));
    status
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::csce438::Message as Post;

    #[test]
    fn an_undecodable_message_is_invalid_argument() {
        // Field 1 (`username`, a string) holding bytes that are not UTF-8.
        let bytes: &[u8] = &[0x0a, 0x02, 0xff, 0xfe];
        let status = undecodable(Post::decode(bytes).expect_err("not UTF-8"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("undecodable message: "),
            "{status:?}"
        );
        assert!(std::error::Error::source(&status).is_some());
    }
}
