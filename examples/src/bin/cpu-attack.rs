//! `cpu-attack`: attacks the CPU state ring 3 can reach, one per run, chosen
//! with `mode=<name>`, so the tests can check that the kernel terminates the
//! offender with a named fault (and nothing else), or that the state it
//! tampers with is private. It says what it is about to do first; if an
//! attack that must fault returns, it prints `SURVIVED` and exits 1.
//!
//! Ways into ring 0 (each must fault): `far-jump-compat`, `far-call-compat`,
//! `far-ret-compat`, `iret-compat` (a far jump/call/return/`iretq` to selector
//! 0x23, the slot `STAR` names for 32-bit code: general-protection; from
//! compatibility mode a `syscall` would enter ring 0 at `CSTAR` on the user's
//! stack), `far-jump-kernel`, `iret-kernel` (to the kernel code selector:
//! general-protection), `sysenter` (invalid-opcode on AMD, general-protection
//! on Intel), `syscall-raw` (a `syscall` outside the gate, with RSP aimed at
//! the kernel's direct map, or `stack=non-canonical` or `stack=zero`:
//! illegal-gate-entry where the kernel uses the `syscall` gate; on the PVM
//! host `syscall` jumps to LSTAR still in ring 3: kernel-access),
//! `syscall-single-step` (a `syscall` outside the gate with the trap flag
//! set: illegal-gate-entry, the kernel unharmed; on the PVM host
//! debug-exception or kernel-access at LSTAR), `int` (`int vector=<n>`,
//! default 0x80: general-protection; 3 is illegal-gate-entry), `int1` and
//! `single-step` (debug-exception), `load-kernel-ds`, `load-null-slot`,
//! `load-kernel-ss` (general-protection).
//!
//! Descriptor-table registers: `sgdt`, `sidt`, `sldt`, `str`, `smsw`
//! (general-protection where the CPU has UMIP; otherwise the value is printed
//! and the program exits 1). Privileged instructions: `rdmsr`, `wrmsr`,
//! `mov-cr3`, `lgdt`, `lidt`, `ltr`, `clts`, `hlt`, `invlpg`, `swapgs`,
//! `sysret`, `wbinvd`, `in`, `out`, `iopl-out` (popf raising IOPL is ignored
//! in ring 3, so the `out` still faults), `cli`, `xsetbv`, `rdpmc`
//! (general-protection), `wrfsbase` (invalid-opcode: FSGSBASE is off).
//!
//! FPU/SIMD and segment state: `fpu-witness seed=<n> turns=<n>` loads a
//! seed-derived x87/MMX/SSE state (x87 control word, MXCSR, mm0-7, xmm0-15)
//! and checks after every yield and every timer preemption that it is
//! exactly what it left (exit 0), or says which part changed (exit 2);
//! `fpu-observer turns=<n>` never writes that state and checks that it
//! always sees the state a process starts with (exit 0, or 2 with what it
//! saw); `segment-witness seed=<n> turns=<n>` does the same for DS, ES, FS and
//! GS; `x87-pending turns=<n>` leaves an unmasked x87 divide-by-zero pending,
//! yields, then executes `fwait` (x87-floating-point at the `fdivp`);
//! `simd-exception` (simd-floating-point), `avx` and `avx512` (invalid-opcode:
//! XCR0 enables x87 and SSE only), `xcr0` (prints XCR0, exit 0 if it is
//! x87|SSE), `alignment-check` (RFLAGS.AC and a misaligned load:
//! alignment-check), `fxrstor-bad` (restores an image with a reserved MXCSR
//! bit: general-protection).
//!
//! The user-state save page and the switch stubs: `corrupt-user-state`
//! (writes reserved bits into its own save page and yields: the kernel's
//! restore of it faults, general-protection, and kills it alone),
//! `call-switch-stub` (calls the gate page's restore stub itself:
//! illegal-gate-entry).
//!
//! Measurements: `switch-cost turns=<n>` (two instances yield to each other
//! and print the time per process switch), `cpuid` (prints what CPUID and
//! XCR0 tell ring 3), `xcr0`.
//!
//! Odd contexts the timer must preempt and resume exactly: `rsp-non-canonical`,
//! `rsp-kernel`, `rsp-misaligned` (`ms=<n>`, default 50: spin that long with
//! RSP non-canonical, aimed at the kernel's direct map, or misaligned, with no
//! stack access, then restore it and exit 0).
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

use core::arch::asm;
use superos_protocol::layout::{GATE_RESTORE_STUB_OFFSET, GATE_VA, USER_STATE_VA};
use superos_rt::{arg, gate_info, getpid, parse_i64, println, rdtsc, spin_ms, yield_now};

