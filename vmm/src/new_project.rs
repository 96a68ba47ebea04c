//! `superos-vmm new DIR`: a ready program project outside this repository
//! (issue 15). It depends on the user runtime `superos-rt` by path, builds
//! with a plain `cargo build --release` (its `.cargo/config.toml` picks the
//! target, the relocation model and the runtime's linker script) and runs
//! with `superos-vmm run DIR/scenario.toml`, without rebuilding the VMM. The
//! program it writes is the embedded example `starter`, so every build of
//! the VMM compiles it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// `superos-vmm new`'s arguments.
#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// The project's folder: created; if it exists it must be empty.
    pub dir: PathBuf,
    /// The package (and program) name. Default: the folder's name.
    #[arg(long)]
    pub name: Option<String>,
    /// The `superos-rt` crate to depend on (a folder with its Cargo.toml).
    /// Default: `rt/` of the checkout this VMM was built from.
    #[arg(long, value_name = "DIR")]
    pub rt: Option<PathBuf>,
}

/// Where the runtime was when this VMM was built.
const BUILT_RT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../rt");

/// The program (the embedded example `starter`, word for word).
const MAIN_RS: &str = include_str!("../../examples/src/bin/starter.rs");
/// The build settings every SuperOS program project needs.
const CARGO_CONFIG: &str = include_str!("../../examples/.cargo/config.toml");

/// Why no project was written.
#[derive(Debug, Error)]
pub enum NewError {
    /// The name cannot be a Cargo package name.
    #[error(
        "{0:?} cannot name a program: use 1 to 64 ASCII letters, digits, '-' or '_', starting \
         with a letter (or pass --name)"
    )]
    BadName(String),
    /// No runtime where it was looked for.
    #[error(
        "no superos-rt crate at {} (has the checkout this VMM was built from moved?); pass --rt \
         PATH/TO/superos/rt",
        .0.display()
    )]
    NoRuntime(PathBuf),
    /// The folder exists and holds something.
    #[error("{} exists and is not empty", .0.display())]
    NotEmpty(PathBuf),
    /// Creating or writing a file failed.
    #[error("cannot write {}: {}", .0.display(), .1)]
    Io(PathBuf, io::Error),
}

/// Checks `name` as a package name: what Cargo accepts, kept simple.
fn check_name(name: &str) -> Result<(), NewError> {
    let mut chars = name.chars();
    let good = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.len() <= 64;
    if good {
        Ok(())
    } else {
        Err(NewError::BadName(name.to_string()))
    }
}

/// The files of a project named `name` depending on the runtime at `rt`:
/// (path inside the project, contents).
pub fn files(name: &str, rt: &Path) -> Vec<(&'static str, String)> {
    // A process name holds at most NAME_LEN bytes.
    let process = &name[..name.len().min(superos_protocol::boot::NAME_LEN)];
    // TOML basic strings: the path's backslashes and quotes escaped.
    let rt = rt.display().to_string().replace('\\', "\\\\").replace('"', "\\\"");
    vec![
        (
            "Cargo.toml",
            format!(
                "[package]\n\
                 name = \"{name}\"\n\
                 version = \"0.1.0\"\n\
                 edition = \"2021\"\n\
                 publish = false\n\
                 \n\
                 [dependencies]\n\
                 # The SuperOS user runtime: system calls, console, entry point, panic\n\
                 # handler, and the linker script (see .cargo/config.toml). Its calls are\n\
                 # described in docs/PROGRAMMING.md of the SuperOS repository and by\n\
                 # `cargo doc --open` here. A git dependency works too:\n\
                 # superos-rt = {{ git = \"https://example.org/superos.git\" }}\n\
                 superos-rt = {{ path = \"{rt}\" }}\n\
                 \n\
                 # A project of its own, even inside another workspace's folder.\n\
                 [workspace]\n"
            ),
        ),
        (".cargo/config.toml", CARGO_CONFIG.to_string()),
        ("src/main.rs", MAIN_RS.to_string()),
        (
            "scenario.toml",
            format!(
                "# `superos-vmm run scenario.toml` after `cargo build --release`.\n\
                 description = \"{name}: a program of its own, the isolation invariants checked at every kernel event\"\n\
                 \n\
                 [vm]\n\
                 check = \"every-event\"\n\
                 \n\
                 [[process]]\n\
                 name = \"{process}\"\n\
                 path = \"target/x86_64-unknown-none/release/{name}\"\n\
                 args = \"name=SuperOS\"\n\
                 expect = {{ exit = 0 }}\n"
            ),
        ),
        (".gitignore", "/target\n".to_string()),
    ]
}

/// Writes the project; returns its name.
pub fn create(args: &NewArgs) -> Result<String, NewError> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => args
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| args.dir.display().to_string()),
    };
    check_name(&name)?;
    let rt = args.rt.clone().unwrap_or_else(|| PathBuf::from(BUILT_RT));
    let rt = rt
        .canonicalize()
        .ok()
        .filter(|rt| rt.join("Cargo.toml").is_file())
        .ok_or_else(|| NewError::NoRuntime(rt.clone()))?;
    match fs::read_dir(&args.dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(NewError::NotEmpty(args.dir.clone()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(NewError::Io(args.dir.clone(), e)),
    }
    for (relative, contents) in files(&name, &rt) {
        let path = args.dir.join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| NewError::Io(parent.to_path_buf(), e))?;
        }
        fs::write(&path, contents).map_err(|e| NewError::Io(path.clone(), e))?;
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["hello", "my-program", "a_1", "x"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1st", "-x", "has space", "dots.no", "ünï", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_files_parse_and_name_the_program() {
        let files = files("my-program", Path::new("/src/super\"os/rt"));
        let manifest: toml::Table = toml::from_str(&files[0].1).unwrap();
        assert_eq!(manifest["package"]["name"].as_str(), Some("my-program"));
        assert_eq!(manifest["dependencies"]["superos-rt"]["path"].as_str(), Some("/src/super\"os/rt"));
        let scenario = crate::scenario::Scenario::parse(&files[3].1, "scenario.toml", Path::new("."));
        // The program is not built here: the path is what must be right.
        let error = scenario.unwrap_err().to_string();
        assert!(error.contains("target/x86_64-unknown-none/release/my-program"), "{error}");
        assert!(files[2].1.contains("superos_rt::entry!(main"));
    }

    #[test]
    fn a_long_name_is_cut_to_a_process_name() {
        let name = "a".repeat(60);
        let scenario = &files(&name, Path::new("/rt"))[3].1;
        let process = format!("name = \"{}\"", "a".repeat(superos_protocol::boot::NAME_LEN));
        assert!(scenario.contains(&process), "{scenario}");
    }

    #[test]
    fn an_existing_folder_must_be_empty_and_the_runtime_must_exist() {
        let dir = std::env::temp_dir().join(format!("superos-new-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("keep"), "mine").unwrap();
        let args = NewArgs { dir: dir.clone(), name: Some("p".into()), rt: None };
        assert!(matches!(create(&args), Err(NewError::NotEmpty(_))));
        assert_eq!(fs::read_to_string(dir.join("keep")).unwrap(), "mine");
        let args = NewArgs { dir: dir.join("sub"), name: None, rt: Some(dir.join("nowhere")) };
        assert!(matches!(create(&args), Err(NewError::NoRuntime(_))));
        assert!(!dir.join("sub").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
