//! Compiles `proto/` into Rust without a system `protoc`: protox parses the
//! files, tonic-prost-build generates the code, and the encoded descriptor
//! set is written next to it for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["tether/v1/tether.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // `file_descriptor_set_path` is ignored on the `compile_fds` path, so the
    // descriptor set that reflection serves is written here by hand.
    std::fs::write(
        out.join("tether_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Small per-call buffers: see `src/codec.rs`.
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    Ok(())
}
