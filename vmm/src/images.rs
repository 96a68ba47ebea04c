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