/// A selector `STAR` names for 32-bit `sysret` code (slot 0x20, RPL 3).
const COMPAT_CS: u64 = 0x23;
/// The kernel's code and data selectors.
const KERNEL_CS: u64 = 0x10;
const KERNEL_DS: u64 = 0x18;
/// The user data selector (also SS) and the user 64-bit code selector.
const USER_DS: u16 = 0x2b;
const USER_CS: u16 = 0x33;
/// An address in the kernel's direct map of guest RAM (guest-physical 16 MiB).
const DIRECT_MAP: u64 = 0xffff_8000_0100_0000;
/// A non-canonical address.
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;

// 32-bit code for the compatibility-mode attacks, and the 64-bit way in and
// back. `compat_enter(operand, count, rsp)` saves RSP, loads `count` into
// ECX and `rsp` into RSP, and far-jumps through the m16:32 `operand`; only
// `compat_spin` comes back (to `compat_return64`, with a far jump to the
// user code selector), the others must be killed. In compatibility mode
// the stack is ESP, so none of the 32-bit code touches it.
#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .text
    .code64
    .global compat_enter
compat_enter:
    mov %rsp, compat_saved_rsp(%rip)
    mov %rsi, %rcx
    mov %rdx, %rsp
    ljmpl *(%rdi)
compat_return64:
    mov compat_saved_rsp(%rip), %rsp
    ret
    .code32
    .global compat_syscall, compat_sysenter, compat_int80, compat_spin
compat_syscall:
    syscall
    ud2
compat_sysenter:
    sysenter
    ud2
compat_int80:
    int $0x80
    ud2
compat_spin:
    dec %ecx
    jnz compat_spin
    ljmp $0x33, $compat_return64
    .code64
    .data
    .balign 8
compat_saved_rsp:
    .quad 0
    .text
"#,
    options(att_syntax)
);

#[cfg(target_os = "none")]
extern "C" {
    fn compat_enter(operand: *const [u32; 2], count: u64, rsp: u64);
    static compat_syscall: u8;
    static compat_sysenter: u8;
    static compat_int80: u8;
    static compat_spin: u8;
}

/// Far-jumps to 32-bit code at `target` through selector `COMPAT_CS`
/// (slot 0x20, a null descriptor in the kernel's GDT; on the PVM host ring 3
/// runs with the host's GDT, where 0x23 is a 32-bit user code segment). RSP
/// is `rsp` on the way (the exploit aimed it at the kernel's direct map, for
/// a `syscall` that entered ring 0 at CSTAR on the user's stack).
#[cfg(target_os = "none")]
fn enter_compat(target: *const u8, count: u64, rsp: u64) {
    let operand = [target as u64 as u32, COMPAT_CS as u32];
    // SAFETY: `compat_enter` restores RSP before it returns (only
    // `compat_spin` returns); the other targets must be killed.
    unsafe { compat_enter(&operand, count, rsp) };
}

/// An `xsave64` image of x87, SSE and AVX state (standard layout), or an
/// `fxsave64` image where AVX is not usable.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Image([u8; 1024]);

/// Bytes of the legacy (`fxsave`) region that hold architectural state.
const LEGACY_STATE: usize = 416;

/// Where the upper halves of YMM0-15 are in a standard `xsave` image
/// (CPUID leaf 0xd, sub-leaf 2), if AVX is usable in ring 3 (the CPU has it
/// and XCR0 enables it).
fn avx_offset() -> Option<usize> {
    let leaf1 = core::arch::x86_64::__cpuid(1);
    if leaf1.ecx & (1 << 28) == 0 || leaf1.ecx & (1 << 27) == 0 {
        return None;
    }
    (xcr0() & 6 == 6).then(|| core::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize)
}

fn xcr0() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: xgetbv(0) reads XCR0 (CR4.OSXSAVE is set wherever the CPU has XSAVE).
    unsafe { asm!("xgetbv", in("ecx") 0u32, out("eax") low, out("edx") high, options(nomem, nostack)) };
    (u64::from(high) << 32) | u64::from(low)
}

/// The live x87/SSE(/AVX) state.
fn save_state(avx: Option<usize>) -> Image {
    let mut image = Image([0; 1024]);
    let p = image.0.as_mut_ptr();
    if avx.is_some() {
        // SAFETY: a 64-byte aligned 1 KiB buffer, larger than the x87, SSE
        // and AVX components requested (eax = 7); xsave64 only writes it.
        unsafe {
            asm!("xsave64 [{}]", in(reg) p, in("eax") 7u32, in("edx") 0u32, options(nostack, preserves_flags))
        };
    } else {
        // SAFETY: a 16-byte aligned buffer of more than 512 bytes.
        unsafe { asm!("fxsave64 [{}]", in(reg) p, options(nostack, preserves_flags)) };
    }
    image
}

