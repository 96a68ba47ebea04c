//! `cpu-state-intact`: the live vCPU against the CPU state the kernel is
//! designed to keep (`superos_protocol::cpu`), checked from outside.
//!
//! [`capture`] reads the vCPU through KVM (`KVM_GET_REGS`, `KVM_GET_SREGS`,
//! `KVM_GET_MSRS`, `KVM_GET_XCRS` when CR4.OSXSAVE is set,
//! `KVM_GET_DEBUGREGS`) into a plain [`CpuState`]; [`check`] compares it,
//! and the GDT, IDT and TSS it names in guest memory (read through the
//! kernel half of the current CR3, every address untrusted), with the
//! design: descriptor tables, entry MSRs, control-register bits, interrupt
//! stacks, XCR0 and DR7. What the design leaves to the CPU (which of SMEP,
//! SMAP, UMIP, FSGSBASE and XSAVE exist, and the XCR0 components) comes from
//! the CPUID the vCPU presents to the kernel ([`CpuFeatures`]): on ordinary
//! KVM every guest `cpuid` exits and KVM answers with the CPUID the VMM set
//! (`KVM_SET_CPUID2`, KVM's supported one, `vm.rs`); on the PVM host the
//! guest kernel runs `cpuid` natively and sees the host's (measured here:
//! KVM's supported CPUID lacks SMEP, SMAP, FSGSBASE and XSAVE, which the
//! kernel sees and turns on), so there the VMM's own `cpuid` is used; the
//! addresses the
//! MSRs, the TSS and the IDT must hold come from the kernel ELF the VMM
//! loaded ([`design_symbols`]), never from the kernel.
//!
//! The comparison is a pure function of a [`CpuState`], the
//! [`KernelImage`], the gate the kernel announced and guest RAM, so it is
//! tested without KVM on made-up states. Each finding names the register,
//! descriptor, gate or MSR, the value seen and the value expected.
//!
//! When: after every check the monitor runs at a consistent point (each
//! event, shutdown, a kernel panic, a periodic check in ring 3), right after
//! the hypercall, in the vCPU thread that owns the `VcpuFd`; and for
//! `inspect check` when the control socket holds the vCPU.

use crate::check::{Invariant, KernelImage, Violation};
use crate::diagnose::KernelSymbols;
use crate::memory::GuestRam;
use crate::session::EventEntry;
use crate::walk;
use kvm_bindings::{kvm_msr_entry, kvm_segment, kvm_sregs, Msrs};
pub use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use superos_protocol::cpu::{self as design, msr, symbols, IdtGate, SegmentDescriptor, IST_SLOTS};
use superos_protocol::event::Event;
use superos_protocol::layout::KERNEL_HALF_START;
use superos_protocol::syscall::{gate_kind_name, GATE_KIND_INT3, GATE_KIND_SYSCALL};

/// The descriptors of the designed GDT, slot by slot (the x86_64 crate's
/// flat segments, which the kernel appends in `arch/tables.rs`); the TSS
/// descriptor (slots 8 and 9) is checked against TR instead. The accessed
/// bit (40) is the CPU's to set and is ignored.
pub const DESIGNED_GDT: [(u16, u64, &str); 8] = [
    (0x00, 0, "null"),
    (0x08, 0, "null"),
    (design::KERNEL_CODE_SELECTOR, 0x00af_9b00_0000_ffff, "kernel 64-bit code"),
    (design::KERNEL_DATA_SELECTOR, 0x00cf_9300_0000_ffff, "kernel data"),
    (design::SYSRET32_SELECTOR, 0, "null (the 32-bit sysret slot)"),
    (design::USER_DATA_SELECTOR & !3, 0x00cf_f300_0000_ffff, "user data"),
    (design::USER_CODE_SELECTOR & !3, 0x00af_fb00_0000_ffff, "user 64-bit code"),
    (0x38, 0, "null"),
];
/// The GDT limit the design gives (`GDT_SLOTS` 8-byte slots).
pub const GDT_LIMIT: u64 = design::GDT_SLOTS as u64 * 8 - 1;
/// The IDT limit: all 256 gates of 16 bytes.
pub const IDT_LIMIT: u64 = 256 * 16 - 1;
/// Size of a 64-bit TSS.
pub const TSS_SIZE: u64 = 0x68;
/// The descriptor accessed bit.
const ACCESSED: u64 = 1 << 40;
/// DR7 enable bits L0..L3, G0..G3.
const DR7_ENABLES: u64 = 0xff;
/// Interrupt gate type.
const INTERRUPT_GATE: u8 = 0xe;
/// Busy 64-bit TSS type.
const TSS_BUSY: u8 = 0xb;

/// The MSRs [`capture`] reads, with their names.
pub const MSRS: [(u32, &str); 10] = [
    (msr::STAR, "STAR"),
    (msr::LSTAR, "LSTAR"),
    (msr::CSTAR, "CSTAR"),
    (msr::SFMASK, "SFMASK"),
    (msr::SYSENTER_CS, "SYSENTER_CS"),
    (msr::SYSENTER_ESP, "SYSENTER_ESP"),
    (msr::SYSENTER_EIP, "SYSENTER_EIP"),
    (msr::FS_BASE, "FS_BASE"),
    (msr::GS_BASE, "GS_BASE"),
    (msr::KERNEL_GS_BASE, "KERNEL_GS_BASE"),
];

/// The kernel symbols the design names: every CPU's entry points, CPU 0's
/// kernel stack, the text bounds, CPU 0's IST stack tops and the idle loop.
pub fn design_symbol_names() -> Vec<&'static str> {
    let mut names = vec![
        symbols::KERNEL_STACK_TOP,
        symbols::TEXT_START,
        symbols::TEXT_END,
        symbols::DEBUG_PATH_END,
        symbols::IDLE_LOOP,
        symbols::IDLE_LOOP_END,
        symbols::LOCK_WAIT,
        symbols::LOCK_WAIT_END,
    ];
    names.extend(symbols::SYSCALL_ENTRIES);
    names.extend(symbols::FOREIGN_ENTRIES);
    names.extend(IST_SLOTS.iter().map(|slot| slot.top_symbol));
    names
}

/// The addresses of [`design_symbol_names`] in the kernel ELF (those it
/// defines; a missing one is a finding at every check).
pub fn design_symbols(symbols: &KernelSymbols) -> BTreeMap<String, u64> {
    design_symbol_names()
        .into_iter()
        .filter_map(|name| Some((name.to_string(), symbols.address(name)?)))
        .collect()
}

/// What the CPUID the VMM gives the vCPU says about the features the design
/// turns on where they exist (`superos_protocol::cpu::CR4_IF_SUPPORTED`)
/// and the XCR0 components.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// Leaf 7 EBX bit 7: supervisor-mode execution prevention.
    pub smep: bool,
    /// Leaf 7 EBX bit 20: supervisor-mode access prevention.
    pub smap: bool,
    /// Leaf 7 ECX bit 2: user-mode instruction prevention.
    pub umip: bool,
    /// Leaf 7 EBX bit 0: `rdfsbase` and friends.
    pub fsgsbase: bool,
    /// Leaf 1 ECX bit 26: `xsave` and `XCR0`.
    pub xsave: bool,
    /// Leaf 0xd: the XCR0 components the CPU supports (EDX:EAX; x87 and SSE
    /// if the leaf is beyond the maximum basic leaf).
    pub xcr0_supported: u64,
}

impl CpuFeatures {
    /// The features in `(function, index, eax, ebx, ecx, edx)` CPUID
    /// entries, read as the guest kernel reads them (a leaf only if the
    /// maximum basic leaf reaches it, subleaf 0).
    pub fn from_entries(entries: &[(u32, u32, u32, u32, u32, u32)]) -> CpuFeatures {
        let max = entries.iter().find(|e| e.0 == 0 && e.1 == 0).map_or(0, |e| e.2);
        let leaf =
            |function: u32| entries.iter().find(|e| e.0 == function && e.1 == 0).filter(|_| max >= function);
        let (ebx7, ecx7) = leaf(7).map_or((0, 0), |e| (e.3, e.4));
        let ecx1 = leaf(1).map_or(0, |e| e.4);
        let xcr0_supported = leaf(0xd)
            .map_or(design::XCR0_X87 | design::XCR0_SSE, |e| u64::from(e.2) | (u64::from(e.5) << 32));
        CpuFeatures {
            smep: ebx7 & (1 << 7) != 0,
            smap: ebx7 & (1 << 20) != 0,
            umip: ecx7 & (1 << 2) != 0,
            fsgsbase: ebx7 & 1 != 0,
            xsave: ecx1 & (1 << 26) != 0,
            xcr0_supported,
        }
    }

    /// The features of the CPU the VMM itself runs on (its own `cpuid`):
    /// what a PVM guest sees.
    pub fn host() -> CpuFeatures {
        let entries: Vec<_> = [0u32, 1, 7, 0xd]
            .into_iter()
            .map(|leaf| {
                let r = core::arch::x86_64::__cpuid_count(leaf, 0);
                (leaf, 0, r.eax, r.ebx, r.ecx, r.edx)
            })
            .collect();
        CpuFeatures::from_entries(&entries)
    }

