//! Reading the files a user names (scenario, `--kernel`, a scenario's
//! `path =`, a snapshot) without trusting them: only regular files are
//! read (a FIFO would block before any watchdog runs, `/dev/zero` would be
//! read until memory runs out), opened without blocking, and never more
//! than a cap that is checked against the file's real size first.

use std::fs::File;
use std::io::{Error, ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest scenario file read.
pub const MAX_SCENARIO_BYTES: u64 = 1 << 20;
/// Largest kernel or program ELF read.
pub const MAX_ELF_BYTES: u64 = 64 << 20;

/// Opens `path` for reading if it is a regular file (after symlinks), with
/// `O_NONBLOCK` so that opening a FIFO cannot hang; anything else is an
/// error that says what it is.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    };
    Err(Error::new(ErrorKind::InvalidInput, format!("{what}, not a regular file: refused")))
}

/// Reads the regular file at `path`, at most `max` bytes (a larger file is
/// an error naming both sizes).
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let length = file.metadata()?.len();
    let too_large = |length: u64| {
        Error::new(ErrorKind::InvalidInput, format!("{length} bytes, more than the {max} allowed"))
    };
    if length > max {
        return Err(too_large(length));
    }
    let mut bytes = Vec::with_capacity(length as usize);
    // The file may grow while it is read: never past the cap.
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_regular`] as UTF-8 text.
pub fn read_regular_text(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_regular(path, max)?)
        .map_err(|_| Error::new(ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_cap_are_read() {
        let dir = std::env::temp_dir().join(format!("superos-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("small");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read_regular(&file, 10).unwrap(), b"0123456789");
        let error = read_regular(&file, 9).unwrap_err().to_string();
        assert_eq!(error, "10 bytes, more than the 9 allowed");
        // A FIFO is refused at once (opening it does not wait for a writer).
        let fifo = dir.join("fifo");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo has no other precondition.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert!(read_regular(&fifo, 10).unwrap_err().to_string().starts_with("a FIFO, not a regular file"));
        assert!(read_regular(Path::new("/dev/zero"), 10)
            .unwrap_err()
            .to_string()
            .starts_with("a character device, not a regular file"));
        assert!(read_regular(&dir, 10).unwrap_err().to_string().starts_with("a directory"));
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert_eq!(read_regular_text(&file, 10).unwrap_err().to_string(), "not UTF-8 text");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