/// The parts of an image, for saying what changed.
fn part(offset: usize) -> &'static str {
    match offset {
        0..=1 => "the x87 control word",
        2..=3 => "the x87 status word",
        4 => "the x87 tag word",
        6..=23 => "the x87 instruction/data pointers",
        24..=27 => "MXCSR",
        28..=31 => "MXCSR_MASK",
        32..=159 => "an x87/MMX register",
        160..=415 => "an XMM register",
        _ => "the upper half of a YMM register",
    }
}

/// First byte where two images differ in architectural state.
fn difference(seen: &Image, expected: &Image, avx: Option<usize>) -> Option<usize> {
    let legacy = (0..LEGACY_STATE).find(|&i| seen.0[i] != expected.0[i]);
    legacy.or_else(|| avx.and_then(|at| (at..at + 256).find(|&i| seen.0[i] != expected.0[i])))
}

/// A pattern byte for register byte `index` of seed `seed`.
fn pattern(seed: u64, index: usize) -> u8 {
    let x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(index as u64 * 0x1000_0000_01b3);
    (x >> 56) as u8 | 1
}

/// Loads a seed-derived state with ordinary instructions: x87 control word,
/// MXCSR, mm0-7 (`movq`), xmm0-15 (`movdqu`), and where AVX is usable all
/// 256 bits of ymm0-15 (`vmovdqu`).
fn load_pattern(seed: u64, avx: bool) {
    let mut bytes = [0u8; 32 * 16 + 8 * 8];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = pattern(seed, i);
    }
    // Precision control and rounding differ per seed; exceptions stay masked.
    let fcw: u16 = 0x003f | (((seed & 3) as u16) << 8) | ((((seed >> 2) & 3) as u16) << 10);
    // Rounding and flush-to-zero differ per seed; exceptions stay masked.
    let mxcsr: u32 = 0x1f80 | (((seed & 3) as u32) << 13) | (((seed >> 2) & 1) as u32) << 15;
    let p = bytes.as_ptr();
    // SAFETY: reads 576 bytes of `bytes` and two locals; writes only FPU/SIMD
    // registers, which this program does not otherwise use.
    unsafe {
        asm!(
            "fninit",
            "fldcw [{fcw}]",
            "ldmxcsr [{mxcsr}]",
            "movdqu xmm0, [{p}]", "movdqu xmm1, [{p} + 32]", "movdqu xmm2, [{p} + 64]", "movdqu xmm3, [{p} + 96]",
            "movdqu xmm4, [{p} + 128]", "movdqu xmm5, [{p} + 160]", "movdqu xmm6, [{p} + 192]", "movdqu xmm7, [{p} + 224]",
            "movdqu xmm8, [{p} + 256]", "movdqu xmm9, [{p} + 288]", "movdqu xmm10, [{p} + 320]", "movdqu xmm11, [{p} + 352]",
            "movdqu xmm12, [{p} + 384]", "movdqu xmm13, [{p} + 416]", "movdqu xmm14, [{p} + 448]", "movdqu xmm15, [{p} + 480]",
            "movq mm0, [{p} + 512]", "movq mm1, [{p} + 520]", "movq mm2, [{p} + 528]", "movq mm3, [{p} + 536]",
            "movq mm4, [{p} + 544]", "movq mm5, [{p} + 552]", "movq mm6, [{p} + 560]", "movq mm7, [{p} + 568]",
            p = in(reg) p,
            fcw = in(reg) &fcw,
            mxcsr = in(reg) &mxcsr,
            options(nostack, readonly),
        )
    };
    if avx {
        // SAFETY: as above (VEX loads, only where XCR0 enables AVX).
        unsafe {
            asm!(
                "vmovdqu ymm0, [{p}]", "vmovdqu ymm1, [{p} + 32]", "vmovdqu ymm2, [{p} + 64]", "vmovdqu ymm3, [{p} + 96]",
                "vmovdqu ymm4, [{p} + 128]", "vmovdqu ymm5, [{p} + 160]", "vmovdqu ymm6, [{p} + 192]", "vmovdqu ymm7, [{p} + 224]",
                "vmovdqu ymm8, [{p} + 256]", "vmovdqu ymm9, [{p} + 288]", "vmovdqu ymm10, [{p} + 320]", "vmovdqu ymm11, [{p} + 352]",
                "vmovdqu ymm12, [{p} + 384]", "vmovdqu ymm13, [{p} + 416]", "vmovdqu ymm14, [{p} + 448]", "vmovdqu ymm15, [{p} + 480]",
                p = in(reg) p,
                options(nostack, readonly),
            )
        };
    }
}

