//! Compiles the .proto files with `protox` (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/sns.proto",
        "proto/coordinator.proto",
        "proto/sns/v1/admin.proto",
        "proto/sns/v1/replication.proto",
        "proto/sns/v1/sync.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::WireCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
