//! Compiles `proto/fedhcc.proto` with protox (pure Rust: no `protoc` binary needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/fedhcc.proto");
    let fds = protox::compile(["proto/fedhcc.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).bytes(".fedhcc.v1").compile_fds(fds)?;
    Ok(())
}