    /// The features the vCPU presents to the kernel on `host`: the CPUID
    /// given to the vCPU (`given`), or on the PVM host the host's.
    pub fn presented(host: superos_protocol::boot::HostFlavor, given: CpuFeatures) -> CpuFeatures {
        match host {
            superos_protocol::boot::HostFlavor::Pvm => CpuFeatures::host(),
            _ => given,
        }
    }

    /// The XCR0 the design sets on this CPU (and the most the checker
    /// accepts): the user components CPUID reports, of those the design
    /// allows (x87 always).
    pub fn expected_xcr0(&self) -> u64 {
        (self.xcr0_supported & design::XCR0_USER_MAX) | design::XCR0_X87
    }

    /// The CR4 bits of `CR4_IF_SUPPORTED` this CPU has.
    pub fn cr4_supported(&self) -> u64 {
        [
            (self.smep, design::CR4_SMEP),
            (self.smap, design::CR4_SMAP),
            (self.umip, design::CR4_UMIP),
            (self.fsgsbase, design::CR4_FSGSBASE),
            (self.xsave, design::CR4_OSXSAVE),
        ]
        .into_iter()
        .filter(|(has, _)| *has)
        .fold(0, |bits, (_, bit)| bits | bit)
    }
}

/// A segment register as KVM reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Base.
    pub base: u64,
    /// Limit (in bytes, as KVM expands it).
    pub limit: u32,
    /// Type field.
    pub kind: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// S: code or data (else system).
    pub s: bool,
    /// L: 64-bit code.
    pub l: bool,
    /// D/B.
    pub db: bool,
    /// Unusable (KVM's flag for a null or unloaded segment).
    pub unusable: bool,
}

impl From<&kvm_segment> for Segment {
    fn from(s: &kvm_segment) -> Segment {
        Segment {
            selector: s.selector,
            base: s.base,
            limit: s.limit,
            kind: s.type_,
            present: s.present != 0,
            dpl: s.dpl,
            s: s.s != 0,
            l: s.l != 0,
            db: s.db != 0,
            unusable: s.unusable != 0,
        }
    }
}

/// A descriptor-table register (GDTR or IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRegister {
    /// Linear base.
    pub base: u64,
    /// Limit (size - 1).
    pub limit: u16,
}

/// The vCPU state the checker looks at, as read through KVM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// CS.
    pub cs: Segment,
    /// SS.
    pub ss: Segment,
    /// TR.
    pub tr: Segment,
    /// LDTR.
    pub ldt: Segment,
    /// GDTR.
    pub gdt: TableRegister,
    /// IDTR.
    pub idt: TableRegister,
    /// The MSRs of [`MSRS`] KVM returned: `(index, value)`.
    pub msrs: Vec<(u32, u64)>,
    /// XCR0, read when CR4.OSXSAVE is set.
    pub xcr0: Option<u64>,
    /// DR7.
    pub dr7: Option<u64>,
    /// What could not be read, in words.
    pub errors: Vec<String>,
    /// The general registers, in [`GENERAL_REGISTERS`] order (absent from
    /// snapshots written before they were kept: zeros).
    #[serde(default)]
    pub general: [u64; 16],
    /// The x87 and SSE registers as an `fxsave` image (the legacy region of
    /// an `xsave` image, [`FXSAVE_BYTES`] long), from `KVM_GET_XSAVE` (or
    /// `KVM_GET_FPU`, whose MXCSR is always zero, where that fails); the
    /// kernel never uses them, so they are the user code's the vCPU runs or
    /// trapped from (the gdb stub shows them). Not kept in snapshots.
    #[serde(skip)]
    pub fpu: Option<Vec<u8>>,
}

/// Bytes of an `fxsave` image (and of the legacy region of an `xsave` one).
pub const FXSAVE_BYTES: usize = 512;

/// The `fxsave` image of what `KVM_GET_FPU` says (MXCSR zero: KVM does not
/// fill it) (its layout: FCW, FSW,
/// the abridged tag, FOP, FIP, FDP, MXCSR at 24, ST0-7 from 32 in 16-byte
/// slots, XMM0-15 from 160).
pub fn fxsave_image(fpu: &kvm_bindings::kvm_fpu) -> Vec<u8> {
    let mut image = vec![0u8; FXSAVE_BYTES];
    image[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    image[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    image[4] = fpu.ftwx;
    image[6..8].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    image[8..16].copy_from_slice(&fpu.last_ip.to_le_bytes());
    image[16..24].copy_from_slice(&fpu.last_dp.to_le_bytes());
    image[24..28].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    for (i, st) in fpu.fpr.iter().enumerate() {
        image[32 + 16 * i..48 + 16 * i].copy_from_slice(st);
    }
    for (i, xmm) in fpu.xmm.iter().enumerate() {
        image[160 + 16 * i..176 + 16 * i].copy_from_slice(xmm);
    }
    image
}

/// The names of [`CpuState::general`], in order.
pub const GENERAL_REGISTERS: [&str; 16] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

impl CpuState {
    /// The value of MSR `index`, if it was read.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|(i, _)| *i == index).map(|&(_, v)| v)
    }

    /// True if the vCPU was in ring 3.
    pub fn in_ring3(&self) -> bool {
        self.cs.selector & 3 == 3
    }

    /// The registers from KVM's structures (the rest left as is).
    pub fn set_sregs(&mut self, sregs: &kvm_sregs) {
        self.cr0 = sregs.cr0;
        self.cr3 = sregs.cr3;
        self.cr4 = sregs.cr4;
        self.efer = sregs.efer;
        self.cs = Segment::from(&sregs.cs);
        self.ss = Segment::from(&sregs.ss);
        self.tr = Segment::from(&sregs.tr);
        self.ldt = Segment::from(&sregs.ldt);
        self.gdt = TableRegister { base: sregs.gdt.base, limit: sregs.gdt.limit };
        self.idt = TableRegister { base: sregs.idt.base, limit: sregs.idt.limit };
    }
}

/// A vCPU's state and where it was captured (for `inspect` and snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuCapture {
    /// Which vCPU (0 is the bootstrap one; absent in snapshots of version 3,
    /// which carry only vCPU 0's).
    #[serde(default)]
    pub cpu: u32,
    /// Where the vCPU was, as a phrase (`at event #12`, `at shutdown`, `in
    /// user code at rip 0x400073 (cr3 0x28000)`).
    pub at: String,
    /// The state.
    pub state: CpuState,
}

/// Reads the vCPU's state through KVM. Never fails: what cannot be read is
/// listed in [`CpuState::errors`] (and is a finding).
pub fn capture(vcpu: &VcpuFd) -> CpuState {
    let mut state = CpuState::default();
    match vcpu.get_regs() {
        Ok(regs) => {
            state.rip = regs.rip;
            state.rflags = regs.rflags;
            state.general = [
                regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rsp, regs.rbp, regs.r8,
                regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
            ];
        }
        Err(error) => state.errors.push(format!("KVM_GET_REGS failed: {error}")),
    }
    match vcpu.get_sregs() {
        Ok(sregs) => state.set_sregs(&sregs),
        Err(error) => state.errors.push(format!("KVM_GET_SREGS failed: {error}")),
    }
    let entries: Vec<kvm_msr_entry> =
        MSRS.iter().map(|&(index, _)| kvm_msr_entry { index, ..Default::default() }).collect();
    match Msrs::from_entries(&entries) {
        Ok(mut msrs) => match vcpu.get_msrs(&mut msrs) {
            // KVM stops at the first MSR it cannot read: the ones before it are valid.
            Ok(read) => state.msrs = msrs.as_slice().iter().take(read).map(|e| (e.index, e.data)).collect(),
            Err(error) => state.errors.push(format!("KVM_GET_MSRS failed: {error}")),
        },
        Err(error) => state.errors.push(format!("cannot build the MSR list: {error:?}")),
    }
    if state.cr4 & design::CR4_OSXSAVE != 0 {
        match vcpu.get_xcrs() {
            Ok(xcrs) => {
                let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
                state.xcr0 = xcrs.xcrs[..count].iter().find(|x| x.xcr == 0).map(|x| x.value);
                if state.xcr0.is_none() {
                    state.errors.push("KVM_GET_XCRS returned no XCR0".into());
                }
            }
            Err(error) => state.errors.push(format!("KVM_GET_XCRS failed: {error}")),
        }
    }
    // KVM_GET_XSAVE's first 512 bytes are the legacy region, MXCSR
    // included (KVM_GET_FPU leaves its MXCSR field zero).
    state.fpu = match vcpu.get_xsave() {
        Ok(xsave) => {
            Some(xsave.region.iter().flat_map(|word| word.to_le_bytes()).take(FXSAVE_BYTES).collect())
        }
        Err(_) => vcpu.get_fpu().ok().map(|fpu| fxsave_image(&fpu)),
    };
    match vcpu.get_debug_regs() {
        Ok(debug) => state.dr7 = Some(debug.dr7),
        Err(error) => state.errors.push(format!("KVM_GET_DEBUGREGS failed: {error}")),
    }
    state
}

/// True once the kernel's CPU state must be as designed: from its first
/// gate self-test on, the first time ring 3 runs, whose outcome is the
/// first event after it (`GateSelfTestFailed` or `KernelReady`). The kernel
/// writes the entry MSRs just before; events it logs earlier in its boot
/// (a debug flag's) find them unset, rightly. (A vCPU found in ring 3 is
/// past that point whatever the events say.)
pub fn design_in_force(events: &[EventEntry]) -> bool {
    events
        .iter()
        .any(|entry| matches!(entry.event, Event::KernelReady { .. } | Event::GateSelfTestFailed { .. }))
}

