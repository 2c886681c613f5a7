//! Compiles the kvproto definitions under `proto/` (copied unchanged from the `tikv-client`
//! 0.4.0 crate package, which ships them) with `protox` (no system `protoc`) and
//! `tonic-prost-build`: messages plus the `pdpb.PD` and `tikvpb.Tikv` servers. Methods the fake
//! does not implement answer `Unimplemented` (default stubs).

use std::path::PathBuf;

const PROTOS: &[&str] = &["pdpb.proto", "tikvpb.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed=build.rs");
    let fds = protox::compile(PROTOS, [dir.clone(), dir.join("include")])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .generate_default_stubs(true)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
