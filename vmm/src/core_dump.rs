//! ELF core files of the processes the kernel terminates
//! (`superos-vmm run --core-dir DIR`), for `gdb PROGRAM CORE`.
//!
//! At a `process-killed` event the kernel has published the process's
//! registers ([`FaultRegisters`], written just before the event) and its page
//! tables are still whole (the teardown starts after the event). The VMM
//! takes the registers only for the pid the event names, walks the page
//! tables itself ([`crate::walk`], with its budgets: a hostile kernel cannot
//! make the walk unbounded) and writes what the user half maps:
//!
//! - one `PT_LOAD` per run of pages with equal rights (`R`, `W` if
//!   writable, `X` unless no-execute), with the pages' contents;
//! - a `PT_NOTE` with `NT_PRSTATUS` (the general registers in Linux's
//!   `user_regs_struct` order, and the signal gdb reports), `NT_PRPSINFO`
//!   (the process name), `NT_SIGINFO` (signal and faulting address) and a
//!   `SUPEROS` note holding the event as the log prints it and the fault's
//!   name.
//!
//! The format is Linux's x86-64 core layout, which gdb reads without an OS
//! ABI of its own. It is written here field by field: a core needs only the
//! ELF header, program headers and notes (`object`'s writer is made for
//! relocatable objects and executables, and `linux-loader`'s ELF types have
//! no byte view). The FPU/SIMD state, the
//! segment bases and the shared regions the process owned (revoked from
//! everyone, itself included, before the event) are not in the file.

use crate::memory::GuestRam;
use crate::walk;
use superos_protocol::event::FaultKind;
use superos_protocol::introspect::FaultRegisters;
use zerocopy::IntoBytes;

const PAGE: u64 = 4096;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const NT_PRSTATUS: u32 = 1;
const NT_PRPSINFO: u32 = 3;
const NT_SIGINFO: u32 = 0x5349_4749;
/// The `SUPEROS` note's type: the event and the fault, as text.
pub const NT_SUPEROS_FAULT: u32 = 1;
/// `sizeof(struct elf_prstatus)` on x86-64.
const PRSTATUS_SIZE: usize = 336;
/// Offset of `pr_reg` in it.
const PRSTATUS_REGS: usize = 112;
/// `sizeof(struct elf_prpsinfo)` on x86-64.
const PRPSINFO_SIZE: usize = 136;
/// `sizeof(siginfo_t)`.
const SIGINFO_SIZE: usize = 128;

/// What a core file is made of besides guest memory.
#[derive(Clone, Debug)]
pub struct CoreProcess<'a> {
    /// The process's name (its scenario name).
    pub name: &'a str,
    /// The registers the kernel published for it.
    pub regs: FaultRegisters,
    /// The fault its event names (`None`: the event named none).
    pub fault: Option<FaultKind>,
    /// The event as the log prints it (of a live process: where the guest
    /// was when it was read).
    pub event: String,
    /// A live process (`inspect core`), not one the kernel killed: no
    /// signal, no fault.
    pub live: bool,
}

/// One run of equally mapped pages with their contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    /// First virtual address.
    pub va: u64,
    /// Writable from ring 3.
    pub writable: bool,
    /// Executable.
    pub executable: bool,
    /// The bytes, a whole number of pages.
    pub bytes: Vec<u8>,
}

/// One run of equally mapped pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First virtual address.
    pub va: u64,
    /// Its frames, one per page.
    pub frames: Vec<u64>,
    /// Writable from ring 3.
    pub writable: bool,
    /// Executable.
    pub executable: bool,
}

/// Makes `dir` ready for core files before the guest runs: created if
/// missing (a bad path is a usage error at once, not a warning per core).
pub fn prepare_dir(dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the core directory {}: {e}", dir.display()))?;
    let metadata = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !metadata.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    Ok(())
}

