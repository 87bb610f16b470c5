//! Compiles every `.proto` under `billing/` with protox, a pure-Rust protobuf compiler, so a
//! fresh machine needs no system `protoc`. The encoded descriptor set is kept for server
//! reflection.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "billing/common/v1/common.proto",
        "billing/wallet/v1/wallet.proto",
        "billing/subscription/v1/subscription.proto",
        "billing/reseller/v1/reseller.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("billing_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .btree_map(".")
        // Malformed requests are INVALID_ARGUMENT, not prost's INTERNAL (src/codec.rs).
        .codec_path("crate::codec::ProtoCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
