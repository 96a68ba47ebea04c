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

/// Per-source line assembly.
#[derive(Debug, Default)]
pub struct Console {
    partial: BTreeMap<u32, Vec<u8>>,
}

impl Console {
    /// Adds bytes from `pid`; returns the lines they complete.
    pub fn push(&mut self, pid: u32, bytes: &[u8]) -> Vec<ConsoleLine> {
        let pending = self.partial.entry(pid).or_default();
        let mut lines = Vec::new();
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
    fn overlong_lines_are_cut() {
        let mut console = Console::default();
        let lines = console.push(3, &vec![b'x'; MAX_LINE + 10]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].text.len(), MAX_LINE);
        assert_eq!(console.flush()[0].text.len(), 10);
    }
}
