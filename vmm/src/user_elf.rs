//! Why a user program's ELF is refused, in words (issue 15): the kernel's
//! check (`guest_kernel::elf_image::check_user_image`, which the scenario
//! loader runs) answers with a `SpawnError` kind; this says what is wrong
//! with the file and how a program is built so that it loads.

use elf::abi::{EM_X86_64, ET_DYN, ET_EXEC, ET_REL, PF_R, PF_W, PF_X, PT_LOAD};
use elf::endian::AnyEndian;
use elf::file::Class;
use elf::ElfBytes;
use superos_protocol::layout::{USER_IMAGE_BASE, USER_IMAGE_LIMIT};

/// How an in-tree or out-of-tree program is built so that it loads.
const HOW: &str = "build it in a program project (`superos-vmm new DIR` writes one): for \
                   x86_64-unknown-none, with the static relocation model and superos-rt's linker \
                   script (-Tsuperos-user.ld), as that project's .cargo/config.toml does";

/// What is wrong with `image` as a SuperOS program, or `None` if nothing
/// this function knows of (the kernel's check has the last word).
pub fn why_refused(image: &[u8]) -> Option<String> {
    if image.get(..4) != Some(b"\x7fELF") {
        return Some("not an ELF file (no \\x7fELF magic)".into());
    }
    let file = match ElfBytes::<AnyEndian>::minimal_parse(image) {
        Ok(file) => file,
        Err(e) => return Some(format!("a damaged ELF file ({e})")),
    };
    let header = &file.ehdr;
    if header.class != Class::ELF64 {
        return Some(format!("a 32-bit ELF file; {HOW}"));
    }
    if header.e_machine != EM_X86_64 {
        return Some(format!("built for ELF machine {} (x86-64 is {EM_X86_64}); {HOW}", header.e_machine));
    }
    match header.e_type {
        ET_EXEC => {}
        ET_DYN => return Some(format!("position-independent (ET_DYN: a PIE or a shared object); {HOW}")),
        ET_REL => return Some(format!("a relocatable object, not a linked program; {HOW}")),
        other => return Some(format!("ELF type {other}, not an executable (ET_EXEC); {HOW}")),
    }
    let Some(segments) = file.segments() else {
        return Some("no program headers".into());
    };
    let loads: Vec<_> = segments.iter().filter(|h| h.p_type == PT_LOAD && h.p_memsz > 0).collect();
    if loads.is_empty() {
        return Some("no loadable segment".into());
    }
    for h in &loads {
        let end = h.p_vaddr.checked_add(h.p_memsz);
        if h.p_vaddr < USER_IMAGE_BASE || end.is_none_or(|end| end > USER_IMAGE_LIMIT) {
            return Some(format!(
                "a segment at {:#x} ({:#x} bytes) lies outside the program image window \
                 {USER_IMAGE_BASE:#x}-{USER_IMAGE_LIMIT:#x}; {HOW}",
                h.p_vaddr, h.p_memsz
            ));
        }
        if h.p_flags & PF_W != 0 && h.p_flags & PF_X != 0 {
            return Some(format!(
                "the segment at {:#x} is both writable and executable (W^X: code is read-only, data \
                 never executable); {HOW}",
                h.p_vaddr
            ));
        }
        if h.p_flags & (PF_R | PF_X) == 0 {
            return Some(format!("the segment at {:#x} is neither readable nor executable", h.p_vaddr));
        }
    }
    let entry = header.e_entry;
    let in_code =
        loads.iter().any(|h| h.p_flags & PF_X != 0 && h.p_vaddr <= entry && entry < h.p_vaddr + h.p_memsz);
    if !in_code {
        return Some(format!("its entry point {entry:#x} is not in an executable segment"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with one program header (`flags`, at `vaddr`).
    fn elf(machine: u16, kind: u16, vaddr: u64, flags: u32, entry: u64) -> Vec<u8> {
        let mut out = vec![0u8; 64 + 56];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // 64-bit
        out[5] = 1; // little-endian
        out[6] = 1; // version
        out[16..18].copy_from_slice(&kind.to_le_bytes());
        out[18..20].copy_from_slice(&machine.to_le_bytes());
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[24..32].copy_from_slice(&entry.to_le_bytes());
        out[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        out[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        out[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        out[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = &mut out[64..];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&flags.to_le_bytes());
        ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
        ph[40..48].copy_from_slice(&0x1000u64.to_le_bytes()); // memsz
        out
    }

    #[test]
    fn each_refusal_says_why() {
        let code = PF_R | PF_X;
        let base = USER_IMAGE_BASE;
        let cases: [(Vec<u8>, &str); 8] = [
            (b"#!/bin/sh\n".to_vec(), "not an ELF file"),
            (elf(0x28, ET_EXEC, base, code, base), "built for ELF machine 40"),
            (elf(EM_X86_64, ET_DYN, base, code, base), "position-independent"),
            (elf(EM_X86_64, ET_REL, base, code, base), "a relocatable object"),
            (elf(EM_X86_64, ET_EXEC, 0x1000, code, 0x1000), "outside the program image window"),
            (elf(EM_X86_64, ET_EXEC, base, PF_R | PF_W | PF_X, base), "both writable and executable"),
            (elf(EM_X86_64, ET_EXEC, base, PF_R, base), "not in an executable segment"),
            (elf(EM_X86_64, ET_EXEC, base, code, base + 0x2000), "not in an executable segment"),
        ];
        for (image, needle) in cases {
            let why = why_refused(&image).unwrap_or_else(|| panic!("{needle}: not refused"));
            assert!(why.contains(needle), "{why:?} lacks {needle:?}");
        }
        assert_eq!(why_refused(&elf(EM_X86_64, ET_EXEC, base, code, base)), None);
    }
}
