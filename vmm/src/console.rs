//! The guest console: bytes from the kernel and from each process, split into
//! lines per source, made safe to print (control characters escaped), and
//! labelled with who wrote them.

use std::collections::BTreeMap;

/// Longest line kept before it is cut and emitted.
const MAX_LINE: usize = 4096;

/// One complete console line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleLine {
    /// 0 for the kernel, else the writing process's pid.
    pub pid: u32,
    /// The line, without its newline, with control characters escaped.
    pub text: String,
}

/// Sources with an unterminated line kept at once. A write from one more
/// source first emits every unterminated line as it is (cut short), so the
/// partial lines never hold more than `MAX_SOURCES * MAX_LINE` bytes
/// whatever pids the kernel makes up.
pub const MAX_SOURCES: usize = 64;

/// Per-source line assembly.
#[derive(Debug, Default)]
pub struct Console {
    partial: BTreeMap<u32, Vec<u8>>,
}

impl Console {
    /// Adds bytes from `pid`; returns the lines they complete.
    pub fn push(&mut self, pid: u32, bytes: &[u8]) -> Vec<ConsoleLine> {
        let mut lines = Vec::new();
        if !self.partial.contains_key(&pid) && self.partial.len() >= MAX_SOURCES {
            lines = self.flush();
        }
        let pending = self.partial.entry(pid).or_default();
        for &byte in bytes {
            if byte == b'\n' || pending.len() >= MAX_LINE {
                lines.push(ConsoleLine { pid, text: sanitize(pending) });
                pending.clear();
                if byte == b'\n' {
                    continue;
                }
            }
            pending.push(byte);
        }
        if pending.is_empty() {
            self.partial.remove(&pid);
        }
        lines
    }

    /// Emits every unterminated line (at the end of a run).
    pub fn flush(&mut self) -> Vec<ConsoleLine> {
        let partial = std::mem::take(&mut self.partial);
        partial
            .into_iter()
            .filter(|(_, bytes)| !bytes.is_empty())
            .map(|(pid, bytes)| ConsoleLine { pid, text: sanitize(&bytes) })
            .collect()
    }
}

/// Decodes guest bytes as UTF-8 (lossily) and escapes control characters so
/// a guest cannot drive the host terminal.
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_assembled_per_source() {
        let mut console = Console::default();
        assert!(console.push(1, b"hel").is_empty());
        assert!(console.push(2, b"other ").is_empty());
        let lines = console.push(1, b"lo\nworld\n");
        assert_eq!(
            lines,
            vec![ConsoleLine { pid: 1, text: "hello".into() }, ConsoleLine { pid: 1, text: "world".into() }]
        );
        assert_eq!(console.flush(), vec![ConsoleLine { pid: 2, text: "other ".into() }]);
        assert!(console.flush().is_empty());
    }

    #[test]
    fn control_characters_and_invalid_utf8_are_made_safe() {
        assert_eq!(sanitize(b"a\x1b[31mb\tc"), "a\\u{1b}[31mb\tc");
        assert_eq!(sanitize(&[0x66, 0xff, 0x67]), "f\u{fffd}g");
    }

    #[test]
    fn partial_lines_from_ever_new_sources_stay_bounded() {
        let mut console = Console::default();
        let mut emitted = 0;
        for pid in 0..1000u32 {
            emitted += console.push(pid, &[b'y'; MAX_LINE - 1]).len();
            assert!(console.partial.len() <= MAX_SOURCES);
            // Whole lines leave nothing behind.
            emitted += console.push(5000 + pid, b"line\n").len();
            assert!(!console.partial.contains_key(&(5000 + pid)));
        }
        assert!(console.partial.len() <= MAX_SOURCES);
        // Nothing is lost: every partial line was emitted, cut short.
        assert_eq!(emitted + console.flush().len(), 2000);
    }

    #[test]
    fn overlong_lines_are_cut() {
        let mut console = Console::default();
        let lines = console.push(3, &vec![b'x'; MAX_LINE + 10]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].text.len(), MAX_LINE);
        assert_eq!(console.flush()[0].text.len(), 10);
    }
}