/// Why the CPU state is not checked before [`design_in_force`].
pub const NOT_YET: &str =
    "the kernel had not finished setting up its CPU state (it does just before its gate self-test, the first time ring 3 runs)";

/// The gate the kernel announced in its last `KernelReady` event
/// (`GATE_KIND_*`), if it has announced one.
pub fn gate_kind(events: &[EventEntry]) -> Option<u32> {
    events.iter().rev().find_map(|entry| match entry.event {
        Event::KernelReady { gate_kind, .. } => Some(gate_kind),
        _ => None,
    })
}

/// Test and diagnostic helpers that change the vCPU on purpose (for
/// [`crate::monitor::VcpuTamper`] hooks): what a compromised kernel could do
/// to its own CPU state.
pub mod tamper {
    use super::*;

    /// Writes MSR `index` (`KVM_SET_MSRS`).
    pub fn set_msr(vcpu: &VcpuFd, index: u32, value: u64) -> Result<(), String> {
        let msrs = Msrs::from_entries(&[kvm_msr_entry { index, data: value, ..Default::default() }])
            .map_err(|e| format!("{e:?}"))?;
        match vcpu.set_msrs(&msrs) {
            Ok(1) => Ok(()),
            Ok(_) => Err(format!("KVM refused MSR {index:#x} = {value:#x}")),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Writes XCR0 (`KVM_SET_XCRS`).
    pub fn set_xcr0(vcpu: &VcpuFd, value: u64) -> Result<(), String> {
        let mut xcrs = vcpu.get_xcrs().map_err(|e| e.to_string())?;
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = value;
        vcpu.set_xcrs(&xcrs).map_err(|e| e.to_string())
    }

    /// Writes DR7 (`KVM_SET_DEBUGREGS`).
    pub fn set_dr7(vcpu: &VcpuFd, value: u64) -> Result<(), String> {
        let mut debug = vcpu.get_debug_regs().map_err(|e| e.to_string())?;
        debug.dr7 = value;
        vcpu.set_debug_regs(&debug).map_err(|e| e.to_string())
    }

    /// Changes the control registers (`KVM_GET_SREGS`, `f`, `KVM_SET_SREGS`):
    /// `f` gets `(cr0, cr4, efer)`.
    pub fn update_control(vcpu: &VcpuFd, f: impl FnOnce(&mut u64, &mut u64, &mut u64)) -> Result<(), String> {
        let mut sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
        f(&mut sregs.cr0, &mut sregs.cr4, &mut sregs.efer);
        vcpu.set_sregs(&sregs).map_err(|e| e.to_string())
    }
}

/// Everything [`check`] compares the state with.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// The kernel image (symbols, CPUID features).
    pub image: &'a KernelImage,
    /// The gate the kernel announced (`GATE_KIND_*`); `None` before its
    /// `KernelReady` event (EFER.SCE is not checked then).
    pub gate_kind: Option<u32>,
    /// Which vCPU the state is of: CPU 0's stacks are the kernel image's
    /// symbols, an application processor's are in its window of
    /// [`design::CPU_STACKS_VA`] (`superos_protocol::cpu::ap_stack`).
    pub cpu: u32,
}

/// The top of `cpu`'s `stack` as the design places it, with words for a
/// finding, or a finding that it cannot be known.
fn stack_top(
    found: &mut Findings,
    image: &KernelImage,
    cpu: u32,
    stack: design::CpuStack,
) -> Option<(u64, String)> {
    if cpu != 0 {
        let Some((_, top)) = design::ap_stack(cpu, stack) else {
            found.add(format!("CPU {cpu} has no stacks in the design (at most {} CPUs)", design::MAX_CPUS));
            return None;
        };
        let what = match stack {
            design::CpuStack::Kernel => "kernel stack".to_string(),
            design::CpuStack::Ist(i) => format!("IST stack for vector {}", IST_SLOTS[i].vector),
        };
        return Some((top, format!("CPU {cpu}'s {what}")));
    }
    let name = match stack {
        design::CpuStack::Kernel => symbols::KERNEL_STACK_TOP,
        design::CpuStack::Ist(i) => IST_SLOTS[i].top_symbol,
    };
    let top = symbol(found, image, name, "a stack top")?;
    Some((top, format!("`{name}`")))
}

/// Findings of one comparison, in words, before they become violations.
struct Findings {
    found: Vec<Violation>,
}

impl Findings {
    fn add(&mut self, details: String) {
        self.found.push(Violation::new(Invariant::CpuStateIntact, details));
    }

