//! The generated protocol code and the descriptor set that reflection
//! serves. Nothing else in the crate touches codegen paths.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("tether.v1");

/// The encoded `FileDescriptorSet` of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tether_descriptor.bin"));
