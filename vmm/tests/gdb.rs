//! `superos-vmm run --gdb`: real gdb (Debian's, in batch mode) attached to a
//! live guest, and hostile remote-protocol packets sent by hand.
//!
//! Synchronisation is on observable facts only (a line of the VMM's output,
//! a socket accepting connections, gdb's own exit); never a sleep.

mod common;
use common::{gdb, kvm_available, scratch, vmm, Vmm, LIVE_SCENARIO};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs gdb in batch mode on `program` with `commands` after attaching to
/// `socket`; everything it printed.
fn gdb_batch(gdb: &str, program: &Path, socket: &Path, commands: &[&str]) -> String {
    let mut command = Command::new(gdb);
    command.args(["-nx", "-batch", "-ex", "set pagination off", "-ex"]);
    command.arg(format!("target remote {}", socket.display()));
    for c in commands {
        command.args(["-ex", c]);
    }
    let output = command.arg(program).output().expect("run gdb");
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// The embedded programs' ELF files, for gdb's symbols.
fn export_programs(dir: &Path) -> std::path::PathBuf {
    let programs = dir.join("programs");
    let (code, _, stderr) = vmm(&["list", "--export", programs.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    programs
}

/// gdb attached to a running guest: `info threads` lists each process (pid
/// and name) and the vCPU; a process's thread has its registers and stack;
/// the monitor commands answer as `inspect` does; a process thread cannot
/// read the kernel half; `kill` stops the guest.
#[test]
fn gdb_sees_every_process_as_a_thread_and_asks_the_checker() {
    if !kvm_available() {
        return;
    }
    let Some(gdb) = gdb() else { return };
    let dir = scratch("gdb", "threads");
    let programs = export_programs(&dir);
    let scenario = dir.join("live.toml");
    std::fs::write(&scenario, LIVE_SCENARIO).unwrap();
    let socket = dir.join("gdb.sock");
    let mut vm = Vmm::start(
        &[scenario.to_str().unwrap(), "--timeout", "120", "--gdb", socket.to_str().unwrap()],
        &dir.join("api.sock"),
    );
    vm.wait_for_line("[spinner#2] spin: spinning forever");
    vm.wait_for_line("[producer#1] shm-pipeline: producer: MEM_SHARE:1 mapped read-write");
    let text = gdb_batch(
        gdb,
        &programs.join("shm-pipeline"),
        &socket,
        &[
            "info threads",
            "thread 1",
            "bt",
            "monitor check",
            "monitor maps 1",
            "monitor regs 1",
            "monitor translate 1 0x400000",
            "monitor reboot",
            "x/4xb 0xffffffff80100000",
            "thread 3",
            "x/4xb 0xffffffff80100000",
            "info registers cs",
            "kill",
        ],
    );
    // Threads: the two processes by pid and name, and vCPU 0.
    assert!(text.contains("(pid 1 producer)") && text.contains("(pid 2 spinner, on CPU 0)"), "{text}");
    assert!(text.contains("(vCPU 0, in ring 3)") || text.contains("(vCPU 0, in the kernel)"), "{text}");
    // The producer, blocked receiving: its stack back to _start.
    assert!(text.contains("superos_rt::ipc_recv") && text.contains("shm_pipeline::producer"), "{text}");
    assert!(text.contains("in _start ()"), "{text}");
    // The monitor commands are inspect's.
    assert!(text.contains("every invariant held"), "{text}");
    assert!(
        text.contains("pid 1 (producer)") && text.contains("MEM_SHARE") || text.contains("shared region 1"),
        "{text}"
    );
    assert!(text.contains("registers from the context the kernel keeps for it"), "{text}");
    assert!(text.contains("PML4 [  0]"), "{text}");
    assert!(text.contains("unknown monitor command `reboot`"), "{text}");
    // A process thread reads only its own user pages; the vCPU thread
    // (selected third: the processes come first) reads the kernel half.
    let first = text.find("Cannot access memory at address 0xffffffff80100000");
    assert!(first.is_some(), "the kernel half from a process thread is refused:\n{text}");
    assert!(text.contains("0xffffffff80100000:"), "the vCPU thread reads the kernel:\n{text}");
    let (code, output) = vm.finish();
    assert_eq!(code, 1, "gdb's kill stopped the guest with its processes unfinished:\n{output}");
    assert!(output.contains("unfinished"), "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--gdb-wait`: gdb finds the vCPU before the kernel's first instruction
/// and steps the kernel's first instruction; a breakpoint in the kernel
/// half is refused (only user code takes one);
/// `continue` runs the default scenario to its clean end, which gdb reports
/// as an exit.
#[test]
fn gdb_waits_for_the_first_instruction_and_continues_to_a_clean_exit() {
    if !kvm_available() {
        return;
    }
    let Some(gdb) = gdb() else { return };
    let dir = scratch("gdb", "wait");
    let programs = export_programs(&dir);
    let socket = dir.join("gdb.sock");
    let vm = Vmm::start(
        &["--timeout", "120", "--gdb", socket.to_str().unwrap(), "--gdb-wait"],
        &dir.join("api.sock"),
    );
    let status = vm.text(&["status"]);
    assert!(status.starts_with("paused before the first guest instruction"), "{status}");
    let text = gdb_batch(
        gdb,
        &programs.join("write-code"),
        &socket,
        &[
            "info threads",
            "info registers rip cs",
            "stepi",
            "print/x $pc",
            "break *0xffffffff80100010",
            "continue",
            "delete",
            "continue",
        ],
    );
    assert!(text.contains("(vCPU 0, in the kernel)"), "{text}");
    assert!(text.contains("cs             0x10"), "the kernel's code segment:\n{text}");
    // One kernel instruction on (KVM's single-step of vCPU 0).
    let stepped = text.lines().find_map(|l| l.strip_prefix("$1 = 0x")).unwrap_or_else(|| panic!("{text}"));
    let stepped = u64::from_str_radix(stepped.trim(), 16).unwrap();
    assert!(stepped > 0xffff_ffff_8010_0000 && stepped < 0xffff_ffff_8010_0010, "{stepped:#x}\n{text}");
    assert!(text.contains("Cannot insert breakpoint 1"), "{text}");
    assert!(text.contains("exited normally"), "gdb heard of the clean end:\n{text}");
    // The breakpoint refused (the first `continue` aborted), deleted, the
    // second `continue` ran the guest to its end.
    let (code, output) = vm.finish();
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("9 of 9 processes as expected"), "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A breakpoint set before the program exists (`--gdb-wait`) goes into the
/// process when it is spawned; the process stops there (gdb names its
/// thread and function, `bt` and `monitor check` work while it is held),
/// single steps move it one instruction at a time, and once the breakpoint
/// is deleted `continue` runs the scenario to its clean end: the program
/// then meets the fault it was written for, as without a debugger.
#[test]
fn gdb_breaks_in_a_user_program_steps_and_continues_to_a_clean_exit() {
    if !kvm_available() {
        return;
    }
    let Some(gdb) = gdb() else { return };
    let dir = scratch("gdb", "break");
    let programs = export_programs(&dir);
    let socket = dir.join("gdb.sock");
    let vm = Vmm::start(
        &["--timeout", "120", "--gdb", socket.to_str().unwrap(), "--gdb-wait"],
        &dir.join("api.sock"),
    );
    let text = gdb_batch(
        gdb,
        &programs.join("write-code"),
        &socket,
        &[
            "monitor program",
            "monitor program nonesuch",
            "monitor program write-code",
            "break write_code::main",
            "continue",
            "info threads",
            "bt",
            "monitor check",
            "print/x $pc",
            "stepi",
            "print/x $pc",
            "stepi",
            "print/x $pc",
            "x/i $pc",
            "info registers eflags",
            "delete",
            "continue",
        ],
    );
    assert!(text.contains("no program chosen for breakpoints"), "{text}");
    assert!(text.contains("no process of this run runs nonesuch"), "{text}");
    assert!(text.contains("breakpoints go into the processes of write-code"), "{text}");
    assert!(text.contains("Breakpoint 1 at 0x"), "{text}");
    assert!(text.contains("hit Breakpoint 1, ") && text.contains("write_code::main"), "{text}");
    assert!(text.contains("write-code") && text.contains("(pid "), "its thread is named:\n{text}");
    assert!(text.contains("in _start ()"), "bt from the breakpoint:\n{text}");
    assert!(text.contains("every invariant held"), "{text}");
    // At the breakpoint's address (the int3 undone), then one instruction on
    // per stepi; the trap flag is the debugger's, not shown.
    let at = |name: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}:\n{text}"));
        u64::from_str_radix(line.trim_start_matches(name).trim_start_matches("0x"), 16).unwrap()
    };
    let set = text.lines().find_map(|l| l.strip_prefix("Breakpoint 1 at 0x")?.split(':').next()).unwrap();
    let (first, second, third) = (at("$1 = "), at("$2 = "), at("$3 = "));
    assert_eq!(first, u64::from_str_radix(set, 16).unwrap(), "{text}");
    assert!(
        first < second && second < third && third - first < 32,
        "{first:#x} {second:#x} {third:#x}\n{text}"
    );
    assert!(text.contains("=> 0x"), "{text}");
    assert!(!text.contains(" TF "), "{text}");
    assert!(text.contains("exited normally"), "{text}");
    let (code, output) = vm.finish();
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("9 of 9 processes as expected"), "{output}");
    assert!(output.contains("write-code") && output.contains("killed: write-to-code"), "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connection to the stub at `socket`, each reply waited for at most a
/// minute.
fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream
}

/// The symbols of the kernel ELF `list --export` wrote into `programs`.
fn kernel_symbols(programs: &Path) -> superos_vmm::diagnose::KernelSymbols {
    let kernel = std::fs::read(programs.join(superos_vmm::images::KERNEL_FILE_NAME)).unwrap();
    superos_vmm::diagnose::KernelSymbols::parse(&kernel)
}

/// `$<body>#<checksum>`.
fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Sends `body` and reads the stub's reply packet's body (acks skipped).
fn exchange(stream: &mut UnixStream, body: &str) -> String {
    stream.write_all(&packet(body)).unwrap();
    let reply = read_reply(stream);
    // On the test's output (shown when it fails): the conversation so far.
    println!("gdb> {body}\n  < {reply}");
    reply
}

fn read_reply(stream: &mut UnixStream) -> String {
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte).unwrap_or_else(|e| panic!("no reply ({e}) after {reply:?}"));
        match byte[0] {
            b'+' if reply.is_empty() => continue,
            b'$' if reply.is_empty() => {}
            b'#' => {
                let mut sum = [0u8; 2];
                stream.read_exact(&mut sum).unwrap();
                // The stub may already have closed the connection after its
                // last reply (the guest's end): the acknowledgement is moot.
                let _ = stream.write_all(b"+");
                return String::from_utf8_lossy(&reply).into_owned();
            }
            b => reply.push(b),
        }
    }
}

/// The thread a stop reply names (`thread:[pP.]HEX;`).
fn stop_thread(stop: &str) -> u64 {
    let (_, rest) = stop.split_once("thread:").unwrap_or_else(|| panic!("{stop}"));
    let id = rest.split(';').next().unwrap().rsplit('.').next().unwrap();
    u64::from_str_radix(id, 16).unwrap_or_else(|_| panic!("{stop}"))
}

/// A reply's body with gdb's run-length encoding undone (`X*N`: `X` and
/// `N - 29` more of it).
fn unrle(body: &str) -> String {
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == '*' {
            let last = out.chars().last().expect("a run after a character");
            let count = chars.next().expect("a run length") as usize - 29;
            out.extend(std::iter::repeat_n(last, count));
        } else {
            out.push(c);
        }
    }
    out
}

/// The instruction pointer in a `g` reply (x86-64: after 16 registers).
fn rip_of(registers: &str) -> u64 {
    let registers = unrle(registers);
    let hex = registers.get(256..272).unwrap_or_else(|| panic!("a register packet: {registers:?}"));
    let bytes: Vec<u8> = (0..8).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    u64::from_le_bytes(bytes.try_into().unwrap())
}

/// The 64-bit register `index` (gdb's x86-64 order: rax, rbx, rcx, rdx,
/// rsi, rdi, rbp, rsp, r8..r15, then rip at 16) of a `g` reply.
fn register_of(registers: &str, index: usize) -> u64 {
    let registers = unrle(registers);
    let hex = &registers[16 * index..16 * index + 16];
    let bytes: Vec<u8> = (0..8).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    u64::from_le_bytes(bytes.try_into().unwrap())
}

/// The 32-bit register at byte `offset` of a `g` reply (x86-64: fctrl at
/// 244, mxcsr at 532).
fn register32_at(registers: &str, offset: usize) -> u32 {
    let registers = unrle(registers);
    let hex = registers.get(2 * offset..2 * offset + 8).unwrap_or_else(|| panic!("short: {registers}"));
    let bytes: Vec<u8> = (0..4).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    u32::from_le_bytes(bytes.try_into().unwrap())
}

/// A `G` packet: the registers of a `g` reply with register `index` set
/// to `value`.
fn with_register(registers: &str, index: usize, value: u64) -> String {
    let mut registers = unrle(registers);
    let hex: String = value.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
    registers.replace_range(16 * index..16 * index + 16, &hex);
    format!("G{registers}")
}

/// Breakpoints and steps by hand, packet by packet, so that they are
/// checked on every host (the nested host's L1 has no gdb): a breakpoint at
/// write-code's entry point, set before it exists, stops it there; a step
/// moves it one instruction; a step of vCPU 0 moves the kernel one
/// instruction; with the breakpoint out, the guest runs to its clean end.
#[test]
fn breakpoints_and_steps_work_packet_by_packet() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("gdb", "packets");
    let programs = export_programs(&dir);
    let elf = std::fs::read(programs.join("write-code")).unwrap();
    let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
    let socket = dir.join("gdb.sock");
    let vm = Vmm::start(
        &["--timeout", "120", "--gdb", socket.to_str().unwrap(), "--gdb-wait"],
        &dir.join("api.sock"),
    );
    let mut stream = connect(&socket);
    assert!(exchange(&mut stream, "qSupported:swbreak+").contains("PacketSize="));
    assert!(exchange(&mut stream, "?").starts_with('T'));
    let hex = |text: &str| text.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let chosen = exchange(&mut stream, &format!("qRcmd,{}", hex("program write-code")));
    if chosen.starts_with('O') {
        assert_eq!(read_reply(&mut stream), "OK");
    }
    assert_eq!(exchange(&mut stream, &format!("Z0,{entry:x},1")), "OK");
    // write-code is pid 9 in the default scenario.
    let stop = exchange(&mut stream, "vCont;c");
    assert!(stop.starts_with("T05") && stop_thread(&stop) == 9, "{stop}");
    assert!(stop.contains("swbreak"), "{stop}");
    assert_eq!(exchange(&mut stream, "Hg9"), "OK");
    let registers = exchange(&mut stream, "g");
    assert_eq!(rip_of(&registers), entry, "stopped on the breakpoint, the int3 undone");
    // Its x87 and SSE registers, from the vCPU it trapped on: as the kernel
    // restored them for its first instruction (the initial state).
    assert_eq!(
        (register32_at(&registers, 244), register32_at(&registers, 532)),
        (0x37f, 0x1f80),
        "fctrl, mxcsr"
    );
    assert_eq!(exchange(&mut stream, &format!("z0,{entry:x},1")), "OK");
    let stop = exchange(&mut stream, "vCont;s:9");
    assert!(stop.starts_with("T05") && stop_thread(&stop) == 9, "{stop}");
    let registers = exchange(&mut stream, "g");
    let stepped = rip_of(&registers);
    assert!(stepped > entry && stepped < entry + 16, "one instruction on: {entry:#x} -> {stepped:#x}");
    // Registers written at the step's trap are those it resumes with: rbx,
    // and rip past `xor ebp, ebp` to `_start`'s call, whose target it steps to.
    let call = unrle(&exchange(&mut stream, "m400006,5"));
    assert_eq!(&call[..2], "e8", "_start calls __superos_main at +6");
    let offset = u32::from_str_radix(&call[2..], 16).unwrap().swap_bytes() as i32;
    let target = (0x40000b_i64 + i64::from(offset)) as u64;
    assert_eq!(exchange(&mut stream, &with_register(&registers, 1, 0x5eed)), "OK");
    let registers = exchange(&mut stream, "g");
    assert_eq!(register_of(&registers, 1), 0x5eed);
    assert_eq!(exchange(&mut stream, &with_register(&registers, 16, 0x400006)), "OK");
    let stop = exchange(&mut stream, "vCont;s:9");
    assert!(stop.starts_with("T05") && stop_thread(&stop) == 9, "{stop}");
    let registers = exchange(&mut stream, "g");
    assert_eq!((rip_of(&registers), register_of(&registers, 1)), (target, 0x5eed), "resumed as written");
    // A vCPU not held at a kernel trap: its registers are not written.
    assert_eq!(exchange(&mut stream, "Hgf4240"), "OK");
    let vcpu = exchange(&mut stream, "g");
    assert!(exchange(&mut stream, &with_register(&vcpu, 1, 1)).starts_with('E'), "vCPU 0 is not at a trap");
    assert_eq!(exchange(&mut stream, "Hg9"), "OK");
    // vCPU 0's thread: one instruction of the kernel, which holds the step's trap.
    let stop = exchange(&mut stream, "vCont;s:f4240");
    assert!(stop.starts_with("T05") && stop_thread(&stop) == 1_000_000, "{stop}");
    assert_eq!(exchange(&mut stream, "Hgf4240"), "OK");
    let kernel = rip_of(&exchange(&mut stream, "g"));
    assert!(kernel >= 0xffff_8000_0000_0000, "a kernel instruction: {kernel:#x}");
    let end = exchange(&mut stream, "vCont;c");
    assert!(end.starts_with('W'), "the guest ran to its end: {end}");
    let (code, output) = vm.finish();
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("9 of 9 processes as expected"), "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// gdb with the kernel's symbols (`list --export` writes its ELF): a
/// breakpoint in a kernel function stops vCPU 0's thread there, `bt`
/// unwinds the kernel's stack to the system call that led there, `stepi`
/// moves one instruction, `continue` stops there again at the next call,
/// and once deleted the guest runs to its clean end, every invariant held.
#[test]
fn gdb_breaks_in_the_kernel_and_continues_to_a_clean_exit() {
    if !kvm_available() {
        return;
    }
    let Some(gdb) = gdb() else { return };
    let dir = scratch("gdb", "kernel-break");
    let programs = export_programs(&dir);
    let socket = dir.join("gdb.sock");
    let vm = Vmm::start(
        &["--timeout", "120", "--gdb", socket.to_str().unwrap(), "--gdb-wait"],
        &dir.join("api.sock"),
    );
    let text = gdb_batch(
        gdb,
        &programs.join(superos_vmm::images::KERNEL_FILE_NAME),
        &socket,
        &[
            "break guest_kernel::address_space::AddressSpace::map_anonymous",
            "continue",
            "info threads",
            "bt 4",
            "print/x $pc",
            "stepi",
            "print/x $pc",
            "continue",
            "print/x $pc",
            "delete",
            // A hardware breakpoint where no int3 may go (the debug path).
            "hbreak trap_dispatch",
            "continue",
            "print/x $pc",
            "delete",
            "continue",
        ],
    );
    let hardware = text
        .lines()
        .find_map(|l| l.strip_prefix("Hardware assisted breakpoint 2 at 0x")?.split(':').next())
        .unwrap_or_else(|| panic!("hbreak accepted:\n{text}"));
    assert!(
        text.contains("hit Breakpoint 1, guest_kernel::address_space::AddressSpace::map_anonymous"),
        "{text}"
    );
    assert!(text.contains("(vCPU 0, in the kernel)"), "vCPU 0's thread stopped:\n{text}");
    assert!(text.contains("sys_mem_map"), "bt through the kernel's stack:\n{text}");
    let at = |name: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}:\n{text}"));
        u64::from_str_radix(line.trim_start_matches(name).trim_start_matches("0x"), 16).unwrap()
    };
    let (hit, stepped, again) = (at("$1 = "), at("$2 = "), at("$3 = "));
    assert!(
        hit >= 0xffff_ffff_8000_0000 && stepped > hit && stepped - hit < 16,
        "{hit:#x} {stepped:#x}\n{text}"
    );
    assert_eq!(again, hit, "the next mem_map stops there again:\n{text}");
    assert!(text.contains("hit Breakpoint 2, "), "the hardware breakpoint stopped it:\n{text}");
    assert_eq!(at("$4 = "), u64::from_str_radix(hardware, 16).unwrap(), "{text}");
    assert!(text.contains("exited normally"), "{text}");
    let (code, output) = vm.finish();
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("9 of 9 processes as expected") && output.contains("invariants held"),
        "{output}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A breakpoint in the kernel, packet by packet (the nested host's L1 has