    fn add_at(&mut self, details: String, va: u64) {
        let mut v = Violation::new(Invariant::CpuStateIntact, details);
        v.vas.push(va);
        self.found.push(v);
    }
}

/// Names of the set bits of `bits` among `names`.
fn bit_names(bits: u64, names: &[(u64, &str)]) -> String {
    names.iter().filter(|(bit, _)| bits & bit != 0).map(|(_, name)| *name).collect::<Vec<_>>().join(" ")
}

const CR0_NAMES: [(u64, &str); 8] = [
    (design::CR0_PE, "PE"),
    (design::CR0_MP, "MP"),
    (design::CR0_EM, "EM"),
    (design::CR0_TS, "TS"),
    (design::CR0_NE, "NE"),
    (design::CR0_WP, "WP"),
    (design::CR0_AM, "AM"),
    (design::CR0_PG, "PG"),
];
const CR4_NAMES: [(u64, &str); 12] = [
    (design::CR4_TSD, "TSD"),
    (design::CR4_PAE, "PAE"),
    (design::CR4_PCE, "PCE"),
    (design::CR4_OSFXSR, "OSFXSR"),
    (design::CR4_OSXMMEXCPT, "OSXMMEXCPT"),
    (design::CR4_UMIP, "UMIP"),
    (design::CR4_FSGSBASE, "FSGSBASE"),
    (design::CR4_OSXSAVE, "OSXSAVE"),
    (design::CR4_SMEP, "SMEP"),
    (design::CR4_SMAP, "SMAP"),
    (design::CR4_PKE, "PKE"),
    (1 << 23, "CET"),
];
const EFER_NAMES: [(u64, &str); 4] = [
    (design::EFER_SCE, "SCE"),
    (design::EFER_LME, "LME"),
    (design::EFER_LMA, "LMA"),
    (design::EFER_NXE, "NXE"),
];

/// Compares `state` (and the tables it names in `ram`) with the design for
/// vCPU `expected.cpu`; one violation of `cpu-state-intact` per finding, an
/// application processor's starting `vCPU N:`.
pub fn check(state: &CpuState, expected: Expected<'_>, ram: &GuestRam) -> Vec<Violation> {
    let mut found = Findings { found: Vec::new() };
    for error in &state.errors {
        found.add(format!("the vCPU state could not be read in full: {error}"));
    }
    registers(&mut found, state, expected);
    tables(&mut found, state, expected, ram);
    // An application processor's findings name it.
    if expected.cpu != 0 {
        for violation in &mut found.found {
            violation.details = format!("vCPU {}: {}", expected.cpu, violation.details);
        }
    }
    found.found
}

/// A symbol's address, or a finding that the kernel ELF lacks it.
fn symbol(found: &mut Findings, image: &KernelImage, name: &str, needed_for: &str) -> Option<u64> {
    let address = image.symbols.get(name).copied();
    if address.is_none() {
        found.add(format!("the kernel ELF has no symbol `{name}`: {needed_for} cannot be checked"));
    }
    address
}

fn registers(found: &mut Findings, state: &CpuState, expected: Expected<'_>) {
    let image = expected.image;
    // CR0.
    let missing = design::CR0_REQUIRED & !state.cr0;
    let forbidden = design::CR0_FORBIDDEN & state.cr0;
    if missing != 0 || forbidden != 0 {
        let mut problems = Vec::new();
        if missing != 0 {
            problems.push(format!("{} clear", bit_names(missing, &CR0_NAMES)));
        }
        if forbidden != 0 {
            problems.push(format!("{} set", bit_names(forbidden, &CR0_NAMES)));
        }
        found.add(format!(
            "CR0 is {:#x}: {}; expected {} set and {} clear",
            state.cr0,
            problems.join(", "),
            bit_names(design::CR0_REQUIRED, &CR0_NAMES),
            bit_names(design::CR0_FORBIDDEN, &CR0_NAMES)
        ));
    }
    // CR4: required, forbidden, and the if-supported bits exactly where the
    // vCPU's CPUID has the feature.
    let mut problems = Vec::new();
    let missing = design::CR4_REQUIRED & !state.cr4;
    if missing != 0 {
        problems.push(format!("{} clear (required)", bit_names(missing, &CR4_NAMES)));
    }
    let forbidden = design::CR4_FORBIDDEN & state.cr4;
    if forbidden != 0 {
        problems.push(format!("{} set (forbidden)", bit_names(forbidden, &CR4_NAMES)));
    }
    match image.features {
        Some(features) => {
            let wanted = features.cr4_supported();
            let absent = wanted & !state.cr4;
            let extra = design::CR4_IF_SUPPORTED & !wanted & state.cr4;
            if absent != 0 {
                problems.push(format!(
                    "{} clear, but the vCPU's CPUID has the feature",
                    bit_names(absent, &CR4_NAMES)
                ));
            }
            if extra != 0 {
                problems.push(format!(
                    "{} set, but the vCPU's CPUID lacks the feature",
                    bit_names(extra, &CR4_NAMES)
                ));
            }
        }
        None => problems.push(
            "the vCPU's CPUID is unknown: SMEP, SMAP, UMIP, FSGSBASE and OSXSAVE cannot be checked".into(),
        ),
    }
    if !problems.is_empty() {
        let wanted = image.features.map_or(0, |f| f.cr4_supported());
        found.add(format!(
            "CR4 is {:#x}: {}; expected {:#x} ({})",
            state.cr4,
            problems.join(", "),
            (state.cr4 | design::CR4_REQUIRED | wanted)
                & !design::CR4_FORBIDDEN
                & !(design::CR4_IF_SUPPORTED & !wanted),
            bit_names(design::CR4_REQUIRED | wanted, &CR4_NAMES)
        ));
    }
    // EFER: long mode and NX always; SCE exactly while the syscall gate is in use.
    let required = design::EFER_LME | design::EFER_LMA | design::EFER_NXE;
    let (sce_wanted, gate) = match expected.gate_kind {
        Some(GATE_KIND_SYSCALL) => (Some(true), "the syscall gate is in use"),
        Some(GATE_KIND_INT3) => (Some(false), "the int3 gate is in use"),
        Some(_) => (None, "the kernel announced an unknown gate"),
        None => (None, "before the kernel announced its gate"),
    };
    let mut problems = Vec::new();
    if required & !state.efer != 0 {
        problems.push(format!("{} clear", bit_names(required & !state.efer, &EFER_NAMES)));
    }
    match (sce_wanted, state.efer & design::EFER_SCE != 0) {
        (Some(true), false) => problems.push(format!("SCE clear although {gate}")),
        (Some(false), true) => {
            problems.push(format!("SCE set although {gate} (`syscall` in ring 3 must be #UD)"))
        }
        _ => {}
    }
    if !problems.is_empty() {
        found.add(format!(
            "EFER is {:#x}: {}; expected LME LMA NXE{}",
            state.efer,
            problems.join(", "),
            match sce_wanted {
                Some(true) => " SCE",
                Some(false) => ", SCE clear",
                None => "",
            }
        ));
    }
    if let Some(kind) = expected.gate_kind.filter(|&k| k != GATE_KIND_SYSCALL && k != GATE_KIND_INT3) {
        found.add(format!(
            "the kernel announced gate kind {kind} ({}), which the design does not know",
            gate_kind_name(kind)
        ));
    }
    // RFLAGS: no I/O privilege for anyone; AC (which lifts SMAP) never in ring 0.
    if state.rflags & design::RFLAGS_IOPL != 0 {
        found.add(format!(
            "RFLAGS is {:#x}: IOPL {} (expected 0: ring 3 would reach I/O ports)",
            state.rflags,
            (state.rflags & design::RFLAGS_IOPL) >> 12
        ));
    }
    if !state.in_ring3() && state.rflags & design::RFLAGS_AC != 0 {
        found.add(format!("RFLAGS is {:#x} in ring 0: AC set (SMAP lifted), expected clear", state.rflags));
    }
    // XCR0, where XSAVE is on: x87 and no component beyond the design's. A
    // component more (AMX, say) would be state ring 3 can use that the
    // switch stubs may not move between processes; fewer only makes
    // instructions #UD in ring 3 (the stubs move x87/SSE with `fxsave`
    // whatever XCR0 says), and is what a hypervisor that does not keep the
    // guest's `xsetbv` gives: nested KVM under QEMU's TCG runs the guest
    // with XCR0 = x87 whatever the kernel set.
    if state.cr4 & design::CR4_OSXSAVE != 0 {
        if let (Some(xcr0), Some(features)) = (state.xcr0, image.features) {
            let allowed = features.expected_xcr0();
            if xcr0 & !allowed != 0 || xcr0 & design::XCR0_X87 == 0 {
                found.add(format!(
                    "XCR0 is {xcr0:#x}: {}; the design allows {allowed:#x} (the user components the vCPU's CPUID reports, {:#x}, within {:#x}), x87 always",
                    if xcr0 & design::XCR0_X87 == 0 {
                        "x87 clear".to_string()
                    } else {
                        format!("components {:#x} beyond the design", xcr0 & !allowed)
                    },
                    features.xcr0_supported,
                    design::XCR0_USER_MAX
                ));
            }
        }
    }
    // DR7: no breakpoint enabled.
    if let Some(dr7) = state.dr7.filter(|dr7| dr7 & DR7_ENABLES != 0) {
        let enabled: Vec<String> = (0..4)
            .flat_map(|i| [(i, 'L', 2 * i), (i, 'G', 2 * i + 1)])
            .filter(|&(_, _, bit)| dr7 & (1 << bit) != 0)
            .map(|(i, kind, _)| format!("{kind}{i}"))
            .collect();
        found.add(format!("DR7 is {dr7:#x}: breakpoints enabled ({}), expected none", enabled.join(" ")));
    }
    // Segments.
    let cs = state.cs;
    if state.in_ring3() {
        if cs.selector != design::USER_CODE_SELECTOR || !cs.l || cs.db || cs.dpl != 3 {
            found.add(format!(
                "CS in ring 3 is {:#x} (L={}, D={}, DPL {}), expected {:#x}, a 64-bit code segment of DPL 3",
                cs.selector,
                u8::from(cs.l),
                u8::from(cs.db),
                cs.dpl,
                design::USER_CODE_SELECTOR
            ));
        }
        if state.ss.selector != design::USER_DATA_SELECTOR {
            found.add(format!(
                "SS in ring 3 is {:#x}, expected {:#x}",
                state.ss.selector,
                design::USER_DATA_SELECTOR
            ));
        }
    } else if cs.selector != design::KERNEL_CODE_SELECTOR || !cs.l || cs.db {
        found.add(format!(
            "CS in ring 0 is {:#x} (L={}, D={}), expected {:#x}, the kernel's 64-bit code segment",
            cs.selector,
            u8::from(cs.l),
            u8::from(cs.db),
            design::KERNEL_CODE_SELECTOR
        ));
    }
    let ldt = state.ldt;
    if ldt.selector & !3 != 0 || (ldt.present && !ldt.unusable) {
        found.add(format!(
            "LDTR is {:#x} (base {:#x}, limit {:#x}, present {}), expected the null selector: no LDT",
            ldt.selector, ldt.base, ldt.limit, ldt.present
        ));
    }
    let tr = state.tr;
    if tr.selector != design::TSS_SELECTOR
        || !tr.present
        || tr.unusable
        || tr.kind != TSS_BUSY
        || u64::from(tr.limit) < TSS_SIZE - 1
    {
        found.add(format!(
            "TR is {:#x} (type {:#x}, present {}, limit {:#x}), expected {:#x}, a busy 64-bit TSS of at least {:#x} bytes",
            tr.selector,
            tr.kind,
            tr.present,
            tr.limit,
            design::TSS_SELECTOR,
            TSS_SIZE
        ));
    }
    if u64::from(state.gdt.limit) != GDT_LIMIT {
        found.add(format!(
            "GDTR limit is {:#x}, expected {GDT_LIMIT:#x} ({} descriptors)",
            state.gdt.limit,
            design::GDT_SLOTS
        ));
    }
    if u64::from(state.idt.limit) != IDT_LIMIT {
        found.add(format!("IDTR limit is {:#x}, expected {IDT_LIMIT:#x} (256 gates)", state.idt.limit));
    }
    msrs(found, state, image, expected.cpu);
}

fn msrs(found: &mut Findings, state: &CpuState, image: &KernelImage, cpu: u32) {
    let name_of = |index: u32| MSRS.iter().find(|(i, _)| *i == index).map_or("?", |(_, n)| n);
    let index = (cpu as usize).min(design::MAX_CPUS as usize - 1);
    let (syscall_entry, foreign_entry) = (symbols::SYSCALL_ENTRIES[index], symbols::FOREIGN_ENTRIES[index]);
    let foreign = || format!("the entry that kills the caller, `{foreign_entry}`");
    let kernel_stack = stack_top(found, image, cpu, design::CpuStack::Kernel);
    let entries: [(u32, Option<u64>, String, bool); 8] = [
        (
            msr::STAR,
            Some(design::STAR_VALUE),
            "CS 0x10/SS 0x18 on entry, 0x23 for a 32-bit sysret".into(),
            false,
        ),
        (msr::LSTAR, symbol(found, image, syscall_entry, "LSTAR"), format!("`{syscall_entry}`"), false),
        (msr::CSTAR, symbol(found, image, foreign_entry, "CSTAR and SYSENTER_EIP"), foreign(), false),
        (msr::SFMASK, Some(design::SFMASK_VALUE), "IF TF DF IOPL AC NT cleared on entry".into(), false),
        (
            msr::SYSENTER_CS,
            Some(design::SYSENTER_CS_VALUE),
            "zero: sysenter never enters ring 0".into(),
            false,
        ),
        // AMD keeps only the low 32 bits of SYSENTER_ESP and SYSENTER_EIP
        // (KVM reads them back so there): the symbol or its low half.
        (
            msr::SYSENTER_ESP,
            kernel_stack.as_ref().map(|(top, _)| *top),
            format!("the kernel stack top, {}", kernel_stack.as_ref().map_or("?", |(_, what)| what.as_str())),
            true,
        ),
        (msr::SYSENTER_EIP, image.symbols.get(foreign_entry).copied(), foreign(), true),
        (msr::KERNEL_GS_BASE, Some(0), "zero: the kernel never uses swapgs".into(), false),
    ];
    for (index, wanted, meaning, low_half_ok) in entries {
        let name = name_of(index);
        let Some(value) = state.msr(index) else {
            found.add(format!("MSR {name} ({index:#x}) could not be read"));
            continue;
        };
        let Some(wanted) = wanted else { continue };
        let accepted = value == wanted || (low_half_ok && value == wanted & 0xffff_ffff);
        if !accepted {
            found.add(format!("MSR {name} ({index:#x}) is {value:#x}, expected {wanted:#x} ({meaning})"));
        }
    }
    // FS_BASE and GS_BASE are user state (private to each process): read,
    // not compared.
}

/// True if `va` is in the kernel half.
fn kernel_half(va: u64) -> bool {
    va >= KERNEL_HALF_START
}

fn tables(found: &mut Findings, state: &CpuState, expected: Expected<'_>, ram: &GuestRam) {
    let image = expected.image;
    let text = match (image.symbols.get(symbols::TEXT_START), image.symbols.get(symbols::TEXT_END)) {
        (Some(&start), Some(&end)) if start < end => Some((start, end)),
        _ => {
            found.add(format!(
                "the kernel ELF has no `{}`..`{}` range: IDT handlers cannot be checked",
                symbols::TEXT_START,
                symbols::TEXT_END
            ));
            None
        }
    };
    gdt(found, state, ram);
    tss(found, state, image, expected.cpu, ram);
    idt(found, state, text, ram);
}

fn gdt(found: &mut Findings, state: &CpuState, ram: &GuestRam) {
    let len = u64::from(state.gdt.limit) + 1;
    let Some(bytes) = read_table_in(found, state, ram, "GDT", state.gdt.base, len) else { return };
    let slot = |i: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        u64::from_le_bytes(raw)
    };
    let slots = bytes.len() / 8;
    let tss_slot = usize::from(design::TSS_SELECTOR / 8);
    let mut i = 0;
    while i < slots {
        let raw = slot(i);
        let d = SegmentDescriptor { raw };
        let selector = i * 8;
        // The general rules first: what would give ring 3 a way in.
        if d.present() && d.dpl() == 3 && d.is_code() && !d.is_long_mode_code() {
            found.add_at(
                format!(
                    "GDT slot {selector:#x} is {raw:#018x}, a present DPL-3 code segment that is not 64-bit: ring 3 could far-jump to selector {:#x} and run compatibility-mode code",
                    selector | 3
                ),
                state.gdt.base + selector as u64,
            );
        } else if d.present() && d.dpl() == 3 && !d.is_code_or_data() {
            found.add_at(
                format!(
                    "GDT slot {selector:#x} is {raw:#018x}, a present DPL-3 system descriptor (type {:#x}): ring 3 could use it as a call gate or task",
                    d.system_type()
                ),
                state.gdt.base + selector as u64,
            );
        } else if i == tss_slot {
            tss_descriptor(found, state, raw, (i + 1 < slots).then(|| slot(i + 1)));
            i += 2;
            continue;
        } else if let Some(&(_, want, what)) = DESIGNED_GDT.iter().find(|(s, ..)| usize::from(*s) == selector)
        {
            if raw & !ACCESSED != want & !ACCESSED {
                found.add_at(
                    format!("GDT slot {selector:#x} is {raw:#018x}, expected {want:#018x} ({what})"),
                    state.gdt.base + selector as u64,
                );
            }
        } else if d.present() {
            found.add_at(
                format!("GDT slot {selector:#x} is {raw:#018x}, a present descriptor beyond the designed {} slots", design::GDT_SLOTS),
                state.gdt.base + selector as u64,
            );
        }
        i += 1;
    }
    if slots <= tss_slot {
        found.add(format!(
            "the GDT (limit {:#x}) does not reach the TSS descriptor at {:#x}",
            state.gdt.limit,
            design::TSS_SELECTOR
        ));
    }
}