/// `name` as a file name: every character but ASCII letters, digits, `-`,
/// `_` and `.` becomes `_`, and a leading `.` too (scenario names are the
/// user's).
pub fn file_stem(name: &str) -> String {
    let stem: String =
        name.chars()
            .enumerate()
            .map(|(i, c)| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || (c == '.' && i > 0) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
    if stem.is_empty() {
        "process".into()
    } else {
        stem
    }
}

/// The signal a Linux process would have died of for `fault` (what gdb
/// names when it opens the core).
pub fn signal_of(fault: Option<FaultKind>) -> u32 {
    const SIGILL: u32 = 4;
    const SIGTRAP: u32 = 5;
    const SIGBUS: u32 = 7;
    const SIGFPE: u32 = 8;
    const SIGKILL: u32 = 9;
    const SIGSEGV: u32 = 11;
    match fault {
        Some(
            FaultKind::UnmappedAccess
            | FaultKind::StackGuard
            | FaultKind::WriteToCode
            | FaultKind::WriteToReadOnly
            | FaultKind::ExecuteNonExecutable
            | FaultKind::KernelAccess
            | FaultKind::GeneralProtection
            | FaultKind::UseAfterRevoke
            | FaultKind::SegmentNotPresent
            | FaultKind::StackSegmentFault
            | FaultKind::InvalidTss
            | FaultKind::BoundRangeExceeded
            | FaultKind::ControlProtection,
        ) => SIGSEGV,
        Some(FaultKind::InvalidOpcode | FaultKind::IllegalGateEntry | FaultKind::DeviceNotAvailable) => {
            SIGILL
        }
        Some(
            FaultKind::DivideError
            | FaultKind::X87FloatingPoint
            | FaultKind::SimdFloatingPoint
            | FaultKind::Overflow,
        ) => SIGFPE,
        Some(FaultKind::DebugException) => SIGTRAP,
        Some(FaultKind::AlignmentCheck | FaultKind::MachineCheck) => SIGBUS,
        _ => SIGKILL,
    }
}

/// The user-half pages of the address space at `pml4`, as runs of equal
/// rights in address order. An error if the walk found the tables malformed
/// or had to stop short.
pub fn segments(ram: &GuestRam, pid: u32, pml4: u64) -> Result<Vec<Segment>, String> {
    if pml4 % PAGE != 0 || !ram.contains(pml4, PAGE) {
        return Err(format!("the PML4 {pml4:#x} is not a frame of guest RAM"));
    }
    let walked = walk::walk(ram, None, &[(pid, pml4)]);
    if let Some(issue) = walked.issues.iter().find(|issue| issue.pid == pid) {
        return Err(format!("the page tables at {pml4:#x} are malformed: {}", issue.what));
    }
    if walked.broken.contains(&pid) {
        return Err(format!("the page tables at {pml4:#x} are malformed"));
    }
    if walked.partial.contains(&pid) {
        return Err(format!("the page tables at {pml4:#x} are larger than the walk's budget"));
    }
    let mut pages: Vec<&walk::Mapping> = walked.mappings.iter().filter(|m| m.pid == pid && m.user).collect();
    pages.sort_by_key(|m| m.va);
    let mut segments: Vec<Segment> = Vec::new();
    for page in pages {
        let (writable, executable) = (page.writable, page.executable());
        match segments.last_mut() {
            Some(run)
                if run.writable == writable
                    && run.executable == executable
                    && run.va + run.frames.len() as u64 * PAGE == page.va =>
            {
                run.frames.push(page.frame)
            }
            _ => segments.push(Segment { va: page.va, frames: vec![page.frame], writable, executable }),
        }
    }
    Ok(segments)
}

/// The most core files one run writes: a kernel that kills (or claims to
/// kill) process after process cannot fill the disk through the VMM.
pub const MAX_CORES: usize = 256;

/// The most bytes of core files one run writes, for a guest of `ram_size`
/// bytes: four times guest RAM (a file holds at most as many pages as guest
/// RAM has frames), so that a kernel which kills process after process, each
/// mapping much of memory, cannot fill the disk through the VMM either.
pub fn max_core_bytes(ram_size: u64) -> u64 {
    ram_size.saturating_mul(4)
}

/// The core file of `process`, its memory read from `ram` through the page
/// tables the registers name. A process that maps more pages than guest RAM
/// has frames (only aliases can make it so: a kernel mapping frames many
/// times over) gets no core: the file would be larger than the guest.
pub fn core_file(ram: &GuestRam, process: &CoreProcess<'_>) -> Result<Vec<u8>, String> {
    let segments = segments(ram, process.regs.pid, process.regs.pml4)?;
    let pages: u64 = segments.iter().map(|s| s.frames.len() as u64).sum();
    if pages > ram.size() / PAGE {
        return Err(format!(
            "the process maps {pages} pages, more than the guest's {} frames (aliases)",
            ram.size() / PAGE
        ));
    }
    let mut loads = Vec::with_capacity(segments.len());
    for segment in &segments {
        let mut bytes = vec![0u8; segment.frames.len() * PAGE as usize];
        for (page, &frame) in bytes.chunks_mut(PAGE as usize).zip(&segment.frames) {
            ram.read_bytes(frame, page).map_err(|e| format!("frame {frame:#x}: {e}"))?;
        }
        let (va, writable, executable) = (segment.va, segment.writable, segment.executable);
        loads.push(LoadSegment { va, writable, executable, bytes });
    }
    Ok(assemble(process, &loads))
}

/// The core file of `process` with memory `segments` (in address order,
/// each a whole number of pages).
pub fn assemble(process: &CoreProcess<'_>, segments: &[LoadSegment]) -> Vec<u8> {
    let notes = notes(process);
    let headers = 1 + segments.len();
    let notes_at = EHDR_SIZE + headers * PHDR_SIZE;
    let data_at = (notes_at + notes.len()).next_multiple_of(PAGE as usize);
    let mut file = Vec::with_capacity(data_at + segments.iter().map(|s| s.bytes.len()).sum::<usize>());
    elf_header(&mut file, headers);
    program_header(
        &mut file,
        4, /* PT_NOTE */
        4, /* R */
        notes_at as u64,
        0,
        notes.len() as u64,
        4,
    );
    let mut offset = data_at as u64;
    for segment in segments {
        let flags = 4 | if segment.writable { 2 } else { 0 } | u32::from(segment.executable);
        let size = segment.bytes.len() as u64;
        program_header(&mut file, 1 /* PT_LOAD */, flags, offset, segment.va, size, PAGE);
        offset += size;
    }
    file.extend_from_slice(&notes);
    file.resize(data_at, 0);
    for segment in segments {
        file.extend_from_slice(&segment.bytes);
    }
    file
}

/// Appends the 64-byte ELF header of a core with `program_headers`
/// program headers right after it.
fn elf_header(file: &mut Vec<u8>, program_headers: usize) {
    let start = file.len();
    file.extend_from_slice(b"\x7fELF");
    file.extend_from_slice(&[2, 1, 1]); // ELFCLASS64, ELFDATA2LSB, EV_CURRENT
    file.resize(start + 16, 0);
    file.extend_from_slice(&4u16.to_le_bytes()); // e_type: ET_CORE
    file.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    file.extend_from_slice(&1u32.to_le_bytes()); // e_version
    file.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    file.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    file.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    file.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    file.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    file.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    file.extend_from_slice(&u16::try_from(program_headers).unwrap_or(u16::MAX).to_le_bytes()); // e_phnum
    file.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    debug_assert_eq!(file.len() - start, EHDR_SIZE);
}

/// Appends one 56-byte program header.
fn program_header(file: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, va: u64, size: u64, align: u64) {
    for word in [kind, flags] {
        file.extend_from_slice(&word.to_le_bytes());
    }
    // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
    for word in [offset, va, 0, size, size, align] {
        file.extend_from_slice(&word.to_le_bytes());
    }
}

/// The notes: `NT_PRSTATUS`, `NT_PRPSINFO`, `NT_SIGINFO`, and the
/// `SUPEROS` note.
fn notes(process: &CoreProcess<'_>) -> Vec<u8> {
    let regs = &process.regs;
    let signal = if process.live { 0 } else { signal_of(process.fault) };
    let mut notes = Vec::new();

    let mut prstatus = [0u8; PRSTATUS_SIZE];
    prstatus[..4].copy_from_slice(&signal.to_le_bytes()); // si_signo
    prstatus[12..14].copy_from_slice(&(signal as u16).to_le_bytes()); // pr_cursig
    prstatus[32..36].copy_from_slice(&regs.pid.to_le_bytes()); // pr_pid
                                                               // Linux's user_regs_struct order; orig_rax is -1 (no system call).
    let user_regs: [u64; 27] = [
        regs.r15,
        regs.r14,
        regs.r13,
        regs.r12,
        regs.rbp,
        regs.rbx,
        regs.r11,
        regs.r10,
        regs.r9,
        regs.r8,
        regs.rax,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        u64::MAX,
        regs.rip,
        regs.cs,
        regs.rflags,
        regs.rsp,
        regs.ss,
        0, // fs_base
        0, // gs_base
        0, // ds
        0, // es
        0, // fs
        0, // gs
    ];
    prstatus[PRSTATUS_REGS..PRSTATUS_REGS + 27 * 8].copy_from_slice(user_regs.as_bytes());
    push_note(&mut notes, b"CORE", NT_PRSTATUS, &prstatus);

    let mut prpsinfo = [0u8; PRPSINFO_SIZE];
    prpsinfo[1] = b'Z'; // pr_sname: a zombie, as a dead process is
    prpsinfo[24..28].copy_from_slice(&regs.pid.to_le_bytes()); // pr_pid
    let name = process.name.as_bytes();
    let fname = &name[..name.len().min(15)];
    prpsinfo[40..40 + fname.len()].copy_from_slice(fname); // pr_fname

    // gdb prints pr_psargs when it opens the core ("Core was generated by
    // `...'"): the program's name and what killed it, in the event log's words.
    let psargs = match process.fault {
        _ if process.live => format!("{} (live)", process.name),
        Some(fault) => format!("{} (killed: {} at {:#x})", process.name, fault.name(), regs.addr),
        None => process.name.to_string(),
    };
    let args = &psargs.as_bytes()[..psargs.len().min(79)];
    prpsinfo[56..56 + args.len()].copy_from_slice(args); // pr_psargs
    push_note(&mut notes, b"CORE", NT_PRPSINFO, &prpsinfo);

    let mut siginfo = [0u8; SIGINFO_SIZE];
    siginfo[..4].copy_from_slice(&signal.to_le_bytes()); // si_signo
    siginfo[16..24].copy_from_slice(&regs.addr.to_le_bytes()); // si_addr
    push_note(&mut notes, b"CORE", NT_SIGINFO, &siginfo);

    let text = format!(
        "pid={}\nname={}\nfault={}\naddr={:#x}\nrip={:#x}\nvector={}\nerror_code={:#x}\nevent={}\n",
        regs.pid,
        process.name,
        process.fault.map_or("none", |f| f.name()),
        regs.addr,
        regs.rip,
        regs.vector,
        regs.error_code,
        process.event
    );
    push_note(&mut notes, b"SUPEROS", NT_SUPEROS_FAULT, text.as_bytes());
    notes
}

/// Appends one ELF note (name and description padded to 4 bytes).
fn push_note(notes: &mut Vec<u8>, name: &[u8], kind: u32, desc: &[u8]) {
    let name_size = name.len() + 1;
    notes.extend_from_slice(&(name_size as u32).to_le_bytes());
    notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    notes.extend_from_slice(&kind.to_le_bytes());
    notes.extend_from_slice(name);
    notes.push(0);
    notes.resize(notes.len().next_multiple_of(4), 0);
    notes.extend_from_slice(desc);
    notes.resize(notes.len().next_multiple_of(4), 0);
}

/// Reads the notes of a core file back: `(name, type, description)` each
/// (for tests and `superos-vmm` itself; `None` if the file is not one this
/// module wrote).
pub fn read_notes(file: &[u8]) -> Option<Vec<(String, u32, Vec<u8>)>> {
    let u32_at = |at: usize| Some(u32::from_le_bytes(file.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(file.get(at..at + 8)?.try_into().ok()?));
    if file.get(..4)? != b"\x7fELF" {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    // The first program header is the PT_NOTE.
    if u32_at(phoff)? != 4 {
        return None;
    }
    let offset = usize::try_from(u64_at(phoff + 8)?).ok()?;
    let size = usize::try_from(u64_at(phoff + 32)?).ok()?;
    let mut at = offset;
    let end = offset.checked_add(size)?;
    let mut notes = Vec::new();
    while at + 12 <= end {
        let (name_size, desc_size, kind) = (u32_at(at)? as usize, u32_at(at + 4)? as usize, u32_at(at + 8)?);
        let name_at = at + 12;
        let desc_at = name_at + name_size.next_multiple_of(4);
        let name = file.get(name_at..name_at + name_size.saturating_sub(1))?;
        let desc = file.get(desc_at..desc_at + desc_size)?;
        notes.push((String::from_utf8_lossy(name).into_owned(), kind, desc.to_vec()));
        at = desc_at + desc_size.next_multiple_of(4);
    }
    Some(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::walk::tests::Tables;

    fn regs(pid: u32, pml4: u64) -> FaultRegisters {
        FaultRegisters {
            pid,
            pml4,
            rip: 0x40_1234,
            rsp: 0x7fff_f000,
            rax: 0xaa,
            addr: 0x40_1000,
            ..Default::default()
        }
    }

    #[test]
    fn a_core_holds_each_run_of_pages_and_the_registers() {
        let ram = GuestRam::new(16).unwrap();
        let mut tables = Tables { ram: &ram, next: 0x10_0000 };
        let pml4 = tables.frame();
        let (code, data1, data2) = (tables.frame(), tables.frame(), tables.frame());
        ram.write_bytes(code, b"\x0f\x0b code").unwrap();
        ram.write_bytes(data2, b"second data page").unwrap();
        const USER: u64 = 1 | 1 << 2;
        const WRITE: u64 = 1 << 1;
        const NX: u64 = 1 << 63;
        tables.map(pml4, 0x40_1000, code, USER);
        tables.map(pml4, 0x40_2000, data1, USER | WRITE | NX);
        tables.map(pml4, 0x40_3000, data2, USER | WRITE | NX);
        let found = segments(&ram, 5, pml4).unwrap();
        assert_eq!(
            found,
            [
                Segment { va: 0x40_1000, frames: vec![code], writable: false, executable: true },
                Segment { va: 0x40_2000, frames: vec![data1, data2], writable: true, executable: false },
            ]
        );
        let process = CoreProcess {
            name: "write-code",
            regs: regs(5, pml4),
            fault: Some(FaultKind::WriteToCode),
            event: "process-killed pid=5".into(),
            live: false,
        };
        let file = core_file(&ram, &process).unwrap();
        assert_eq!(&file[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([file[16], file[17]]), 4, "ET_CORE");
        assert_eq!(u16::from_le_bytes([file[56], file[57]]), 3, "a note and two loads");
        // The second page of the data run holds its frame's bytes.
        let second_load = EHDR_SIZE + 2 * PHDR_SIZE;
        let offset = u64::from_le_bytes(file[second_load + 8..second_load + 16].try_into().unwrap()) as usize;
        assert_eq!(&file[offset + 4096..offset + 4096 + 16], b"second data page");
        let notes = read_notes(&file).unwrap();
        let kinds: Vec<(&str, u32)> = notes.iter().map(|(n, k, _)| (n.as_str(), *k)).collect();
        assert_eq!(
            kinds,
            [("CORE", NT_PRSTATUS), ("CORE", NT_PRPSINFO), ("CORE", NT_SIGINFO), ("SUPEROS", 1)]
        );
        let prstatus = &notes[0].2;
        assert_eq!(prstatus.len(), PRSTATUS_SIZE);
        assert_eq!(u32::from_le_bytes(prstatus[..4].try_into().unwrap()), 11, "SIGSEGV");
        let reg = |index: usize| {
            u64::from_le_bytes(
                prstatus[PRSTATUS_REGS + index * 8..PRSTATUS_REGS + index * 8 + 8].try_into().unwrap(),
            )
        };
        assert_eq!((reg(10), reg(16), reg(19)), (0xaa, 0x40_1234, 0x7fff_f000), "rax, rip, rsp");
        let text = String::from_utf8(notes[3].2.clone()).unwrap();
        assert!(text.contains("fault=write-to-code\n") && text.contains("addr=0x401000\n"), "{text}");
    }

    #[test]
    fn malformed_tables_are_an_error_not_a_core() {
        let ram = GuestRam::new(16).unwrap();
        // A PML4 beyond guest RAM, or not a frame.
        for pml4 in [1 << 40, 0x10_0008, !0xfff] {
            let process = CoreProcess {
                name: "x",
                regs: regs(3, pml4),
                fault: None,
                event: String::new(),
                live: false,
            };
            assert!(core_file(&ram, &process).is_err(), "{pml4:#x}");
        }
        // A table entry pointing beyond guest RAM: the walk finds the
        // tables malformed.
        let pml4 = 0x20_0000;
        ram.write(pml4, &((1u64 << 40) | 0x7)).unwrap();
        let process =
            CoreProcess { name: "x", regs: regs(3, pml4), fault: None, event: String::new(), live: false };
        assert!(core_file(&ram, &process).is_err());
    }

    #[test]
    fn a_process_mapping_more_pages_than_the_guest_has_gets_no_core() {
        let ram = GuestRam::new(16).unwrap();
        let mut tables = Tables { ram: &ram, next: 0x10_0000 };
        let pml4 = tables.frame();
        let frame = tables.frame();
        // One frame aliased at one page more than guest RAM has frames.
        for page in 0..=ram.size() / PAGE {
            tables.map(pml4, 0x40_0000 + page * PAGE, frame, 1 | 1 << 2);
        }
        let process =
            CoreProcess { name: "x", regs: regs(3, pml4), fault: None, event: String::new(), live: false };
        let error = core_file(&ram, &process).unwrap_err();
        assert!(error.contains("more than the guest's 4096 frames"), "{error}");
    }

    #[test]
    fn file_names_keep_to_a_safe_alphabet() {
        assert_eq!(file_stem("write-code"), "write-code");
        assert_eq!(file_stem("../../etc/passwd"), "_._.._etc_passwd");
        assert_eq!(file_stem(".hidden"), "_hidden");
        assert_eq!(file_stem(""), "process");
    }

    #[test]
    fn faults_map_to_the_signals_linux_would_send() {
        assert_eq!(signal_of(Some(FaultKind::WriteToCode)), 11);
        assert_eq!(signal_of(Some(FaultKind::InvalidOpcode)), 4);
        assert_eq!(signal_of(Some(FaultKind::DivideError)), 8);
        assert_eq!(signal_of(Some(FaultKind::Deadlock)), 9);
        assert_eq!(signal_of(None), 9);
    }
}
