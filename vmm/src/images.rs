//! The guest images built by `build.rs`: the kernel, the example programs and
//! the example scenarios, embedded in the binary so `superos-vmm run` needs no
//! files.

mod generated {
    include!(concat!(env!("OUT_DIR"), "/guest_images.rs"));
}

pub use generated::KERNEL_ELF;

/// The ELF image of the embedded program `name`.
pub fn program(name: &str) -> Option<&'static [u8]> {
    generated::PROGRAMS.iter().find(|(n, _)| *n == name).map(|(_, image)| *image)
}

/// The usage string a program declared with `superos_rt::entry!(main,
/// "...")`: what follows `superos_rt::USAGE_MARKER` in its image, up to a
/// NUL byte (`None` if it declares none).
pub fn usage(image: &[u8]) -> Option<String> {
    const MARKER: &[u8] = b"\0superos-usage:";
    let at = image.windows(MARKER.len()).position(|w| w == MARKER)? + MARKER.len();
    let rest = &image[at..];
    let end = rest.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Names of the embedded programs, sorted.
pub fn program_names() -> Vec<&'static str> {
    generated::PROGRAMS.iter().map(|(n, _)| *n).collect()
}

/// The TOML text of the embedded scenario `name`.
pub fn scenario(name: &str) -> Option<&'static str> {
    generated::SCENARIOS.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

/// Names of the embedded scenarios, sorted.
pub fn scenario_names() -> Vec<&'static str> {
    generated::SCENARIOS.iter().map(|(n, _)| *n).collect()
}