/// The 16-byte TSS descriptor must describe what TR holds: a 64-bit TSS of
/// DPL 0 at TR's base, with TR's limit.
fn tss_descriptor(found: &mut Findings, state: &CpuState, low: u64, high: Option<u64>) {
    let d = SegmentDescriptor { raw: low };
    let base = ((low >> 16) & 0xff_ffff) | (((low >> 56) & 0xff) << 24) | (high.unwrap_or(0) << 32);
    let limit = (low & 0xffff) | (((low >> 48) & 0xf) << 16);
    let granular = low & (1 << 55) != 0;
    let mut problems = Vec::new();
    if !d.is_tss() || !d.present() {
        problems.push(format!("not a present 64-bit TSS (type {:#x})", d.system_type()));
    }
    if d.dpl() != 0 {
        problems.push(format!("DPL {}", d.dpl()));
    }
    if granular {
        problems.push("page granular".to_string());
    }
    match high {
        None => problems.push("its upper half is beyond the GDT limit".to_string()),
        Some(high) if high >> 32 != 0 => problems.push(format!("upper half {high:#x} has reserved bits set")),
        Some(_) => {}
    }
    if base != state.tr.base {
        problems.push(format!("base {base:#x} but TR's is {:#x}", state.tr.base));
    }
    if limit != u64::from(state.tr.limit) {
        problems.push(format!("limit {limit:#x} but TR's is {:#x}", state.tr.limit));
    }
    if !problems.is_empty() {
        found.add_at(
            format!(
                "GDT slot {:#x} (the TSS descriptor) is {low:#018x} {:#018x}: {}",
                design::TSS_SELECTOR,
                high.unwrap_or(0),
                problems.join(", ")
            ),
            state.gdt.base + u64::from(design::TSS_SELECTOR),
        );
    }
}

fn tss(found: &mut Findings, state: &CpuState, image: &KernelImage, cpu: u32, ram: &GuestRam) {
    let base = state.tr.base;
    let Some(bytes) = read_table_in(found, state, ram, "TSS", base, TSS_SIZE) else { return };
    let u64_at = |offset: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[offset..offset + 8]);
        u64::from_le_bytes(raw)
    };
    // RSP0: the kernel stack; RSP1 and RSP2 unused.
    let kernel_stack = stack_top(found, image, cpu, design::CpuStack::Kernel);
    let rsp0 = u64_at(4);
    if let Some((top, what)) = &kernel_stack {
        if rsp0 != *top {
            found.add_at(format!("TSS.RSP0 is {rsp0:#x}, expected {top:#x} ({what})"), base + 4);
        }
    }
    for (ring, offset) in [(1, 12), (2, 20)] {
        let value = u64_at(offset);
        if value != 0 {
            found.add_at(
                format!("TSS.RSP{ring} is {value:#x}, expected 0 (no ring {ring})"),
                base + offset as u64,
            );
        }
    }
    // The IST slots: the designed ones at their stack tops, the rest zero.
    let mut stacks = Vec::new();
    if kernel_stack.map(|(top, _)| top) == Some(rsp0) {
        stacks.push(("RSP0 (the kernel stack)".to_string(), rsp0));
    }
    for slot in 1..=7u8 {
        let offset = 0x24 + 8 * (usize::from(slot) - 1);
        let value = u64_at(offset);
        match IST_SLOTS.iter().position(|s| s.slot == slot) {
            Some(index) => {
                let designed = IST_SLOTS[index];
                let Some((top, what)) = stack_top(found, image, cpu, design::CpuStack::Ist(index)) else {
                    continue;
                };
                if value != top {
                    found.add_at(
                        format!(
                            "TSS.IST{slot} (vector {}) is {value:#x}, expected {top:#x} ({what})",
                            designed.vector
                        ),
                        base + offset as u64,
                    );
                } else {
                    stacks.push((format!("IST{slot} (vector {})", designed.vector), value));
                }
            }
            None if value != 0 => found
                .add_at(format!("TSS.IST{slot} is {value:#x}, expected 0 (unused)"), base + offset as u64),
            None => {}
        }
    }
    let iomap = u64::from(u16::from_le_bytes([bytes[0x66], bytes[0x67]]));
    if iomap <= u64::from(state.tr.limit) {
        found.add_at(
            format!(
                "the TSS I/O map base {iomap:#x} is inside its limit {:#x}: an I/O permission bitmap could open ports to ring 3",
                state.tr.limit
            ),
            base + 0x66,
        );
    }
    // Each stack the CPU switches to must be kernel memory: present,
    // writable, supervisor-only (its first page below the top). Checked
    // where the TSS holds the designed top (else that is the finding).
    for (what, top) in stacks {
        let probe = top.wrapping_sub(8);
        let problem = if !kernel_half(probe) {
            Some("outside the kernel half".to_string())
        } else {
            match walk::translate(ram, state.cr3, probe) {
                Err(why) => Some(format!("not mapped ({why})")),
                Ok(t) if t.user => Some("user-accessible".to_string()),
                Ok(t) if !t.writable => Some("read-only".to_string()),
                Ok(_) => None,
            }
        };
        if let Some(problem) = problem {
            found.add_at(format!("the {what} stack below {top:#x} is {problem}"), probe);
        }
    }
}

