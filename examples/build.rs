//! Links the user programs at USER_IMAGE_BASE with `user.ld` when building for
//! the guest; host builds of the runtime library are left alone.
fn main() {
    println!("cargo:rerun-if-changed=user.ld");
    if std::env::var("TARGET").unwrap_or_default() == "x86_64-unknown-none" {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-T{dir}/user.ld");
    }
}
