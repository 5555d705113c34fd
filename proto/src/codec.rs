//! The codec every generated client and server uses: prost's, with smaller first buffers than
//! tonic's default; and [`RawCodec`], which passes encoded messages through as bytes.
//!
//! tonic gives every call (and every stream, for its life) an 8 KiB buffer to encode into
//! and another to decode from. Our messages are mostly a few hundred bytes: a submit, an
//! Assign, a result of a no-op. An idle agent stream held four such buffers in the gateway
//! (two on each side of it) and two in the shard. Buffers still grow to any message's size
//! (up to the message limits set on each service): a decoder reserves the length a message's
//! header gives, and our encoder reserves the message's length before it writes, so a large
//! message (a coalesced Enqueue of 512 tasks) is not copied through a series of doublings.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder};

/// The first capacity of a call's encode and decode buffers.
pub const FIRST_BUFFER_BYTES: usize = 1024;

/// How many encoded bytes a streaming call gathers before it yields to send them (tonic's
/// default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(FIRST_BUFFER_BYTES, YIELD_THRESHOLD)
}

/// [`ProstCodec`] with [`FIRST_BUFFER_BYTES`]; named by `codec_path` in build.rs.
#[derive(Debug, Clone)]
pub struct PmCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for PmCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for PmCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = PmEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        PmEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

/// prost's encoding into a buffer made large enough for the message first.
#[derive(Debug, Clone)]
pub struct PmEncoder<T>(PhantomData<T>);

impl<T: prost::Message> Encoder for PmEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

/// Messages as their encoded bytes, neither decoded nor re-encoded: what the gateway forwards
/// of an agent's stream after Hello ([`crate::raw`]). Decoding takes the message's bytes out
/// of the receive buffer without a copy; tonic still enforces the message size limits.
#[derive(Debug, Clone, Default)]
pub struct RawCodec;

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

    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put(item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
