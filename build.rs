//! Generates the prost types of the ONNX schema from proto/onnx.proto3 without protoc: protox parses the
//! file into a descriptor set and prost-build turns it into Rust. `bytes` fields become `bytes::Bytes`, so
//! tensor payloads decoded from a memory-mapped file are slices of the map, not copies.

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto3");
    let descriptors = protox::compile(["proto/onnx.proto3"], ["proto"])
        .unwrap_or_else(|e| panic!("cannot parse proto/onnx.proto3: {e}"));
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("cannot generate the ONNX types: {e}"));
}