/// no gdb): set at `--gdb-wait` (before the kernel can report one, so it is
/// planted at its boot hello) in `Kernel::handle_trap`, it stops a vCPU's
/// thread there, the registers those of the kernel at the breakpoint; the
/// checker does not count the debugger's `int3` as a change of the kernel's
/// text; a step moves the kernel one instruction; with the breakpoint out
/// the guest runs to its clean end. On ordinary KVM the kernel reports the
/// `int3` (its ring-0 debug trap) and steps with the trap flag; on the PVM
/// host, whose ring-0 emulator cannot execute an `int3`, the vCPU stops on
/// it (an emulation failure the VMM takes as the breakpoint) and steps with
/// KVM's single-step: the same packets, the same answers.
#[test]
fn kernel_breakpoints_work_packet_by_packet() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("gdb", "kernel-packets");
    let programs = export_programs(&dir);
    let symbols = kernel_symbols(&programs);
    let handle_trap =
        symbols.function_named("guest_kernel::kernel::Kernel::handle_trap").expect("handle_trap");
    let socket = dir.join("gdb.sock");
    // Two vCPUs where the kernel reports its breakpoints (any CPU may hit
    // it first); the PVM host holds one on the bootstrap vCPU only.
    let cpus = if Path::new("/sys/module/kvm_pvm").exists() { "1" } else { "2" };
    let vm = Vmm::start(
        &["--timeout", "120", "--cpus", cpus, "--gdb", socket.to_str().unwrap(), "--gdb-wait"],
        &dir.join("api.sock"),
    );
    let mut stream = connect(&socket);
    assert!(exchange(&mut stream, "qSupported:swbreak+").contains("PacketSize="));
    assert!(exchange(&mut stream, "?").starts_with('T'));
    // The kernel's debug path (its entry stubs first in its text) takes none.
    let refused = exchange(&mut stream, &format!("Z0,{:x},1", symbols.address("trap_dispatch").unwrap()));
    assert!(refused.starts_with('E'), "{refused}");
    assert_eq!(exchange(&mut stream, &format!("Z0,{handle_trap:x},1")), "OK");
    let stop = exchange(&mut stream, "vCont;c");
    assert!(stop.starts_with("T05") && stop.contains("swbreak"), "{stop}");
    let thread = stop_thread(&stop);
    assert!(thread >= 1_000_000, "a vCPU's thread: {stop}");
    assert_eq!(exchange(&mut stream, &format!("Hg{thread:x}")), "OK");
    assert_eq!(rip_of(&exchange(&mut stream, "g")), handle_trap, "on the breakpoint, the int3 undone");
    let hex = |text: &str| text.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let mut reply = exchange(&mut stream, &format!("qRcmd,{}", hex("check")));
    let mut said = Vec::new();
    // Console output comes in `O` packets until the reply, "OK".
    while let Some(output) = reply.strip_prefix('O').filter(|_| reply != "OK") {
        let output = unrle(output);
        said.extend(
            (0..output.len() / 2).map(|i| u8::from_str_radix(&output[2 * i..2 * i + 2], 16).unwrap()),
        );
        reply = read_reply(&mut stream);
    }
    assert_eq!(reply, "OK");
    let said = String::from_utf8_lossy(&said);
    // Held in the middle of a kernel entry, other findings may be the
    // kernel's half-done work; the debugger's int3 is not one.
    assert!(said.starts_with("check "), "a check's report: {said}");
    assert!(!said.contains("kernel-text-unchanged"), "{said}");
    let text = exchange(&mut stream, &format!("m{:x},1", handle_trap));
    assert_eq!(text, "cc", "the int3 is in the kernel's text while the breakpoint is in");
    assert_eq!(exchange(&mut stream, &format!("z0,{handle_trap:x},1")), "OK");
    // r11 (scratch at a function's entry) written at the breakpoint: the
    // kernel steps on with it.
    let registers = exchange(&mut stream, "g");
    assert_eq!(exchange(&mut stream, &with_register(&registers, 11, 0x5eed)), "OK");
    let stop = exchange(&mut stream, &format!("vCont;s:{thread:x}"));
    assert!(stop.starts_with("T05") && stop_thread(&stop) == thread, "{stop}");
    let registers = exchange(&mut stream, "g");
    let stepped = rip_of(&registers);
    assert!(stepped > handle_trap && stepped < handle_trap + 16, "one instruction on: {stepped:#x}");
    assert_eq!(register_of(&registers, 11), 0x5eed, "the kernel resumed with the register gdb wrote");
    let end = exchange(&mut stream, "vCont;c");
    assert!(end.starts_with('W'), "the guest ran to its end: {end}");
    let (code, output) = vm.finish();
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("9 of 9 processes as expected") && output.contains("invariants held"),
        "{output}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hardware breakpoint (KVM's guest debugging, DR0 of vCPU 0) where no
