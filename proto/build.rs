//! Compiles the etcd v3 `.proto` files under `proto/` without a system `protoc`: `protox`
//! (a pure-Rust protobuf compiler) produces the descriptor set, `tonic-prost-build` turns it into
//! prost messages plus tonic clients and servers. The encoded descriptor set is also written to
//! `OUT_DIR/cairn_descriptor.bin` for `cairn_proto::FILE_DESCRIPTOR_SET`, and `pbjson-build`
//! generates serde `Serialize`/`Deserialize` impls (`OUT_DIR/<package>.serde.rs`) for the JSON
//! gateway.

use std::path::PathBuf;

use protox::prost::Message as _;

/// The files to compile, relative to the `proto/` include directory. Imports among them
/// (`mvccpb/kv.proto`, `authpb/auth.proto`, `etcdserverpb/rpc.proto`) resolve from there too.
const PROTOS: &[&str] = &[
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "etcdserverpb/rpc.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = manifest_dir.join("proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    println!("cargo:rerun-if-changed={}", proto_dir.display());
    for file in PROTOS {
        println!("cargo:rerun-if-changed={}", proto_dir.join(file).display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile(PROTOS, [&proto_dir])?;
    let encoded = fds.encode_to_vec();
    std::fs::write(out_dir.join("cairn_descriptor.bin"), &encoded)?;

    // serde impls in the JSON mapping etcd's gRPC gateway uses (proto field names, 64-bit
    // integers as strings, bytes as base64, enums by name, default values left out).
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[".mvccpb", ".authpb", ".etcdserverpb", ".v3lockpb", ".v3electionpb"])?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .emit_rerun_if_changed(false)
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