fn idt(found: &mut Findings, state: &CpuState, text: Option<(u64, u64)>, ram: &GuestRam) {
    let len = (u64::from(state.idt.limit) + 1).min(IDT_LIMIT + 1);
    let Some(bytes) = read_table_in(found, state, ram, "IDT", state.idt.base, len) else { return };
    for (vector, chunk) in bytes.chunks_exact(16).enumerate() {
        let mut raw = [0u8; 16];
        raw.copy_from_slice(chunk);
        let gate = IdtGate::decode(&raw);
        if !gate.present {
            continue;
        }
        let vector = vector as u8;
        let mut problems = Vec::new();
        if gate.selector != design::KERNEL_CODE_SELECTOR {
            problems.push(format!(
                "selector {:#x} (expected {:#x})",
                gate.selector,
                design::KERNEL_CODE_SELECTOR
            ));
        }
        if gate.gate_type != INTERRUPT_GATE {
            problems.push(format!(
                "type {:#x} (expected {INTERRUPT_GATE:#x}, an interrupt gate)",
                gate.gate_type
            ));
        }
        if let Some((start, end)) = text {
            if !(start..end).contains(&gate.offset) {
                problems
                    .push(format!("handler {:#x} outside the kernel text {start:#x}..{end:#x}", gate.offset));
            }
        }
        if gate.dpl != 0 && vector != design::USER_GATE_VECTOR {
            problems.push(format!(
                "DPL {} (ring 3 could raise it with `int {vector:#x}`; only {} may be DPL 3)",
                gate.dpl,
                design::USER_GATE_VECTOR
            ));
        }
        let ist = IST_SLOTS.iter().find(|s| s.vector == vector).map_or(0, |s| s.slot);
        if gate.ist != ist {
            problems.push(format!("IST {} (expected {ist})", gate.ist));
        }
        if !problems.is_empty() {
            found.add_at(
                format!("IDT gate {vector} ({vector:#x}) has {}", problems.join(", ")),
                state.idt.base + u64::from(vector) * 16,
            );
        }
    }
}

