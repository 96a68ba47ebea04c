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

/// The file name [`export`] gives the kernel's ELF.
pub const KERNEL_FILE_NAME: &str = "superos-kernel";

/// Writes the kernel's ELF ([`KERNEL_FILE_NAME`]) and every embedded
/// program's (under its name) into `dir`, creating it if missing; returns
/// the names written. A file of that name is replaced; anything else there
/// (a directory, a symbolic link) is an error, and nothing is written
/// through a link.
pub fn export(dir: &std::path::Path) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let images = std::iter::once((KERNEL_FILE_NAME, KERNEL_ELF)).chain(generated::PROGRAMS.iter().copied());
    let mut written = Vec::new();
    for (name, image) in images {
        let path = dir.join(name);
        if let Ok(metadata) = std::fs::symlink_metadata(&path) {
            if !metadata.file_type().is_file() {
                return Err(format!("{} exists and is not a regular file; not replacing it", path.display()));
            }
        }
        std::fs::write(&path, image).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(name.to_string());
    }
    Ok(written)
}