/// Lets the others run: alternately a yield and a spin longer than a time
/// slice (so the timer preempts it mid-computation too). Then `fwait`: an
/// x87 exception another process left pending would be raised here.
fn let_others_run(turn: u64) {
    if turn % 2 == 0 {
        yield_now();
    } else {
        spin_ms(15);
    }
    // SAFETY: waits for pending x87 exceptions; this process leaves none.
    unsafe { asm!("fwait", options(nomem, nostack)) };
}

fn fpu_witness(seed: u64, turns: u64) -> i32 {
    let pid = getpid();
    let avx = avx_offset();
    load_pattern(seed, avx.is_some());
    let expected = save_state(avx);
    let what = if avx.is_some() { "x87/MMX/SSE/AVX" } else { "x87/MMX/SSE" };
    println!("cpu-attack: pid {pid} loaded {what} pattern {seed}; checking it across {turns} switches");
    for turn in 0..turns {
        let_others_run(turn);
        let seen = save_state(avx);
        if let Some(at) = difference(&seen, &expected, avx) {
            println!(
                "cpu-attack: pid {pid} LEAK: {} changed at byte {at} after turn {turn}: {:#04x}, expected {:#04x}",
                part(at),
                seen.0[at],
                expected.0[at]
            );
            return 2;
        }
    }
    println!("cpu-attack: pid {pid} {what} state intact after {turns} switches");
    0
}

fn fpu_observer(turns: u64) -> i32 {
    let pid = getpid();
    let avx = avx_offset();
    let initial = save_state(avx);
    let fcw = u16::from_le_bytes([initial.0[0], initial.0[1]]);
    let mxcsr = u32::from_le_bytes([initial.0[24], initial.0[25], initial.0[26], initial.0[27]]);
    let registers_zero = initial.0[32..LEGACY_STATE].iter().all(|&b| b == 0)
        && avx.is_none_or(|at| initial.0[at..at + 256].iter().all(|&b| b == 0));
    println!(
        "cpu-attack: pid {pid} starts with x87 control {fcw:#06x}, MXCSR {mxcsr:#x}, registers zero: {registers_zero}, AVX: {}",
        avx.is_some()
    );
    if fcw != 0x037f || mxcsr != 0x1f80 || !registers_zero || initial.0[2..24].iter().any(|&b| b != 0) {
        println!("cpu-attack: pid {pid} LEAK: did not start with the initial FPU/SIMD state");
        return 2;
    }
    for turn in 0..turns {
        let_others_run(turn);
        let seen = save_state(avx);
        if let Some(at) = difference(&seen, &initial, avx) {
            println!(
                "cpu-attack: pid {pid} LEAK: {} is {:#04x} at byte {at} after turn {turn} (it never wrote it)",
                part(at),
                seen.0[at]
            );
            return 2;
        }
    }
    println!("cpu-attack: pid {pid} saw only its own initial FPU/SIMD state in {turns} switches");
    0
}

/// True if the CPU reports FSGSBASE (ring 3 may then read and write the FS
/// and GS bases: the kernel enables it wherever the CPU has it).
fn has_fsgsbase() -> bool {
    core::arch::x86_64::__cpuid_count(7, 0).ebx & 1 != 0
}

fn read_bases() -> [u64; 2] {
    let (fs, gs): (u64, u64);
    // SAFETY: FSGSBASE is enabled (checked by the caller); reads only.
    unsafe {
        asm!("rdfsbase {}", "rdgsbase {}", out(reg) fs, out(reg) gs, options(nomem, nostack, preserves_flags))
    };
    [fs, gs]
}

fn read_segments() -> [u16; 4] {
    let (ds, es, fs, gs): (u16, u16, u16, u16);
    // SAFETY: reading segment registers has no side effects.
    unsafe {
        asm!(
            "mov {0:x}, ds", "mov {1:x}, es", "mov {2:x}, fs", "mov {3:x}, gs",
            out(reg) ds, out(reg) es, out(reg) fs, out(reg) gs,
            options(nomem, nostack, preserves_flags)
        )
    };
    [ds, es, fs, gs]
}

