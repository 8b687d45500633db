//! Compiles `sluice/v1/*.proto` with the pure-Rust `protox` compiler, so building
//! needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=sluice/v1/package.proto");
    let descriptors = protox::compile(["sluice/v1/package.proto"], ["."])?;
    prost_build::Config::new()
        // A snapshot package's text shares the reader's buffer.
        .bytes([".sluice.v1.Package.copy_text"])
        .compile_fds(descriptors)?;
    Ok(())
}
