//! The protobuf codec of Tether's own services: tonic's prost codec with
//! small starting buffers.
//!
//! tonic starts every call's encode and decode buffer at 8 KiB. A
//! heartbeat stream lives for hours and carries messages of a few dozen
//! bytes, so at ten thousand streams those buffers alone were most of a
//! head's memory. They still grow on demand for a large `ListWorkers`.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The starting size of each call's encode and decode buffer: a
/// `WorkerBeat` or a `HeadBeat` of the steady state is 30 to 60 bytes
/// with its 5-byte gRPC prefix. The first beat of a stream adopted on
/// open carries an assignment and grows its buffer once.
const BUFFER_BYTES: usize = 128;

/// Messages encoded before tonic yields to send them (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`tonic_prost::ProstCodec`] with `BUFFER_BYTES` buffers. Named in
/// `build.rs` as the codec of the generated services and clients.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
