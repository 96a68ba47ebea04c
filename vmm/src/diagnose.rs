//! Crash diagnosis: when the guest dies (triple fault, emulation failure,
//! kernel panic) the VMM explains where: RIP and the kernel symbol it falls
//! in, the instruction bytes there (read through the guest's own page
//! tables), and the registers.

use crate::arch::paging::translate;
use crate::memory::GuestRam;
use elf::endian::AnyEndian;
use elf::ElfBytes;
use kvm_bindings::{kvm_regs, kvm_sregs};
use std::fmt::Write as _;

/// How far past a label (a symbol without size) [`KernelSymbols::function`]
/// still names it.
pub const LABEL_REACH: u64 = 256;

/// Function symbols of the kernel image, for RIP lookups, and the address
/// of every named symbol (linker-script symbols included).
#[derive(Debug, Default)]
pub struct KernelSymbols {
    /// (start, size, demangled name), sorted by start.
    entries: Vec<(u64, u64, String)>,
    /// Every symbol with a name and a non-zero value: raw name -> address.
    addresses: std::collections::BTreeMap<String, u64>,
}

impl KernelSymbols {
    /// Reads the symbol table of a kernel ELF; an image without one (or a
    /// malformed one) gives an empty table rather than an error.
    pub fn parse(image: &[u8]) -> Self {
        let Ok(file) = ElfBytes::<AnyEndian>::minimal_parse(image) else {
            return Self::default();
        };
        let Ok(Some((symbols, strings))) = file.symbol_table() else {
            return Self::default();
        };
        let mut entries: Vec<(u64, u64, String)> = symbols
            .iter()
            .filter(|s| s.st_value != 0 && s.st_symtype() == elf::abi::STT_FUNC)
            .filter_map(|s| {
                let name = strings.get(s.st_name as usize).ok()?;
                Some((s.st_value, s.st_size, format!("{:#}", rustc_demangle::demangle(name))))
            })
            .collect();
        entries.sort_by_key(|e| e.0);
        let addresses = symbols
            .iter()
            .filter(|s| s.st_value != 0 && s.st_name != 0)
            .filter_map(|s| Some((strings.get(s.st_name as usize).ok()?.to_string(), s.st_value)))
            .collect();
        KernelSymbols { entries, addresses }
    }

    /// The address of the symbol called exactly `name` (as the symbol table
    /// spells it), if the image defines it.
    pub fn address(&self, name: &str) -> Option<u64> {
        self.addresses.get(name).copied()
    }

    /// The address of the function whose demangled name is `name`
    /// (`guest_kernel::kernel::Kernel::handle_trap`), if there is one.
    pub fn function_named(&self, name: &str) -> Option<u64> {
        self.entries.iter().find(|e| e.2 == name).map(|e| e.0)
    }

    /// `symbol+0xoffset` for `address`, if it falls inside a known function.
    pub fn lookup(&self, address: u64) -> Option<String> {
        let index = self.entries.partition_point(|e| e.0 <= address).checked_sub(1)?;
        let (start, size, name) = &self.entries[index];
        let offset = address - start;
        (offset < (*size).max(1)).then(|| format!("{name}+{offset:#x}"))
    }

    /// The (demangled) name of the function `address` lies in, or else of
    /// the nearest label at or below it within [`LABEL_REACH`] bytes (the
    /// assembly entry code's labels have no size or type).
    pub fn function(&self, address: u64) -> Option<&str> {
        if let Some(index) = self.entries.partition_point(|e| e.0 <= address).checked_sub(1) {
            let (start, size, name) = &self.entries[index];
            if address - start < (*size).max(1) {
                return Some(name.as_str());
            }
        }
        self.addresses
            .iter()
            .filter(|(_, &value)| value <= address && address - value < LABEL_REACH)
            .max_by_key(|(_, &value)| value)
            .map(|(name, _)| name.as_str())
    }

    /// Number of symbols known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no symbols are known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Reads `len` bytes at virtual `va` through the page tables rooted at `cr3`.
pub fn read_virtual(ram: &GuestRam, cr3: u64, va: u64, len: usize) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(len);
    for i in 0..len as u64 {
        let address = va.checked_add(i)?;
        let leaf = translate(cr3, address, |gpa| ram.read_u64(gpa).ok())?;
        let mut byte = [0u8];
        ram.read_bytes(leaf.phys, &mut byte).ok()?;
        bytes.push(byte[0]);
    }
    Some(bytes)
}

/// A human-readable account of where the vCPU stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    /// Why the guest stopped.
    pub reason: String,
    /// The instruction pointer considered responsible.
    pub rip: u64,
    /// The kernel symbol containing `rip`.
    pub symbol: Option<String>,
    /// Up to 16 bytes at `rip`, if mapped.
    pub instruction_bytes: Option<Vec<u8>>,
    /// Register dump.
    pub registers: String,
    /// What the registers cannot tell, if anything (see
    /// [`is_reset_state`]).
    pub note: Option<String>,
}