fn segment_witness(seed: u64, turns: u64) -> i32 {
    let pid = getpid();
    // The selectors ring 3 can load (null, user data, readable user code),
    // in a seed-dependent arrangement. (A null selector with RPL 1-3 is
    // left out: `iretq` to ring 3 may turn it into 0, as it does on Linux.)
    let choices = [0u16, USER_DS, USER_CS, USER_DS, 0];
    let pick = |i: u64| choices[((seed + i * 3) % choices.len() as u64) as usize];
    let wanted = [pick(0), pick(1), pick(2), pick(3)];
    // SAFETY: loads DS, ES, FS, GS with selectors ring 3 may hold; in 64-bit
    // mode their bases stay zero and the runtime does not use them.
    unsafe {
        asm!(
            "mov ds, {0:x}", "mov es, {1:x}", "mov fs, {2:x}", "mov gs, {3:x}",
            in(reg) wanted[0], in(reg) wanted[1], in(reg) wanted[2], in(reg) wanted[3],
            options(nostack, preserves_flags)
        )
    };
    let loaded = read_segments();
    let bases = has_fsgsbase().then(|| {
        let wanted = [0x1000_0000 * (seed + 1), 0x2000_0000 * (seed + 1) + 0x123];
        // SAFETY: FSGSBASE is enabled; canonical values; this program does
        // not use FS or GS.
        unsafe { asm!("wrfsbase {}", "wrgsbase {}", in(reg) wanted[0], in(reg) wanted[1], options(nostack)) };
        read_bases()
    });
    println!(
        "cpu-attack: pid {pid} loaded ds/es/fs/gs {:x?} and fs/gs bases {bases:x?}; checking them across {turns} switches",
        loaded
    );
    for turn in 0..turns {
        let_others_run(turn);
        let seen = read_segments();
        if seen != loaded {
            println!("cpu-attack: pid {pid} LEAK: ds/es/fs/gs are {seen:x?} after turn {turn}, expected {loaded:x?}");
            return 2;
        }
        if let Some(bases) = bases {
            let seen = read_bases();
            if seen != bases {
                println!("cpu-attack: pid {pid} LEAK: fs/gs bases are {seen:x?} after turn {turn}, expected {bases:x?}");
                return 2;
            }
        }
    }
    println!("cpu-attack: pid {pid} segment selectors and bases intact after {turns} switches");
    0
}

fn x87_pending(turns: u64) -> i32 {
    let pid = getpid();
    let fcw: u16 = 0x037b; // zero-divide unmasked
    let at: u64;
    // SAFETY: only x87 state changes; the division by zero leaves an
    // exception pending, which no instruction here waits for.
    unsafe {
        asm!(
            "fninit",
            "fldcw [{fcw}]",
            "fld1",
            "fldz",
            "lea {at}, [rip + 2f]",
            "2:",
            "fdivp st(1), st",
            fcw = in(reg) &fcw,
            at = out(reg) at,
            options(nostack),
        )
    };
    println!("cpu-attack: pid {pid} left an x87 divide-by-zero pending at {at:#x}; yielding {turns} times");
    for turn in 0..turns {
        let_others_run(turn);
    }
    println!("cpu-attack: pid {pid} executes fwait: the pending exception must be delivered to it now");
    // SAFETY: deliberately not: the fwait must raise #MF.
    unsafe { asm!("fwait", options(nostack)) };
    1
}

/// Spins for `ms` milliseconds with RSP set to `rsp`, touching no stack.
fn spin_with_rsp(rsp: u64, ms: u64) {
    let deadline = rdtsc() + ms * gate_info().tsc_khz.max(1);
    // SAFETY: RSP is saved in r8 and restored before anything can use the
    // stack; the loop only reads the TSC.
    unsafe {
        asm!(
            "mov r8, rsp",
            "mov rsp, {rsp}",
            "2:",
            "rdtsc",
            "shl rdx, 32",
            "or rax, rdx",
            "cmp rax, {deadline}",
            "jb 2b",
            "mov rsp, r8",
            rsp = in(reg) rsp,
            deadline = in(reg) deadline,
            out("rax") _, out("rdx") _, out("r8") _,
        )
    };
}

/// Far transfers to `selector`: AT&T `ljmpl`/`lcalll` with an m16:32 operand
/// (the form both AMD and Intel accept in 64-bit mode).
fn far_transfer(kind: &str, selector: u64) {
    let target: u64;
    // SAFETY: only computes an address.
    unsafe { asm!("lea {}, [rip + 2f]", "2:", out(reg) target, options(nomem, nostack)) };
    let operand: [u32; 2] = [target as u32, selector as u32];
    let p = operand.as_ptr();
    match kind {
        // SAFETY: deliberately unsound: the far jump must fault (the kernel
        // kills this process); `p` points at a live far pointer.
        "jump" => unsafe { asm!("ljmpl *({0})", in(reg) p, options(att_syntax, nostack)) },
        // SAFETY: as for the jump: the far call must fault.
        "call" => unsafe { asm!("lcalll *({0})", in(reg) p, options(att_syntax)) },
        // SAFETY: as for the jump: the far return must fault.
        "ret" => unsafe {
            asm!("push {sel}", "push {target}", "lretq", sel = in(reg) selector, target = in(reg) target, options(att_syntax))
        },
        // SAFETY: as for the jump: the iretq to the old 32-bit selector
        // must fault.
        "iret" => unsafe {
            asm!(
                "mov %ss, %eax",
                "mov %rsp, %rdx",
                "push %rax",
                "push %rdx",
                "pushfq",
                "push {sel}",
                "push {target}",
                "iretq",
                sel = in(reg) selector, target = in(reg) target,
                out("rax") _, out("rdx") _,
                options(att_syntax)
            )
        },
        _ => unreachable!(),
    }
}

