//! Compiles `proto/` (the project's own protobuf definitions) into Rust.
//!
//! protox parses the files in pure Rust, so building needs no system `protoc`;
//! tonic-prost-build generates the messages, the `Admin` server and a client
//! (the client is what `telespool status`, `telespool top` and the tests use).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let admin = "proto/telespool/admin/v1/admin.proto";
    println!("cargo:rerun-if-changed={admin}");
    let files = protox::compile([admin], ["proto"])?;
    tonic_prost_build::configure()
        // `telespool status --json` prints the snapshot with the proto's field names.
        .type_attribute(".telespool.admin.v1", "#[derive(serde::Serialize)]")
        .field_attribute(
            ".telespool.admin.v1.Status.phase",
            "#[serde(serialize_with = \"crate::api::json::phase\")]",
        )
        .compile_fds(files)?;
    Ok(())
}