/// Reads a descriptor table (or the TSS) a register names: it must lie in
/// the kernel half, and is read through the current CR3.
fn read_table_in(
    found: &mut Findings,
    state: &CpuState,
    ram: &GuestRam,
    what: &str,
    base: u64,
    len: u64,
) -> Option<Vec<u8>> {
    if !kernel_half(base) {
        found.add_at(format!("the {what} is at {base:#x}, outside the kernel half"), base);
        return None;
    }
    match walk::read_virtual(ram, state.cr3, base, len as usize) {
        Ok(bytes) => Some(bytes),
        Err(why) => {
            found.add_at(
                format!("the {what} at {base:#x} cannot be read through CR3 {:#x}: {why}", state.cr3),
                base,
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::paging::{PTE_NO_EXECUTE, PTE_PRESENT, PTE_USER, PTE_WRITABLE};
    use crate::walk::tests::Tables;
    use superos_protocol::layout::PAGE_SIZE;

    const TEXT: u64 = 0xffff_ffff_8010_0000;
    const TEXT_END: u64 = TEXT + 0x2000;
    const SYSCALL_ENTRY: u64 = TEXT + 0x100;
    const FOREIGN_ENTRY: u64 = TEXT + 0x200;
    const GDT: u64 = 0xffff_ffff_8020_0388;
    const IDT: u64 = 0xffff_ffff_8020_1000;
    const TSS: u64 = 0xffff_ffff_8020_23e0;
    const STACK_TOP: u64 = 0xffff_ffff_8030_0000;
    /// IST slot n's stack top.
    fn ist_top(slot: u8) -> u64 {
        STACK_TOP + u64::from(slot) * 0x10_000
    }
    const RW: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE;

    /// A guest with the designed CPU state: its page tables (CR3), GDT,
    /// IDT, TSS and stacks in the kernel half, and the registers.
    struct Machine {
        ram: GuestRam,
        image: KernelImage,
        state: CpuState,
    }

    impl Machine {
        fn new() -> Machine {
            let ram = GuestRam::new(16).unwrap();
            let mut t = Tables { ram: &ram, next: 0x10_0000 };
            let pml4 = t.frame();
            // Text (read-only, executable), the tables' page, the stacks.
            for i in 0..2 {
                let frame = t.frame();
                t.map(pml4, TEXT + i * PAGE_SIZE, frame, PTE_PRESENT);
            }
            let tables = t.frame();
            for (i, va) in [GDT, IDT, TSS].into_iter().enumerate() {
                let _ = i;
                t.map(pml4, va & !(PAGE_SIZE - 1), tables + (va & 0x3000), RW);
            }
            // Three pages: GDT, IDT and TSS each in a page of their own.
            for page in 1..3 {
                let frame = t.frame();
                t.map(pml4, (GDT & !(PAGE_SIZE - 1)) + page * PAGE_SIZE, frame, RW);
            }
            for top in std::iter::once(STACK_TOP).chain((1..=4).map(ist_top)) {
                let frame = t.frame();
                t.map(pml4, top - PAGE_SIZE, frame, RW);
            }
            let mut symbols: BTreeMap<String, u64> = [
                (symbols::SYSCALL_ENTRY, SYSCALL_ENTRY),
                (symbols::FOREIGN_ENTRY, FOREIGN_ENTRY),
                (symbols::KERNEL_STACK_TOP, STACK_TOP),
                (symbols::TEXT_START, TEXT),
                (symbols::TEXT_END, TEXT_END),
            ]
            .into_iter()
            .map(|(name, address)| (name.to_string(), address))
            .collect();
            for slot in IST_SLOTS {
                symbols.insert(slot.top_symbol.to_string(), ist_top(slot.slot));
            }
            let features = CpuFeatures {
                smep: true,
                smap: true,
                umip: true,
                fsgsbase: true,
                xsave: true,
                xcr0_supported: 0x2e7,
            };
            let image = KernelImage { read_only: None, symbols, features: Some(features) };
            let segment = |selector: u16, kind: u8, l: bool| Segment {
                selector,
                kind,
                present: true,
                s: true,
                l,
                limit: 0xffff_ffff,
                ..Default::default()
            };
            let state = CpuState {
                rip: TEXT + 0x40,
                rflags: 0x46,
                cr0: 0x8005_0033,
                cr3: pml4,
                cr4: 0x35_0e20,
                efer: 0xd00,
                cs: segment(0x10, 0xb, true),
                ss: Segment::default(),
                tr: Segment {
                    selector: 0x40,
                    base: TSS,
                    limit: 0x67,
                    kind: 0xb,
                    present: true,
                    ..Default::default()
                },
                ldt: Segment { kind: 2, unusable: true, ..Default::default() },
                gdt: TableRegister { base: GDT, limit: 0x4f },
                idt: TableRegister { base: IDT, limit: 0xfff },
                msrs: vec![
                    (msr::STAR, design::STAR_VALUE),
                    (msr::LSTAR, SYSCALL_ENTRY),
                    (msr::CSTAR, FOREIGN_ENTRY),
                    (msr::SFMASK, design::SFMASK_VALUE),
                    (msr::SYSENTER_CS, 0),
                    (msr::SYSENTER_ESP, STACK_TOP),
                    (msr::SYSENTER_EIP, FOREIGN_ENTRY),
                    (msr::FS_BASE, 0x7000_0000),
                    (msr::GS_BASE, 0),
                    (msr::KERNEL_GS_BASE, 0),
                ],
                xcr0: Some(0xe7),
                dr7: Some(0x400),
                errors: Vec::new(),
                general: [0; 16],
                fpu: None,
            };
            let machine = Machine { ram, image, state };
            // The GDT: the designed slots and the TSS descriptor.
            for (selector, raw, _) in DESIGNED_GDT {
                machine.write_virtual(GDT + u64::from(selector), &raw.to_le_bytes());
            }
            let low = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56);
            machine.write_virtual(GDT + 0x40, &(low | (2 << 40)).to_le_bytes());
            machine.write_virtual(GDT + 0x48, &(TSS >> 32).to_le_bytes());
            // The IDT: the vectors the kernel installs.
            let vectors = (0..=8).chain(10..=14).chain(16..=21).chain([28, 29, 30, 32, 255]);
            for vector in vectors {
                let ist = IST_SLOTS.iter().find(|s| s.vector == vector).map_or(0, |s| s.slot);
                let dpl = if vector == design::USER_GATE_VECTOR { 3 } else { 0 };
                machine.set_gate(vector, TEXT + 0x1000 + u64::from(vector) * 16, 0x10, ist, 0xe, dpl);
            }
            // The TSS.
            machine.write_virtual(TSS + 4, &STACK_TOP.to_le_bytes());
            for slot in 1..=4 {
                machine.write_virtual(TSS + 0x24 + 8 * (u64::from(slot) - 1), &ist_top(slot).to_le_bytes());
            }
            machine.write_virtual(TSS + 0x66, &0x68u16.to_le_bytes());
            machine
        }

        fn write_virtual(&self, va: u64, bytes: &[u8]) {
            let leaf = walk::translate(&self.ram, self.state.cr3, va).unwrap();
            self.ram.write_bytes(leaf.phys, bytes).unwrap();
        }

        fn set_gate(&self, vector: u8, offset: u64, selector: u16, ist: u8, kind: u8, dpl: u8) {
            let low = (offset & 0xffff)
                | (u64::from(selector) << 16)
                | (u64::from(ist) << 32)
                | (u64::from(kind) << 40)
                | (u64::from(dpl) << 45)
                | (1 << 47)
                | (((offset >> 16) & 0xffff) << 48);
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&low.to_le_bytes());
            bytes[8..12].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
            self.write_virtual(IDT + u64::from(vector) * 16, &bytes);
        }

        fn findings(&self, gate_kind: Option<u32>) -> Vec<String> {
            check(&self.state, Expected { image: &self.image, gate_kind, cpu: 0 }, &self.ram)
                .into_iter()
                .inspect(|v| assert_eq!(v.invariant, Invariant::CpuStateIntact))
                .map(|v| v.details)
                .collect()
        }
    }

    /// Applies `change` to a clean machine; exactly one finding, which
    /// contains every one of `needles`.
    #[track_caller]
    fn one(change: impl FnOnce(&mut Machine), needles: &[&str]) -> String {
        let mut machine = Machine::new();
        change(&mut machine);
        let found = machine.findings(Some(GATE_KIND_INT3));
        assert_eq!(found.len(), 1, "{found:#?}");
        for needle in needles {
            assert!(found[0].contains(needle), "{needle:?} not in {:?}", found[0]);
        }
        found[0].clone()
    }

    fn set_msr(machine: &mut Machine, index: u32, value: u64) {
        machine.state.msrs.iter_mut().find(|(i, _)| *i == index).unwrap().1 = value;
    }

    #[test]
    fn the_designed_state_has_no_finding() {
        let machine = Machine::new();
        assert_eq!(machine.findings(Some(GATE_KIND_INT3)), Vec::<String>::new());
        assert_eq!(machine.findings(None), Vec::<String>::new(), "EFER.SCE is not checked before the gate");
        // In ring 3: CS 0x33 (64-bit, DPL 3), SS 0x2b.
        let mut user = Machine::new();
        user.state.cs =
            Segment { selector: 0x33, dpl: 3, l: true, present: true, s: true, kind: 0xb, ..user.state.cs };
        user.state.ss.selector = 0x2b;
        assert_eq!(user.findings(Some(GATE_KIND_INT3)), Vec::<String>::new());
    }

    #[test]
    fn entry_msrs_must_name_the_designed_entries() {
        one(
            |m| set_msr(m, msr::CSTAR, 0),
            &["MSR CSTAR (0xc0000083) is 0x0, expected 0xffffffff80100200", "foreign_entry"],
        );
        one(|m| set_msr(m, msr::LSTAR, 0x40_0000), &["MSR LSTAR", "is 0x400000", "`syscall_entry`"]);
        one(|m| set_msr(m, msr::STAR, 0x0023_0010_0000_0000 | (0x1b << 48)), &["MSR STAR"]);
        one(|m| set_msr(m, msr::SFMASK, 0x200), &["MSR SFMASK (0xc0000084) is 0x200, expected 0x47700"]);
        one(|m| set_msr(m, msr::SYSENTER_CS, 0x10), &["MSR SYSENTER_CS (0x174) is 0x10, expected 0x0"]);
        one(|m| set_msr(m, msr::KERNEL_GS_BASE, 0x1000), &["MSR KERNEL_GS_BASE"]);
        one(|m| set_msr(m, msr::SYSENTER_EIP, 0x40_0000), &["MSR SYSENTER_EIP (0x176) is 0x400000"]);
        // AMD keeps the low 32 bits of the SYSENTER MSRs: accepted.
        let mut amd = Machine::new();
        set_msr(&mut amd, msr::SYSENTER_EIP, FOREIGN_ENTRY & 0xffff_ffff);
        set_msr(&mut amd, msr::SYSENTER_ESP, STACK_TOP & 0xffff_ffff);
        assert_eq!(amd.findings(Some(GATE_KIND_INT3)), Vec::<String>::new());
        // FS and GS bases are user state: anything goes.
        let mut user = Machine::new();
        set_msr(&mut user, msr::GS_BASE, 0x1234_5000);
        assert_eq!(user.findings(Some(GATE_KIND_INT3)), Vec::<String>::new());
        // An MSR KVM did not return is a finding, not a panic.
        one(|m| m.state.msrs.retain(|(i, _)| *i != msr::STAR), &["MSR STAR (0xc0000081) could not be read"]);
    }

    #[test]
    fn control_registers_efer_xcr0_and_dr7_follow_the_design_and_the_cpuid() {
        one(|m| m.state.cr0 &= !design::CR0_WP, &["CR0 is 0x80040033: WP clear"]);
        one(|m| m.state.cr0 |= design::CR0_TS, &["CR0", "TS set"]);
        one(
            |m| m.state.cr4 &= !design::CR4_SMEP,
            &["CR4 is 0x250e20: SMEP clear, but the vCPU's CPUID has the feature"],
        );
        one(|m| m.state.cr4 |= design::CR4_PKE, &["PKE set (forbidden)"]);
        one(
            |m| m.image.features.as_mut().unwrap().fsgsbase = false,
            &["FSGSBASE set, but the vCPU's CPUID lacks the feature"],
        );
        one(|m| m.image.features = None, &["the vCPU's CPUID is unknown"]);
        one(
            |m| m.state.xcr0 = Some(0x2e7),
            &["XCR0 is 0x2e7: components 0x200 beyond the design; the design allows 0xe7"],
        );
        one(|m| m.state.xcr0 = Some(0x2), &["XCR0 is 0x2: x87 clear"]);
        // Fewer components than the kernel set (a hypervisor that dropped
        // its xsetbv) only take instructions away from ring 3.
        let mut fewer = Machine::new();
        fewer.state.xcr0 = Some(0x3);
        assert!(fewer.findings(Some(GATE_KIND_INT3)).is_empty());
        one(|m| m.state.dr7 = Some(0x402), &["DR7 is 0x402: breakpoints enabled (G0), expected none"]);
        one(
            |m| m.state.efer |= design::EFER_SCE,
            &["EFER is 0xd01: SCE set although the int3 gate is in use"],
        );
        one(|m| m.state.efer &= !design::EFER_NXE, &["EFER is 0x500: NXE clear"]);
        let mut syscall = Machine::new();
        assert_eq!(syscall.findings(Some(GATE_KIND_SYSCALL)).len(), 1, "SCE clear with the syscall gate");
        syscall.state.efer |= design::EFER_SCE;
        assert_eq!(syscall.findings(Some(GATE_KIND_SYSCALL)), Vec::<String>::new());
        one(|m| m.state.rflags |= 3 << 12, &["IOPL 3"]);
        one(|m| m.state.rflags |= design::RFLAGS_AC, &["AC set (SMAP lifted)"]);
        // Without XSAVE, XCR0 is not read and not compared.
        let mut old = Machine::new();
        old.state.cr4 &= !design::CR4_OSXSAVE;
        old.state.xcr0 = None;
        old.image.features.as_mut().unwrap().xsave = false;
        assert_eq!(old.findings(Some(GATE_KIND_INT3)), Vec::<String>::new());
    }

    #[test]
    fn segments_ldt_tr_and_table_registers() {
        one(
            |m| {
                m.state.cs = Segment { selector: 0x23, dpl: 3, l: false, db: true, ..m.state.cs };
                m.state.ss.selector = 0x2b;
            },
            &["CS in ring 3 is 0x23 (L=0, D=1, DPL 3), expected 0x33"],
        );
        one(
            |m| m.state.ldt = Segment { present: true, limit: 0xffff, ..Default::default() },
            &["LDTR is 0x0", "no LDT"],
        );
        one(|m| m.state.tr.kind = 0x9, &["TR is 0x40 (type 0x9"]);
        one(|m| m.state.idt.limit = 0x7ff, &["IDTR limit is 0x7ff, expected 0xfff"]);
    }

    #[test]
    fn the_gdt_has_exactly_the_designed_descriptors() {
        // What slot 0x20 held before the fix: a DPL-3 32-bit code segment.
        let found = one(
            |m| m.write_virtual(GDT + 0x20, &0x00cf_fa00_0000_ffffu64.to_le_bytes()),
            &[
                "GDT slot 0x20 is 0x00cffa000000ffff, a present DPL-3 code segment that is not 64-bit",
                "selector 0x23",
            ],
        );
        assert!(found.contains("compatibility-mode"), "{found}");
        one(
            |m| m.write_virtual(GDT + 0x38, &(0x0000_ec00_0010_0000u64).to_le_bytes()),
            &["GDT slot 0x38", "a present DPL-3 system descriptor (type 0xc)"],
        );
        one(
            |m| m.write_virtual(GDT + 0x10, &0x00cf_9b00_0000_ffffu64.to_le_bytes()),
            &["GDT slot 0x10 is 0x00cf9b000000ffff, expected 0x00af9b000000ffff (kernel 64-bit code)"],
        );
        one(
            |m| m.write_virtual(GDT + 0x18, &0x00cf_b300_0000_ffffu64.to_le_bytes()),
            &["GDT slot 0x18 is 0x00cfb3000000ffff, expected 0x00cf93000000ffff (kernel data)"],
        );
        let tss_low = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x8b << 40) | (((TSS >> 24) & 0xff) << 56);
        one(
            |m| m.write_virtual(GDT + 0x40, &(tss_low + (8 << 16)).to_le_bytes()),
            &["GDT slot 0x40 (the TSS descriptor)", "base 0xffffffff802023e8 but TR's is 0xffffffff802023e0"],
        );
        one(
            |m| m.write_virtual(GDT + 0x40, &(tss_low | (3 << 45)).to_le_bytes()),
            &["a present DPL-3 system descriptor (type 0xb)"],
        );
        // A longer GDT with a present descriptor beyond the design.
        let mut longer = Machine::new();
        longer.state.gdt.limit = 0x57;
        longer.write_virtual(GDT + 0x50, &0x00cf_9300_0000_ffffu64.to_le_bytes());
        let found = longer.findings(Some(GATE_KIND_INT3));
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].contains("GDTR limit is 0x57"), "{found:#?}");
        assert!(
            found[1].contains("GDT slot 0x50") && found[1].contains("beyond the designed 10 slots"),
            "{found:#?}"
        );
        // The accessed bit is the CPU's.
        let accessed = Machine::new();
        accessed.write_virtual(GDT + 0x10, &(0x00af_9b00_0000_ffffu64 & !ACCESSED).to_le_bytes());
        assert_eq!(accessed.findings(Some(GATE_KIND_INT3)), Vec::<String>::new());
    }

    #[test]
    fn every_present_idt_gate_is_a_kernel_interrupt_gate() {
        let found = one(|m| m.set_gate(13, TEXT + 0x10d0, 0x10, 0, 0xe, 3), &["IDT gate 13 (0xd) has DPL 3"]);
        assert!(found.contains("`int 0xd`"), "{found}");
        one(
            |m| m.set_gate(14, 0x40_0000, 0x10, 0, 0xe, 0),
            &["IDT gate 14 (0xe) has handler 0x400000 outside the kernel text"],
        );
        one(
            |m| m.set_gate(14, TEXT + 0x10e0, 0x10, 0, 0xf, 0),
            &["type 0xf (expected 0xe, an interrupt gate)"],
        );
        one(|m| m.set_gate(14, TEXT + 0x10e0, 0x33, 0, 0xe, 0), &["selector 0x33 (expected 0x10)"]);
        one(|m| m.set_gate(2, TEXT + 0x1020, 0x10, 0, 0xe, 0), &["IDT gate 2 (0x2) has IST 0 (expected 2)"]);
        one(|m| m.set_gate(14, TEXT + 0x10e0, 0x10, 5, 0xe, 0), &["IST 5 (expected 0)"]);
        // A new gate for a vector the kernel does not install is checked too.
        one(|m| m.set_gate(0x80, TEXT, 0x10, 0, 0xe, 3), &["IDT gate 128 (0x80) has DPL 3"]);
    }

    #[test]
    fn the_tss_names_the_kernel_stacks_and_no_io_bitmap() {
        one(
            |m| m.write_virtual(TSS + 4, &0x7fff_ff00_0000u64.to_le_bytes()),
            &["TSS.RSP0 is 0x7fffff000000, expected 0xffffffff80300000 (`__kernel_stack_top`)"],
        );
        one(|m| m.write_virtual(TSS + 0x24, &0u64.to_le_bytes()), &["TSS.IST1 (vector 8) is 0x0"]);
        one(
            |m| m.write_virtual(TSS + 0x24 + 8 * 5, &0x1000u64.to_le_bytes()),
            &["TSS.IST6 is 0x1000, expected 0 (unused)"],
        );
        one(|m| m.write_virtual(TSS + 12, &1u64.to_le_bytes()), &["TSS.RSP1 is 0x1"]);
        one(
            |m| m.write_virtual(TSS + 0x66, &0x60u16.to_le_bytes()),
            &["I/O map base 0x60 is inside its limit 0x67"],
        );
        // The stacks must be supervisor-only, writable kernel memory.
        let user = one(
            |m| {
                let leaf = walk::translate(&m.ram, m.state.cr3, STACK_TOP - 8).unwrap();
                let slot = crate::walk::entry_slot(&m.ram, m.state.cr3, STACK_TOP - 8, 1).unwrap();
                m.ram.write(slot, &(leaf.entry | PTE_USER)).unwrap();
                // U at every level above too (the test tables have it).
            },
            &["the RSP0 (the kernel stack) stack below 0xffffffff80300000 is user-accessible"],
        );
        assert!(!user.is_empty());
        one(
            |m| {
                let slot = crate::walk::entry_slot(&m.ram, m.state.cr3, ist_top(1) - 8, 1).unwrap();
                m.ram.write(slot, &0u64).unwrap();
            },
            &["the IST1 (vector 8) stack below", "is not mapped"],
        );
    }

    #[test]
    fn hostile_states_are_findings_not_panics() {
        // Tables outside the kernel half, unmapped, or huge.
        one(|m| m.state.gdt.base = 0x1000, &["the GDT is at 0x1000, outside the kernel half"]);
        one(|m| m.state.idt.base = 0xffff_8000_dead_0000, &["the IDT at 0xffff8000dead0000 cannot be read"]);
        let mut huge = Machine::new();
        huge.state.gdt.limit = 0xffff;
        huge.state.idt.limit = 0xffff;
        let found = huge.findings(Some(GATE_KIND_INT3));
        assert!(found.iter().any(|f| f.contains("cannot be read")), "{found:#?}");
        // Symbols the kernel ELF lacks: said, not assumed.
        let found = {
            let mut m = Machine::new();
            m.image.symbols.clear();
            m.findings(Some(GATE_KIND_INT3))
        };
        for name in ["syscall_entry", "foreign_entry", "__kernel_stack_top", "__ist_nmi_top"] {
            assert!(found.iter().any(|f| f.contains(&format!("no symbol `{name}`"))), "{name}: {found:#?}");
        }
        assert!(found.iter().any(|f| f.contains("IDT handlers cannot be checked")), "{found:#?}");
        // Registers KVM would not give.
        let mut unread = Machine::new();
        unread.state.errors.push("KVM_GET_XCRS failed: EINVAL".into());
        assert!(unread.findings(Some(GATE_KIND_INT3))[0].contains("could not be read in full: KVM_GET_XCRS"));
        // An unknown gate kind.
        let found = Machine::new().findings(Some(9));
        assert!(found.iter().any(|f| f.contains("gate kind 9")), "{found:#?}");
        // Random states over random RAM: never a panic.
        let ram = GuestRam::new(16).unwrap();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..4096u64 {
            ram.write(i * 8 * 512 % (16 << 20), &next()).unwrap();
        }
        let image = Machine::new().image;
        for _ in 0..200 {
            let state = CpuState {
                cr3: next() & 0xff_f000,
                gdt: TableRegister { base: next() | KERNEL_HALF_START, limit: next() as u16 },
                idt: TableRegister { base: next(), limit: next() as u16 },
                tr: Segment { base: next(), limit: next() as u32, ..Default::default() },
                rflags: next(),
                cr4: next(),
                ..Default::default()
            };
            let _ = check(&state, Expected { image: &image, gate_kind: Some(next() as u32), cpu: 0 }, &ram);
        }
    }

    #[test]
    fn features_come_from_leaves_1_7_and_0xd() {
        let all = [
            (0, 0, 0xd, 0, 0, 0),
            (1, 0, 0, 0, 1 << 26, 0),
            (7, 0, 0, (1 << 7) | (1 << 20) | 1, 1 << 2, 0),
            (0xd, 0, 0x2e7, 0, 0, 0),
        ];
        let features = CpuFeatures::from_entries(&all);
        assert_eq!(
            features,
            CpuFeatures {
                smep: true,
                smap: true,
                umip: true,
                fsgsbase: true,
                xsave: true,
                xcr0_supported: 0x2e7
            }
        );
        // PKRU (bit 9) is not a component the design enables.
        assert_eq!(features.expected_xcr0(), 0xe7);
        assert_eq!(features.cr4_supported(), 0x35_0800);
        // Leaves beyond the maximum basic leaf are not looked at, nor
        // subleaves other than 0.
        let low = [(0, 0, 6, 0, 0, 0), (7, 0, 0, 1 << 7, 0, 0), (0xd, 0, 0xff, 0, 0, 0)];
        assert_eq!(CpuFeatures::from_entries(&low), CpuFeatures { xcr0_supported: 3, ..Default::default() });
        let other_index = [(0, 0, 7, 0, 0, 0), (7, 1, 0, 1 << 7, 0, 0)];
        assert!(!CpuFeatures::from_entries(&other_index).smep);
        // The host's own CPUID is read without trouble.
        let _ = CpuFeatures::host();
    }

    #[test]
    fn the_gate_kind_is_the_last_kernel_ready_event_and_the_design_holds_from_the_self_test() {
        let entry = |event| EventEntry { seq: 0, tick: 0, cpu: None, event };
        assert_eq!(gate_kind(&[]), None);
        let events = [
            entry(Event::HypercallRefused { port: 0x501, status: 2 }),
            entry(Event::GateSelfTestFailed { gate_kind: 1, vector: 6, rip: 0, error_code: 0 }),
            entry(Event::KernelReady { gate_kind: 2, free_frames: 1, total_frames: 2, cpus: 1 }),
            entry(Event::ProcessSpawned { pid: 1, spec_index: 0, pml4_gpa: 0 }),
        ];
        assert_eq!(gate_kind(&events), Some(2));
        assert_eq!(gate_kind(&events[..2]), None);
        assert!(!design_in_force(&events[..1]));
        assert!(design_in_force(&events[..2]));
        assert!(design_in_force(&events[2..3]));
    }
}