fn commit(mode: &str, args: &[u8]) -> i32 {
    let number =
        |key: &str, default: u64| arg(args, key).and_then(parse_i64).map_or(default, |n| n.max(0) as u64);
    let turns = number("turns", 20);
    match mode {
        "fpu-witness" => return fpu_witness(number("seed", 1), turns),
        "fpu-observer" => return fpu_observer(turns),
        "segment-witness" => return segment_witness(number("seed", 1), turns),
        "x87-pending" => return x87_pending(turns),
        "xcr0" => {
            let xcr0 = xcr0();
            println!("cpu-attack: XCR0 = {xcr0:#x}");
            return if xcr0 & 3 == 3 { 0 } else { 1 };
        }
        "switch-cost" => {
            // Two instances yield to each other: each turn is two process
            // switches (and two yields). Not an attack: a measurement.
            let start = rdtsc();
            for _ in 0..turns {
                yield_now();
            }
            let ns = superos_rt::cycles_to_ns(rdtsc() - start);
            println!(
                "cpu-attack: pid {} switch-cost: {} ns per switch (yield included) over {turns} turns",
                getpid(),
                ns / turns.max(1) / 2
            );
            return 0;
        }
        "cpuid" => {
            // What the CPU tells ring 3 about the state it may use.
            for (leaf, sub) in [(1, 0), (7, 0), (0xd, 0), (0xd, 1), (0xd, 2)] {
                let r = core::arch::x86_64::__cpuid_count(leaf, sub);
                println!(
                    "cpu-attack: cpuid({leaf:#x}, {sub}) = eax {:#x} ebx {:#x} ecx {:#x} edx {:#x}",
                    r.eax, r.ebx, r.ecx, r.edx
                );
            }
            println!("cpu-attack: XCR0 = {:#x}", xcr0());
            return 0;
        }
        "corrupt-user-state" => {
            // Reserved bits of the XSAVE header of its own save page
            // (XCOMP_BV and the bytes after it, which the save stub's `xsave`
            // does not rewrite): the kernel's next restore of this process
            // faults in its restore stub (`xrstor`), which kills this process
            // alone. It must be switched out and back in for that, so it keeps
            // yielding while another process runs.
            println!(
                "cpu-attack: corrupting my own user-state save page at {USER_STATE_VA:#x}, then yielding"
            );
            // SAFETY: the save page is this process's own private memory.
            unsafe { superos_rt::write_u64(USER_STATE_VA + 520, u64::MAX) };
            // SAFETY: as above.
            unsafe { superos_rt::write_u64(USER_STATE_VA + 528, u64::MAX) };
            for turn in 0..turns {
                let_others_run(turn);
            }
            println!("cpu-attack: SURVIVED {mode}");
            return 1;
        }
        "call-switch-stub" => {
            // The restore stub, called directly with the caller's own state
            // page: the stub runs (it is ring-3 code), but its trap back into
            // the kernel is not one the kernel expects.
            println!(
                "cpu-attack: calling the gate page's restore stub at {:#x}",
                GATE_VA + GATE_RESTORE_STUB_OFFSET
            );
            // SAFETY: deliberately not: the kernel must reject the entry.
            unsafe {
                asm!(
                    "call {stub}",
                    stub = in(reg) GATE_VA + GATE_RESTORE_STUB_OFFSET,
                    in("rdi") USER_STATE_VA, in("eax") 7u32, in("edx") 0u32,
                    out("rcx") _, out("r11") _,
                )
            };
            println!("cpu-attack: SURVIVED {mode}");
            return 1;
        }
        "compat-spin" => {
            let count = number("count", 200_000_000);
            println!("cpu-attack: spinning {count} times in 32-bit code, then back to 64-bit code");
            let rsp: u64;
            // SAFETY: reads RSP.
            unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
            enter_compat(&raw const compat_spin, count, rsp);
            println!("cpu-attack: back in 64-bit code: compatibility mode was resumed exactly");
            return 0;
        }
        "rsp-non-canonical" | "rsp-kernel" | "rsp-misaligned" => {
            let ms = number("ms", 50);
            let rsp = match mode {
                "rsp-non-canonical" => NON_CANONICAL,
                "rsp-kernel" => DIRECT_MAP,
                _ => {
                    let here: u64;
                    // SAFETY: reads RSP.
                    unsafe { asm!("mov {}, rsp", out(reg) here, options(nomem, nostack)) };
                    (here - 4096) | 7
                }
            };
            println!("cpu-attack: spinning {ms} ms with rsp = {rsp:#x} (no stack use); the timer must resume me exactly");
            spin_with_rsp(rsp, ms);
            println!("cpu-attack: resumed with my own stack after {ms} ms");
            return 0;
        }
        _ => {}
    }
    println!("cpu-attack: {mode}");
    let vector = number("vector", 0x80);
    let stack = arg(args, "stack").and_then(|s| core::str::from_utf8(s).ok()).unwrap_or("kernel");
    // SAFETY: deliberately not: `violate` executes what ring 3 may not.
    if !unsafe { violate(mode, vector, stack) } {
        println!("cpu-attack: unknown mode `{mode}` (or int vector {vector:#x}: use 2, 3, 8, 13, 14, 0x20, 0x80 or 0xff)");
        return 64;
    }
    println!("cpu-attack: SURVIVED {mode}");
    1
}

