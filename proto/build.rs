//! Compiles `sluice/v1/*.proto` with the pure-Rust `protox` compiler, so building
//! needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=sluice/v1/package.proto");
    let descriptors = protox::compile(["sluice/v1/package.proto"], ["."])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
