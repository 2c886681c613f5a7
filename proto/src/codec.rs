//! The gRPC codec every generated client and server uses: prost's, with smaller buffers.
//!
//! tonic starts each message's encode buffer, and each call's decode buffer, at 8 KiB. An etcd
//! request or reply is usually a few hundred bytes. glibc's per-thread cache holds chunks up to
//! about 1 KiB; a bigger request goes to its bins, which first fold freed small chunks back
//! together (`malloc_consolidate`). With one such buffer each way per call, that path showed in
//! a runtime worker's profile under many small puts. Buffers start below that size here and
//! grow as tonic's do when a message needs more.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec as TonicCodec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Starting size of an encode or decode buffer: below glibc's smallest large-bin chunk
/// (1024 bytes including its 8-byte header).
pub const BUFFER_SIZE: usize = 1000;

/// How many encoded bytes a stream buffers before it yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// prost's codec with [`BUFFER_SIZE`] buffers (`codec_path` of the generated code).
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