/// Executes the attack `mode` names; false if there is no such mode.
///
/// # Safety
/// None: every mode executes an instruction ring 3 may not, or makes a
/// transfer it may not make, and must be killed for it; the register
/// constraints only keep the compiler's view right should one return.
#[allow(clippy::missing_safety_doc)]
unsafe fn violate(mode: &str, vector: u64, stack: &str) -> bool {
    match mode {
        "far-jump-compat" => far_transfer("jump", COMPAT_CS),
        "compat-syscall" => enter_compat(&raw const compat_syscall, 0, DIRECT_MAP + 0x1000),
        "compat-sysenter" => enter_compat(&raw const compat_sysenter, 0, DIRECT_MAP + 0x1000),
        "compat-int80" => enter_compat(&raw const compat_int80, 0, DIRECT_MAP + 0x1000),
        "far-call-compat" => far_transfer("call", COMPAT_CS),
        "far-ret-compat" => far_transfer("ret", COMPAT_CS),
        "iret-compat" => far_transfer("iret", COMPAT_CS),
        "far-jump-kernel" => far_transfer("jump", KERNEL_CS),
        "iret-kernel" => far_transfer("iret", KERNEL_CS),
        "sysenter" => {
            asm!("sysenter", options(nostack))
        }
        "syscall-single-step" => {
            // The trap flag set across a `syscall`: were the single-step trap
            // taken at the kernel's entry (in ring 0, the user stack still
            // loaded, as SYSENTER's is on Intel), the kernel would meet a
            // debug exception of its own. SFMASK clears the flag; on the PVM
            // host `syscall` jumps to LSTAR in ring 3. The kernel must
            // survive either way.
            asm!("pushfq", "or qword ptr [rsp], 0x100", "popfq", "syscall", out("rcx") _, out("r11") _)
        }
        "syscall-raw" => {
            // RSP aimed at the kernel's direct map (were the entry to run on
            // it, it would write kernel memory), or non-canonical, or zero.
            let stack = match stack {
                "non-canonical" => NON_CANONICAL,
                "zero" => 0,
                _ => DIRECT_MAP + 0x1000,
            };
            asm!(
                "mov r8, rsp",
                "mov rsp, {stack}",
                "syscall",
                "mov rsp, r8",
                stack = in(reg) stack,
                out("rcx") _, out("r11") _, out("r8") _,
            )
        }
        "int" => match vector {
            0x80 => {
                asm!("int 0x80", options(nostack))
            }
            3 => {
                asm!("int3", options(nostack))
            }
            2 => {
                asm!("int 2", options(nostack))
            }
            8 => {
                asm!("int 8", options(nostack))
            }
            13 => {
                asm!("int 13", options(nostack))
            }
            14 => {
                asm!("int 14", options(nostack))
            }
            0x20 => {
                asm!("int 0x20", options(nostack))
            }
            0xff => {
                asm!("int 0xff", options(nostack))
            }
            _ => return false,
        },
        "int1" => {
            asm!(".byte 0xf1", options(nostack))
        }
        "single-step" => {
            asm!("pushfq", "or qword ptr [rsp], 0x100", "popfq", "nop", "nop")
        }
        "load-kernel-ds" => {
            asm!("mov ds, {0:x}", in(reg) KERNEL_DS as u16, options(nostack))
        }
        "load-null-slot" => {
            asm!("mov ds, {0:x}", in(reg) COMPAT_CS as u16, options(nostack))
        }
        "load-kernel-ss" => {
            asm!("mov ss, {0:x}", in(reg) KERNEL_DS as u16, options(nostack))
        }
        "sgdt" | "sidt" => {
            let mut table = [0u8; 10];
            let p = table.as_mut_ptr();
            if mode == "sgdt" {
                asm!("sgdt [{}]", in(reg) p, options(nostack));
            } else {
                asm!("sidt [{}]", in(reg) p, options(nostack));
            }
            let base = u64::from_le_bytes(table[2..10].try_into().unwrap_or([0; 8]));
            println!("cpu-attack: {mode} revealed base {base:#x}");
        }
        "sldt" | "str" | "smsw" => {
            let value: u64;
            match mode {
                "sldt" => {
                    asm!("sldt {0:x}", out(reg) value, options(nomem, nostack))
                }
                "str" => {
                    asm!("str {0:x}", out(reg) value, options(nomem, nostack))
                }
                _ => {
                    asm!("smsw {}", out(reg) value, options(nomem, nostack))
                }
            }
            println!("cpu-attack: {mode} revealed {value:#x}");
        }
        "rdmsr" => {
            asm!("rdmsr", in("ecx") 0xc000_0082u32, out("eax") _, out("edx") _, options(nostack))
        }
        "wrmsr" => {
            asm!("wrmsr", in("ecx") 0xc000_0083u32, in("eax") 0u32, in("edx") 0u32, options(nostack))
        }
        "mov-cr3" => {
            asm!("mov rax, cr3", "mov cr3, rax", out("rax") _, options(nostack))
        }
        "lgdt" | "lidt" => {
            let table = [0u8; 10];
            let p = table.as_ptr();
            if mode == "lgdt" {
                asm!("lgdt [{}]", in(reg) p, options(nostack));
            } else {
                asm!("lidt [{}]", in(reg) p, options(nostack));
            }
        }
        "ltr" => {
            asm!("ltr {0:x}", in(reg) 0x40u16, options(nostack))
        }
        "clts" => {
            asm!("clts", options(nostack))
        }
        "hlt" => {
            asm!("hlt", options(nostack))
        }
        "invlpg" => {
            asm!("invlpg [{}]", in(reg) 0x40_0000u64, options(nostack))
        }
        "swapgs" => {
            asm!("swapgs", options(nostack))
        }
        "sysret" => {
            asm!("sysretq", options(nostack))
        }
        "wbinvd" => {
            asm!("wbinvd", options(nostack))
        }
        "in" => {
            asm!("in al, dx", in("dx") 0x500u16, out("al") _, options(nostack))
        }
        "out" => {
            asm!("out dx, eax", in("dx") 0x505u16, in("eax") 0u32, options(nostack))
        }
        "iopl-out" => {
            asm!(
                "pushfq",
                "or qword ptr [rsp], 0x3000",
                "popfq",
                "out dx, eax",
                in("dx") 0x505u16,
                in("eax") 0u32,
            )
        }
        "cli" => {
            asm!("cli", options(nostack))
        }
        "xsetbv" => {
            asm!("xsetbv", in("ecx") 0u32, in("eax") 7u32, in("edx") 0u32, options(nostack))
        }
        "rdpmc" => {
            asm!("rdpmc", in("ecx") 0u32, out("eax") _, out("edx") _, options(nostack))
        }
        "wrfsbase" => {
            asm!("wrfsbase {}", in(reg) 0x1000u64, options(nostack))
        }
        "simd-exception" => {
            let mxcsr: u32 = 0x1f80 & !(1 << 9); // zero-divide unmasked
            let one = 1.0f32.to_bits();
            {
                asm!(
                    "ldmxcsr [{m}]",
                    "movd xmm0, {one:e}",
                    "xorps xmm1, xmm1",
                    "divss xmm0, xmm1",
                    m = in(reg) &mxcsr,
                    one = in(reg) one,
                    options(nostack),
                )
            }
        }
        "avx" => {
            asm!("vxorps ymm0, ymm0, ymm0", options(nostack))
        }
        "avx512" => {
            asm!("kmovw k1, eax", in("eax") 1u32, options(nostack))
        }
        "alignment-check" => {
            let buffer = [0u64; 4];
            let misaligned = buffer.as_ptr() as u64 + 1;
            {
                asm!(
                    "pushfq",
                    "or qword ptr [rsp], 0x40000",
                    "popfq",
                    "mov {tmp}, qword ptr [{p}]",
                    "pushfq",
                    "and qword ptr [rsp], ~0x40000",
                    "popfq",
                    p = in(reg) misaligned,
                    tmp = out(reg) _,
                )
            }
        }
        "fxrstor-bad" => {
            let mut image = save_state(None);
            image.0[27] = 0xff; // MXCSR bits 24-31 are reserved
            asm!("fxrstor64 [{}]", in(reg) image.0.as_ptr(), options(nostack));
        }
        _ => return false,
    }
    true
}

fn main(args: &[u8]) -> i32 {
    match arg(args, "mode").and_then(|m| core::str::from_utf8(m).ok()) {
        Some(mode) => commit(mode, args),
        None => {
            println!("cpu-attack: no mode= given");
            64
        }
    }
}

superos_rt::entry!(main, "mode=<attack, see cpu-attack.rs> [count=<n>] [ms=<n>] [seed=<n>] [stack=<addr>] [turns=<n>] [vector=<n>]");