/// Whether `regs`/`sregs` are an x86 vCPU's state after INIT or reset
/// (RIP 0xfff0 in CS 0xf000, paging and protection off). On AMD, KVM
/// re-initialises the vCPU when it intercepts a shutdown (a triple fault),
/// because the VMCB is undefined afterwards: the registers of the faulting
/// instruction are gone. The SuperOS kernel never runs in this state.
pub fn is_reset_state(regs: &kvm_regs, sregs: &kvm_sregs) -> bool {
    const CR0_PE: u64 = 1;
    regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 && sregs.cr0 & CR0_PE == 0
}

impl Diagnosis {
    /// Builds a diagnosis for `reason` at `rip` (the vCPU's RIP unless a
    /// better one, such as a faulting RIP reported by the kernel, is known).
    pub fn new(
        reason: String,
        rip: u64,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
        ram: &GuestRam,
        symbols: &KernelSymbols,
    ) -> Self {
        let instruction_bytes = read_virtual(ram, sregs.cr3, rip, 16);
        let mut registers = String::new();
        let r = regs;
        let _ = writeln!(registers, "rip {:#018x}  rsp {:#018x}  rflags {:#x}", r.rip, r.rsp, r.rflags);
        let _ = writeln!(
            registers,
            "rax {:#018x}  rbx {:#018x}  rcx {:#018x}  rdx {:#018x}",
            r.rax, r.rbx, r.rcx, r.rdx
        );
        let _ = writeln!(
            registers,
            "rsi {:#018x}  rdi {:#018x}  rbp {:#018x}  r8  {:#018x}",
            r.rsi, r.rdi, r.rbp, r.r8
        );
        let _ = writeln!(
            registers,
            "r9  {:#018x}  r10 {:#018x}  r11 {:#018x}  r12 {:#018x}",
            r.r9, r.r10, r.r11, r.r12
        );
        let _ = writeln!(registers, "r13 {:#018x}  r14 {:#018x}  r15 {:#018x}", r.r13, r.r14, r.r15);
        let _ = write!(
            registers,
            "cs {:#x} (cpl {})  cr0 {:#x}  cr2 {:#x}  cr3 {:#x}  cr4 {:#x}  efer {:#x}",
            sregs.cs.selector,
            sregs.cs.selector & 3,
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.efer
        );
        let note = is_reset_state(regs, sregs).then(|| {
            "these are the vCPU's reset registers, not the faulting instruction's: KVM re-initialised the \
             vCPU at the shutdown (on AMD the VMCB is undefined after a shutdown intercept), so where the \
             guest faulted is not known"
                .to_string()
        });
        let symbol = if note.is_some() { None } else { symbols.lookup(rip) };
        Diagnosis { reason, rip, symbol, instruction_bytes, registers, note }
    }
}

impl std::fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "guest crashed: {}", self.reason)?;
        writeln!(
            f,
            "  at rip {:#x} in {}",
            self.rip,
            self.symbol.as_deref().unwrap_or("<no kernel symbol>")
        )?;
        match &self.instruction_bytes {
            Some(bytes) => {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                writeln!(f, "  instruction bytes: {}", hex.join(" "))?;
            }
            None => writeln!(f, "  instruction bytes: <rip is not mapped>")?,
        }
        for line in self.registers.lines() {
            writeln!(f, "  {line}")?;
        }
        if let Some(note) = &self.note {
            writeln!(f, "  note: {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::KERNEL_ELF;

    #[test]
    fn the_reset_state_is_recognised_and_named() {
        let mut regs = kvm_regs { rip: 0xfff0, ..Default::default() };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0xf000;
        sregs.cr0 = 0x6000_0010;
        assert!(is_reset_state(&regs, &sregs));
        let ram = GuestRam::new(16).unwrap();
        let symbols = KernelSymbols::parse(KERNEL_ELF);
        let diagnosis = Diagnosis::new("triple fault".into(), regs.rip, &regs, &sregs, &ram, &symbols);
        assert!(diagnosis.to_string().contains("reset registers"), "{diagnosis}");
        assert_eq!(diagnosis.symbol, None);
        sregs.cr0 |= 1;
        assert!(!is_reset_state(&regs, &sregs), "protected mode is not the reset state");
        regs.rip = 0xffff_ffff_8000_1000;
        sregs.cs.selector = 0x8;
        let diagnosis = Diagnosis::new("triple fault".into(), regs.rip, &regs, &sregs, &ram, &symbols);
        assert_eq!(diagnosis.note, None);
    }

    #[test]
    fn kernel_symbols_resolve() {
        let symbols = KernelSymbols::parse(KERNEL_ELF);
        assert!(!symbols.is_empty());
        let layout = crate::boot::check_kernel_elf(KERNEL_ELF, 64 << 20).unwrap();
        let at_entry = symbols.lookup(layout.entry).expect("entry has a symbol");
        assert!(at_entry.starts_with("_start+0x0"), "{at_entry}");
        assert_eq!(symbols.lookup(0x10), None);
        assert!(KernelSymbols::parse(b"garbage").is_empty());
        // Linker-script symbols too.
        assert_eq!(symbols.address("__text_start"), Some(layout.entry));
        assert!(symbols.address("__kernel_stack_top").is_some_and(|top| top > layout.entry));
        assert_eq!(symbols.address("no_such_symbol"), None);
    }
}