/// `int3` may go: `trap_dispatch`, on the kernel's debug path. It stops
/// vCPU 0's thread there (`hwbreak`); taken out, the guest runs to its end.
/// User addresses take none (every program shares them). Where it fires:
/// the PVM host, whose instruction emulator checks DR0-3 for ring-0 code;
/// QEMU's TCG before 9.1 arms no DR7 breakpoint of an SVM guest, so on the
/// nested host it is armed and taken out without a stop (what the test
/// checks there), as it would fire on a hardware host.
#[test]
fn hardware_breakpoints_work_packet_by_packet() {
    if !kvm_available() {
        return;
    }
    let fires = Path::new("/sys/module/kvm_pvm").exists();
    let dir = scratch("gdb", "hardware-packets");
    let programs = export_programs(&dir);
    let symbols = kernel_symbols(&programs);
    let trap_dispatch = symbols.address("trap_dispatch").expect("trap_dispatch");
    let socket = dir.join("gdb.sock");
    let vm = Vmm::start(
        &["--timeout", "120", "--gdb", socket.to_str().unwrap(), "--gdb-wait"],
        &dir.join("api.sock"),
    );
    let mut stream = connect(&socket);
    assert!(exchange(&mut stream, "qSupported:swbreak+;hwbreak+").contains("hwbreak+"));
    assert!(exchange(&mut stream, "?").starts_with('T'));
    assert!(exchange(&mut stream, "Z1,400000,1").starts_with('E'), "a user address");
    assert!(exchange(&mut stream, &format!("Z1,{trap_dispatch:x},2")).starts_with('E'), "kind 2");
    assert_eq!(exchange(&mut stream, &format!("Z1,{trap_dispatch:x},1")), "OK");
    if fires {
        let stop = exchange(&mut stream, "vCont;c");
        assert!(stop.starts_with("T05") && stop.contains("hwbreak"), "{stop}");
        assert_eq!(stop_thread(&stop), 1_000_000, "vCPU 0's thread: {stop}");
        assert_eq!(exchange(&mut stream, "Hgf4240"), "OK");
        assert_eq!(rip_of(&exchange(&mut stream, "g")), trap_dispatch);
    }
    assert_eq!(exchange(&mut stream, &format!("z1,{trap_dispatch:x},1")), "OK");
    let end = exchange(&mut stream, "vCont;c");
    assert!(end.starts_with('W'), "the guest ran to its end: {end}");
    let (code, output) = vm.finish();
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("9 of 9 processes as expected"), "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hostile packets: huge reads, unmapped and kernel-half reads of a process
/// thread, threads that do not exist, writes the stub refuses, garbage. Each
/// gets an error reply (or an empty one: unsupported), the session goes on,
/// and after it a real gdb still attaches: the VMM never panics.
#[test]
fn hostile_remote_protocol_packets_get_error_replies() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("gdb", "hostile");
    let scenario = dir.join("live.toml");
    std::fs::write(&scenario, LIVE_SCENARIO).unwrap();
    let socket = dir.join("gdb.sock");
    let mut vm = Vmm::start(
        &[scenario.to_str().unwrap(), "--timeout", "120", "--gdb", socket.to_str().unwrap()],
        &dir.join("api.sock"),
    );
    vm.wait_for_line("[spinner#2] spin: spinning forever");
    let mut stream = connect(&socket);
    assert!(exchange(&mut stream, "qSupported:multiprocess+").contains("PacketSize="));
    assert!(exchange(&mut stream, "?").starts_with('T'), "a stop reply: the guest is paused for gdb");
    assert_eq!(exchange(&mut stream, "Hg1"), "OK");
    let registers = exchange(&mut stream, "g");
    assert!(!registers.is_empty() && !registers.starts_with('E'), "{registers}");
    // The x87 and SSE registers of the waiting producer (its save page) and
    // of the spinner (the vCPU, or its save page): neither uses them, so
    // both are the initial state the kernel gave them.
    for pid in [1, 2] {
        assert_eq!(exchange(&mut stream, &format!("Hg{pid}")), "OK");
        let registers = exchange(&mut stream, "g");
        let fpu = (register32_at(&registers, 244), register32_at(&registers, 532));
        assert_eq!(fpu, (0x37f, 0x1f80), "pid {pid}'s fctrl and mxcsr");
    }
    assert_eq!(exchange(&mut stream, "Hg1"), "OK");
    let refusals = [
        ("m0,ffffffffffffffff", "a huge read of unmapped memory"),
        ("mffffffff80100000,10", "the kernel half through a process thread"),
        ("mfffffffffffffff0,100", "a read that wraps around"),
        ("M400000,4:90909090", "a write to read-only code"),
        ("Z0,400000,1", "a breakpoint with no program chosen (two run here)"),
    ];
    for (body, what) in refusals {
        let reply = exchange(&mut stream, body);
        assert!(reply.starts_with('E') || reply.is_empty(), "{what} ({body}): {reply:?}");
    }
    // With a program chosen: breakpoints outside user code are refused; one
    // in its code is planted and taken out again, the byte as it was.
    let hex = |text: &str| text.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let chosen = exchange(&mut stream, &format!("qRcmd,{}", hex("program spin")));
    assert!(chosen.starts_with('O') || chosen == "OK", "{chosen}");
    if chosen.starts_with('O') {
        assert_eq!(read_reply(&mut stream), "OK");
    }
    for (body, what) in [
        ("Z0,ffffffff80100010,1", "a breakpoint in the kernel half"),
        ("Z0,7fffffff0004,1", "a breakpoint in the gate page"),
        ("Z0,400000,2", "a breakpoint of another size than int3's"),
        ("Z1,400000,1", "a hardware breakpoint"),
    ] {
        let reply = exchange(&mut stream, body);
        assert!(reply.starts_with('E') || reply.is_empty(), "{what} ({body}): {reply:?}");
    }
    assert_eq!(exchange(&mut stream, "Hg2"), "OK");
    let before = exchange(&mut stream, "m400000,1");
    assert_eq!(exchange(&mut stream, "Z0,400000,1"), "OK");
    assert_eq!(exchange(&mut stream, "z0,400000,1"), "OK");
    assert_eq!(exchange(&mut stream, "m400000,1"), before, "the byte is back");
    let again = exchange(&mut stream, "z0,400000,1");
    assert!(again.starts_with('E') || again.is_empty(), "no breakpoint there any more: {again:?}");
    // A thread that does not exist: selecting it is gdb's business, reading it an error.
    exchange(&mut stream, "Hg999");
    assert!(exchange(&mut stream, "g").starts_with('E'), "the registers of no thread");
    assert!(exchange(&mut stream, "m400000,10").starts_with('E'), "the memory of no thread");
    // A huge read of mapped memory is cut to what the packet can carry.
    assert_eq!(exchange(&mut stream, "Hg1"), "OK");
    let code = exchange(&mut stream, "m400000,100000");
    assert!(!code.is_empty() && !code.starts_with('E') && code.len() <= 2 * 0x10_0000, "{}", code.len());
    // A register packet of the wrong size, and a packet with a bad checksum,
    // are protocol errors that end the session (gdbstub's rule) as a detach
    // would: the guest runs on and gdb may attach again.
    stream.write_all(&packet("G00")).unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.write_all(b"$qfoo#00\x00\xff").unwrap();
    let _ = stream.read_to_end(&mut rest);
    assert!(vm.text(&["status"]).starts_with("running"), "the guest runs on after a broken session");
    // A connection dropped mid-packet.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.write_all(b"$m4000").unwrap();
    drop(stream);
    // The VMM still answers, and a real gdb still attaches.
    assert!(vm.text(&["status"]).contains("events so far"));
    if let Some(gdb) = gdb() {
        let text = gdb_batch(gdb, Path::new(""), &socket, &["monitor ps", "kill"]);
        assert!(text.contains("2 processes"), "{text}");
    } else {
        vm.text(&["quit"]);
    }
    let (_, output) = vm.finish();
    assert!(!output.contains("panicked"), "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}
