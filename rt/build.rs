//! Makes the user-program linker script, `superos-user.ld`, findable by the
//! programs that depend on this crate: Cargo passes a dependency's link
//! search paths to the link of every binary above it, and the linker looks
//! up `-Tsuperos-user.ld` there (`.cargo/config.toml` of a program project,
//! as `superos-vmm new` writes it). `DEP_SUPEROS_RT_LINKER_SCRIPT` gives
//! its full path to a dependent's build script.
fn main() {
    println!("cargo:rerun-if-changed=superos-user.ld");
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:linker_script={dir}/superos-user.ld");
}
