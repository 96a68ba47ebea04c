//! Links the bare-metal kernel binary with its linker script. Host builds (the
//! library and its unit tests) are left alone.
fn main() {
    println!("cargo:rerun-if-changed=kernel.ld");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target == "x86_64-unknown-none" {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-T{dir}/kernel.ld");
    }
}
