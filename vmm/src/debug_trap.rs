//! What a debugger (the gdb stub, `run --gdb`) asked of the guest's
//! processes: breakpoints planted as `int3` in their code, single steps,
//! and the debug trap the guest is held at.
//!
//! The kernel reports every ring-3 `int3` outside its gate and every ring-3
//! debug exception ([`Hypercall::DebugTrap`](superos_protocol::hypercall::Hypercall)):
//! [`Debugger::claim`] says whether the debugger asked for it (an `int3` it
//! planted at that address in that process, or a step it set up for that
//! process). Any other trap is the program's own fault, and the process is
//! terminated for it as when no debugger is attached.
//!
//! A breakpoint is an address in one program's user code (every program is
//! linked at the same base, so an address means something only in one
//! program: an `int3` planted in another would land inside one of its
//! instructions): it goes into every live process of that program that maps
//! user code there, and into every process of it spawned while it is wanted
//! (before its first instruction: [`Debugger::plant_in`] runs at the spawn
//! event). Frames are patched once however many processes
//! share them. Taking one out puts the original byte back only where a
//! process it went into still maps that frame at that address and the
//! `int3` is still there: a process that exited gave its frames back, and
//! they may be another's by now.
//!
//! A breakpoint in the kernel (an address in its text past its debug path,
//! [`superos_protocol::cpu::symbols::DEBUG_PATH_END`]) is an `int3` in the
//! one copy of the text every CPU runs. The kernel reports a ring-0 `int3`
//! or debug exception as a trap of pid 0 on its CPU (without its big lock);
//! one the debugger asked for holds the guest (the stop is that vCPU's
//! thread's) and the kernel resumes where the answer says, with the trap
//! flag for a step. The bytes replaced are in [`TextPatches`], shared with
//! the checker, for which they are the debugger's, not a change of the
//! kernel's text (any other byte still is).

use crate::inspect::{TrapKind, TrapStop};
use crate::memory::GuestRam;
use crate::walk;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use superos_protocol::introspect::UserContext;
use superos_protocol::layout::{GATE_VA, KERNEL_VMA_BASE, PAGE_SIZE, USER_HALF_END};

/// The bytes of kernel text a debugger replaced with `int3`: their
/// guest-physical address and the byte that was there. Shared by the
/// debugger ([`Debugger`]) and the checker (`kernel-text-unchanged`).
pub type TextPatches = Arc<Mutex<BTreeMap<u64, u8>>>;

/// The pid of the kernel's own traps.
pub const KERNEL_PID: u32 = 0;

/// Hardware breakpoints a vCPU has (DR0-3).
pub const HARDWARE_SLOTS: usize = 4;

/// `int3`, the one-byte breakpoint instruction (gdb's kind 1 on x86).
pub const INT3: u8 = 0xcc;
/// The `#DB` vector (a single step).
const DEBUG_VECTOR: u64 = 1;
/// The `#BP` vector (`int3`).
const BREAKPOINT_VECTOR: u64 = 3;
/// RFLAGS.TF.
pub const RFLAGS_TF: u64 = 1 << 8;

/// The debugger's requests (one per run; empty while none is attached).
#[derive(Debug, Default)]
pub struct Debugger {
    /// A debugger is attached.
    pub attached: bool,
    /// Addresses it wants a breakpoint at, with the program they are in.
    wanted: BTreeMap<u64, String>,
    /// Where each went: (pid, guest-physical address of the byte).
    planted: BTreeMap<u64, Vec<(u32, u64)>>,
    /// The bytes the `int3`s replaced, by guest-physical address, with how
    /// many breakpoints share that byte.
    originals: BTreeMap<u64, (u8, usize)>,
    /// Processes whose next debug exception is a step it set up.
    steps: BTreeSet<u32>,
    /// The trap the guest is held at.
    pub trap: Option<TrapStop>,
    /// The debugger has been told of `trap`.
    pub reported: bool,
    /// How the held process resumes (`DEBUG_ACTION_*`), once the debugger
    /// says.
    pub action: Option<u32>,
    /// vCPUs whose ring-3 code takes one step when the guest resumes.
    pub vcpu_steps: Vec<u32>,
    /// The bootstrap vCPU is to take one step of whatever it runs, kernel
    /// included (KVM's single-step), when the guest resumes.
    pub kernel_step: bool,
    /// That step is armed in KVM: its debug exit is the debugger's.
    pub kernel_step_armed: bool,
    /// The bootstrap vCPU completed the step and is held there; the
    /// debugger has not been told yet.
    pub kernel_step_done: bool,
    /// Steps a debugger set up and left (it detached) before they were
    /// taken: the process resumes from such a debug exception as if its
    /// trap flag had never been set, instead of being killed for it. Kept
    /// across attaches.
    abandoned_steps: BTreeSet<u32>,
    /// A kernel step was armed in KVM when the debugger left: its debug
    /// exit is switched off and the guest goes on.
    pub abandoned_kernel_step: bool,
    /// Breakpoints in the kernel's text: address -> guest-physical address
    /// of the `int3`, once planted (at the kernel's boot hello: before it,
    /// the kernel has no way to report one).
    kernel: BTreeMap<u64, Option<u64>>,
    /// CPUs whose next ring-0 debug exception is a step the debugger asked
    /// of the kernel, held at a kernel trap there.
    kernel_trap_steps: BTreeSet<u32>,
    /// Such steps a debugger left before they were taken.
    abandoned_kernel_trap_steps: BTreeSet<u32>,
    /// The kernel-text bytes replaced, shared with the checker.
    pub patches: TextPatches,
    /// The debugger rewrote the registers of the held trap
    /// ([`TrapStop::registers`]): the trapped code resumes with them.
    pub registers_written: bool,
    /// Hardware breakpoints (kernel instruction addresses, at most
    /// [`HARDWARE_SLOTS`]), armed in the bootstrap vCPU through KVM.
    pub hardware: Vec<u64>,
    /// `hardware` changed since it was last given to KVM.
    pub hardware_changed: bool,
    /// The bootstrap vCPU is held at a hardware breakpoint; the debugger
    /// has not been told yet.
    pub hardware_hit: bool,
    /// The held trap is a kernel breakpoint the vCPU itself stopped at (the
    /// PVM host: its ring-0 emulator cannot execute the `int3`), not one
    /// the kernel reported: a step from it is KVM's single-step.
    pub vcpu_trap: bool,
}

/// Why an address cannot take a breakpoint, if it cannot.
pub fn refuse_address(addr: u64) -> Option<String> {
    if addr >= USER_HALF_END {
        Some(format!("{addr:#x} is not in the user half: breakpoints go in user code"))
    } else if addr & !(PAGE_SIZE - 1) == GATE_VA {
        Some(format!("{addr:#x} is in the gate page, every process's way into the kernel"))
    } else {
        None
    }
}

/// The guest-physical address of user code byte `addr` in the address
/// space at `pml4`, if `addr` is user code there (user, executable, not
/// writable).
pub fn code_byte(ram: &GuestRam, pml4: u64, addr: u64) -> Option<u64> {
    let leaf = walk::translate(ram, pml4, addr).ok()?;
    (leaf.user && !leaf.nx && !leaf.writable).then_some(leaf.phys)
}

impl Debugger {
    /// A debugger attached: no request yet.
    pub fn attach() -> Debugger {
        Debugger { attached: true, ..Debugger::default() }
    }

    /// What is left of this debugger when it goes (a new one attaches, or
    /// it detaches: `attached`): the steps it set up and that were not
    /// taken yet, which must not kill their processes.
    pub fn succeeded(self, attached: bool) -> Debugger {
        let mut abandoned_steps = self.abandoned_steps;
        abandoned_steps.extend(self.steps);
        let mut abandoned_kernel_trap_steps = self.abandoned_kernel_trap_steps;
        abandoned_kernel_trap_steps.extend(self.kernel_trap_steps);
        Debugger {
            attached,
            // The vCPU still has them armed: given back empty to KVM.
            hardware_changed: self.hardware_changed || !self.hardware.is_empty(),
            abandoned_steps,
            abandoned_kernel_step: self.abandoned_kernel_step || self.kernel_step_armed,
            abandoned_kernel_trap_steps,
            patches: self.patches,
            ..Debugger::default()
        }
    }

    /// Whether the trap `pid` took with `registers` is a step a debugger
    /// that left set up (once): the process then resumes as it is, trap
    /// flag clear.
    pub fn take_abandoned_step(&mut self, pid: u32, cpu: u32, registers: &UserContext) -> bool {
        registers.vector == DEBUG_VECTOR
            && match pid {
                KERNEL_PID => self.abandoned_kernel_trap_steps.remove(&cpu),
                pid => self.abandoned_steps.remove(&pid),
            }
    }

    /// Wants a breakpoint at kernel address `addr`, which must be in
    /// `breakable` (the kernel's text past its debug path), and plants it
    /// if the kernel is `ready` (it said its boot hello), else when it is
    /// ([`Debugger::plant_kernel`]).
    pub fn insert_kernel(
        &mut self,
        ram: &GuestRam,
        addr: u64,
        breakable: Range<u64>,
        ready: bool,
    ) -> Result<(), String> {
        if !breakable.contains(&addr) {
            return Err(format!(
                "{addr:#x} is not in the kernel's text past its debug path ({:#x}..{:#x}): the way to the debugger and back takes no breakpoint",
                breakable.start, breakable.end
            ));
        }
        self.kernel.entry(addr).or_insert(None);
        if ready {
            self.plant_kernel(ram)?;
        }
        Ok(())
    }

    /// Plants the kernel breakpoints not planted yet (the kernel is ready
    /// to report them).
    pub fn plant_kernel(&mut self, ram: &GuestRam) -> Result<(), String> {
        for (&addr, planted) in self.kernel.iter_mut().filter(|(_, planted)| planted.is_none()) {
            let gpa = addr - KERNEL_VMA_BASE;
            let mut byte = [0u8; 1];
            ram.read_bytes(gpa, &mut byte).map_err(|e| e.to_string())?;
            ram.write_bytes(gpa, &[INT3]).map_err(|e| e.to_string())?;
            self.patches.lock().unwrap_or_else(|e| e.into_inner()).insert(gpa, byte[0]);
            *planted = Some(gpa);
        }
        Ok(())
    }

    /// Takes the kernel breakpoint at `addr` out; false if there was none.
    fn remove_kernel(&mut self, ram: &GuestRam, addr: u64) -> bool {
        let Some(planted) = self.kernel.remove(&addr) else { return false };
        let Some(gpa) = planted else { return true };
        let original = self.patches.lock().unwrap_or_else(|e| e.into_inner()).remove(&gpa);
        let mut byte = [0u8; 1];
        if let (Some(original), Ok(())) = (original, ram.read_bytes(gpa, &mut byte)) {
            if byte[0] == INT3 {
                let _ = ram.write_bytes(gpa, &[original]);
            }
        }
        true
    }

    /// A hardware breakpoint at kernel address `addr` (armed in the
    /// bootstrap vCPU when the guest resumes).
    pub fn insert_hardware(&mut self, addr: u64) -> Result<(), String> {
        if addr < superos_protocol::layout::KERNEL_HALF_START {
            return Err(format!(
                "{addr:#x} is not a kernel address: hardware breakpoints watch the kernel (every program is linked at the same addresses; a process's code takes an int3)"
            ));
        }
        if !self.hardware.contains(&addr) {
            if self.hardware.len() == HARDWARE_SLOTS {
                return Err(format!("the vCPU has {HARDWARE_SLOTS} hardware breakpoints, all in use"));
            }
            self.hardware.push(addr);
            self.hardware_changed = true;
        }
        Ok(())
    }

    /// No hardware breakpoint at `addr` any more; false if there was none.
    pub fn remove_hardware(&mut self, addr: u64) -> bool {
        let before = self.hardware.len();
        self.hardware.retain(|&a| a != addr);
        self.hardware_changed |= self.hardware.len() != before;
        self.hardware.len() != before
    }

    /// Whether `rip` is one of the kernel breakpoints, its `int3` in place.
    pub fn kernel_breakpoint_at(&self, ram: &GuestRam, rip: u64) -> bool {
        let Some(Some(gpa)) = self.kernel.get(&rip) else { return false };
        let mut byte = [0u8; 1];
        ram.read_bytes(*gpa, &mut byte).is_ok() && byte[0] == INT3
    }

    /// The next ring-0 debug exception on `cpu` is a step the debugger
    /// asked of the kernel (held at a kernel trap there).
    pub fn expect_kernel_step(&mut self, cpu: u32) {
        self.kernel_trap_steps.insert(cpu);
    }

    /// A trap of the kernel itself (`pid` 0) on `cpu`: the debugger's if
    /// it hit one of its kernel breakpoints or ends a step it asked there.
    fn claim_kernel(&mut self, cpu: u32, registers: &mut UserContext) -> Option<TrapKind> {
        match registers.vector {
            BREAKPOINT_VECTOR => {
                let at = registers.rip.checked_sub(1)?;
                self.kernel.get(&at).copied().flatten()?;
                registers.rip = at;
                Some(TrapKind::Breakpoint)
            }
            DEBUG_VECTOR if self.kernel_trap_steps.remove(&cpu) => {
                registers.rflags &= !RFLAGS_TF;
                Some(TrapKind::Step)
            }
            _ => None,
        }
    }

    /// Wants a breakpoint at `addr` in `program` and plants it in
    /// `processes` (pid, PML4: the live processes of that program); how many
    /// took it (0: none maps user code there yet).
    pub fn insert(
        &mut self,
        ram: &GuestRam,
        addr: u64,
        program: &str,
        processes: &[(u32, u64)],
    ) -> Result<usize, String> {
        if let Some(why) = refuse_address(addr) {
            return Err(why);
        }
        if let Some(other) = self.wanted.get(&addr).filter(|p| *p != program) {
            return Err(format!("{addr:#x} already has a breakpoint, in program {other}"));
        }
        self.wanted.insert(addr, program.to_string());
        Ok(processes.iter().filter(|&&(pid, pml4)| self.plant(ram, addr, pid, pml4)).count())
    }

    /// Plants every breakpoint wanted in `program` in its process `pid`
    /// (PML4 `pml4`), new and not yet run; how many went in.
    pub fn plant_in(&mut self, ram: &GuestRam, pid: u32, pml4: u64, program: &str) -> usize {
        let wanted: Vec<u64> = self.wanted.iter().filter(|(_, p)| *p == program).map(|(&a, _)| a).collect();
        wanted.into_iter().filter(|&addr| self.plant(ram, addr, pid, pml4)).count()
    }

    fn plant(&mut self, ram: &GuestRam, addr: u64, pid: u32, pml4: u64) -> bool {
        if self.planted.get(&addr).is_some_and(|places| places.iter().any(|&(p, _)| p == pid)) {
            return true;
        }
        let Some(phys) = code_byte(ram, pml4, addr) else { return false };
        match self.originals.get_mut(&phys) {
            Some((_, count)) => *count += 1,
            None => {
                let mut byte = [0u8; 1];
                if ram.read_bytes(phys, &mut byte).is_err() || ram.write_bytes(phys, &[INT3]).is_err() {
                    return false;
                }
                self.originals.insert(phys, (byte[0], 1));
            }
        }
        self.planted.entry(addr).or_default().push((pid, phys));
        true
    }

    /// No breakpoint at `addr` any more (`live`: the PML4 of each live
    /// process, by pid); false if there was none.
    pub fn remove(&mut self, ram: &GuestRam, addr: u64, live: &BTreeMap<u32, u64>) -> bool {
        if self.remove_kernel(ram, addr) {
            return true;
        }
        let wanted = self.wanted.remove(&addr).is_some();
        for (pid, phys) in self.planted.remove(&addr).unwrap_or_default() {
            let Some((original, count)) = self.originals.get_mut(&phys) else { continue };
            *count -= 1;
            if *count > 0 {
                continue;
            }
            let original = *original;
            self.originals.remove(&phys);
            let still_there = live.get(&pid).and_then(|&pml4| code_byte(ram, pml4, addr)) == Some(phys);
            let mut byte = [0u8; 1];
            if still_there && ram.read_bytes(phys, &mut byte).is_ok() && byte[0] == INT3 {
                let _ = ram.write_bytes(phys, &[original]);
            }
        }
        wanted
    }

    /// Takes every breakpoint out (the debugger is leaving).
    pub fn remove_all(&mut self, ram: &GuestRam, live: &BTreeMap<u32, u64>) {
        // Every planted breakpoint is a wanted one.
        let addrs: Vec<u64> = self.wanted.keys().chain(self.kernel.keys()).copied().collect();
        for addr in addrs {
            self.remove(ram, addr, live);
        }
    }

    /// `pid`'s next debug exception is a step the debugger set up.
    pub fn expect_step(&mut self, pid: u32) {
        self.steps.insert(pid);
    }

    /// Whether the debugger asked for the trap `pid` took with `registers`
    /// and, if so, the stop to report (its registers as it will resume:
    /// at a breakpoint, `rip` back on the `int3`; after a step, without the
    /// debugger's trap flag).
    pub fn claim(&mut self, pid: u32, cpu: u32, registers: &UserContext) -> Option<TrapStop> {
        if !self.attached {
            return None;
        }
        let mut registers = *registers;
        if pid == KERNEL_PID {
            let kind = self.claim_kernel(cpu, &mut registers)?;
            return Some(TrapStop { pid, cpu, kind, registers });
        }
        let kind = match registers.vector {
            BREAKPOINT_VECTOR => {
                let at = registers.rip.checked_sub(1)?;
                self.planted.get(&at)?.iter().any(|&(p, _)| p == pid).then_some(())?;
                registers.rip = at;
                TrapKind::Breakpoint
            }
            DEBUG_VECTOR if self.steps.remove(&pid) => {
                registers.rflags &= !RFLAGS_TF;
                TrapKind::Step
            }
            _ => return None,
        };
        Some(TrapStop { pid, cpu, kind, registers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use superos_protocol::layout::{KERNEL_HALF_START, USER_IMAGE_BASE};

    const PML4: u64 = 0x1000;
    const CODE: u64 = 0x8000;

    /// RAM with one address space mapping `USER_IMAGE_BASE` to `CODE`:
    /// user code (read-only, executable) or, with `writable`, data.
    fn ram_with_code(writable: bool) -> GuestRam {
        let ram = GuestRam::new(16).unwrap();
        let (pdpt, pd, pt) = (0x2000u64, 0x3000u64, 0x4000u64);
        let table = 0x7u64; // present, writable, user
        let va = USER_IMAGE_BASE;
        let index = |level: u32| (va >> (12 + 9 * level)) & 0x1ff;
        ram.write_bytes(PML4 + 8 * index(3), &(pdpt | table).to_le_bytes()).unwrap();
        ram.write_bytes(pdpt + 8 * index(2), &(pd | table).to_le_bytes()).unwrap();
        ram.write_bytes(pd + 8 * index(1), &(pt | table).to_le_bytes()).unwrap();
        let leaf = CODE | 0x5 | if writable { 0x2 } else { 0 };
        ram.write_bytes(pt + 8 * index(0), &leaf.to_le_bytes()).unwrap();
        ram.write_bytes(CODE, &[0x55, 0x48, 0x89, 0xe5]).unwrap();
        ram
    }

    fn byte(ram: &GuestRam, gpa: u64) -> u8 {
        let mut b = [0u8; 1];
        ram.read_bytes(gpa, &mut b).unwrap();
        b[0]
    }

    fn trap(vector: u64, rip: u64) -> UserContext {
        UserContext { vector, rip, rflags: 0x302, ..Default::default() }
    }

    #[test]
    fn a_breakpoint_patches_code_once_and_is_claimed_only_in_its_process() {
        let ram = ram_with_code(false);
        let mut debugger = Debugger::attach();
        // Two processes sharing the frame: one int3, counted twice.
        assert_eq!(debugger.insert(&ram, USER_IMAGE_BASE + 1, "p", &[(1, PML4), (2, PML4)]), Ok(2));
        assert_eq!(byte(&ram, CODE + 1), INT3);
        let stop = debugger.claim(1, 0, &trap(3, USER_IMAGE_BASE + 2)).expect("its breakpoint");
        assert_eq!((stop.kind, stop.registers.rip), (TrapKind::Breakpoint, USER_IMAGE_BASE + 1));
        // Another process's int3, or the program's own elsewhere: not the debugger's.
        assert_eq!(debugger.claim(3, 0, &trap(3, USER_IMAGE_BASE + 2)), None);
        assert_eq!(debugger.claim(1, 0, &trap(3, USER_IMAGE_BASE + 3)), None);
        let live = BTreeMap::from([(1, PML4), (2, PML4)]);
        assert!(debugger.remove(&ram, USER_IMAGE_BASE + 1, &live));
        assert_eq!(byte(&ram, CODE + 1), 0x48, "the original byte is back");
        assert_eq!(debugger.claim(1, 0, &trap(3, USER_IMAGE_BASE + 2)), None);
        assert!(!debugger.remove(&ram, USER_IMAGE_BASE + 1, &live));
    }

    #[test]
    fn data_pages_the_gate_and_the_kernel_half_take_no_breakpoint() {
        let ram = ram_with_code(true);
        let mut debugger = Debugger::attach();
        assert_eq!(debugger.insert(&ram, USER_IMAGE_BASE, "p", &[(1, PML4)]), Ok(0), "writable: not code");
        assert_eq!(byte(&ram, CODE), 0x55);
        assert!(debugger.insert(&ram, GATE_VA + 4, "p", &[(1, PML4)]).is_err());
        assert!(debugger.insert(&ram, KERNEL_HALF_START + 0x1000, "p", &[(1, PML4)]).is_err());
        assert!(debugger.insert(&ram, USER_HALF_END, "p", &[(1, PML4)]).is_err());
    }

    #[test]
    fn a_wanted_breakpoint_goes_into_processes_of_its_program_spawned_later() {
        let ram = ram_with_code(false);
        let mut debugger = Debugger::attach();
        assert_eq!(debugger.insert(&ram, USER_IMAGE_BASE, "p", &[]), Ok(0));
        assert_eq!(byte(&ram, CODE), 0x55, "nothing planted yet");
        assert_eq!(debugger.plant_in(&ram, 6, PML4, "q"), 0, "another program");
        assert_eq!(byte(&ram, CODE), 0x55);
        assert!(debugger.insert(&ram, USER_IMAGE_BASE, "q", &[]).is_err(), "one program per address");
        assert_eq!(debugger.plant_in(&ram, 7, PML4, "p"), 1);
        assert_eq!(byte(&ram, CODE), INT3);
        assert!(debugger.claim(7, 1, &trap(3, USER_IMAGE_BASE + 1)).is_some());
        debugger.remove_all(&ram, &BTreeMap::from([(7, PML4)]));
        assert_eq!(byte(&ram, CODE), 0x55);
    }

    #[test]
    fn a_frame_given_back_is_not_written_when_the_breakpoint_goes() {
        let ram = ram_with_code(false);
        let mut debugger = Debugger::attach();
        debugger.insert(&ram, USER_IMAGE_BASE, "p", &[(1, PML4)]).unwrap();
        // The process exited; its frame was scrubbed and is someone else's.
        ram.write_bytes(CODE, &[0]).unwrap();
        assert!(debugger.remove(&ram, USER_IMAGE_BASE, &BTreeMap::new()));
        assert_eq!(byte(&ram, CODE), 0, "not written");
        // Still mapped, but the int3 was overwritten: not written either.
        debugger.insert(&ram, USER_IMAGE_BASE, "p", &[(1, PML4)]).unwrap();
        ram.write_bytes(CODE, &[0x90]).unwrap();
        debugger.remove(&ram, USER_IMAGE_BASE, &BTreeMap::from([(1, PML4)]));
        assert_eq!(byte(&ram, CODE), 0x90);
    }

    #[test]
    fn only_a_step_the_debugger_set_up_is_claimed_and_its_flag_is_hidden() {
        let mut debugger = Debugger::attach();
        assert_eq!(debugger.claim(4, 0, &trap(1, 0x40_1000)), None, "the program's own trap flag");
        debugger.expect_step(4);
        let stop = debugger.claim(4, 0, &trap(1, 0x40_1000)).expect("the step");
        assert_eq!((stop.kind, stop.registers.rflags & RFLAGS_TF), (TrapKind::Step, 0));
        assert_eq!(debugger.claim(4, 0, &trap(1, 0x40_1003)), None, "one step per request");
        let mut detached = Debugger::default();
        detached.expect_step(4);
        assert_eq!(detached.claim(4, 0, &trap(1, 0x40_1000)), None, "no debugger attached");
    }

    #[test]
    fn a_step_the_debugger_left_behind_resumes_its_process_once() {
        let mut debugger = Debugger::attach();
        debugger.expect_step(4);
        debugger.kernel_step_armed = true;
        let mut left = debugger.succeeded(false);
        assert!(left.abandoned_kernel_step);
        assert_eq!(left.claim(4, 0, &trap(1, 0x40_1000)), None, "no debugger to report it to");
        assert!(!left.take_abandoned_step(4, 0, &trap(3, 0x40_1000)), "a breakpoint is not a step");
        assert!(left.take_abandoned_step(4, 0, &trap(1, 0x40_1000)));
        assert!(!left.take_abandoned_step(4, 0, &trap(1, 0x40_1003)), "once: then the program's own");
        // A debugger that attaches meanwhile does not claim it as its own.
        let mut debugger = Debugger::attach();
        debugger.expect_step(5);
        let mut next = debugger.succeeded(true);
        assert_eq!(next.claim(5, 0, &trap(1, 0x40_1000)), None);
        assert!(next.take_abandoned_step(5, 0, &trap(1, 0x40_1000)));
    }

    #[test]
    fn kernel_breakpoints_wait_for_the_kernel_are_claimed_on_any_cpu_and_come_out_whole() {
        let ram = GuestRam::new(16).unwrap();
        let text = 0x10_0000u64;
        ram.write_bytes(text, &[0x55, 0x48, 0x89, 0xe5]).unwrap();
        let (at, breakable) =
            (KERNEL_VMA_BASE + text + 1, KERNEL_VMA_BASE + text..KERNEL_VMA_BASE + text + 4);
        let mut debugger = Debugger::attach();
        // Outside the text past the debug path: refused.
        assert!(debugger.insert_kernel(&ram, KERNEL_VMA_BASE + text + 4, breakable.clone(), true).is_err());
        assert!(debugger.insert_kernel(&ram, USER_IMAGE_BASE, breakable.clone(), true).is_err());
        // Before the kernel is ready: wanted, not planted, not claimed.
        debugger.insert_kernel(&ram, at, breakable.clone(), false).unwrap();
        assert_eq!(byte(&ram, text + 1), 0x48);
        assert_eq!(debugger.claim(KERNEL_PID, 0, &trap(3, at + 1)), None);
        debugger.plant_kernel(&ram).unwrap();
        assert_eq!(byte(&ram, text + 1), INT3);
        assert_eq!(debugger.patches.lock().unwrap().get(&(text + 1)), Some(&0x48));
        // Hit on CPU 1: stopped on the int3's address.
        let stop = debugger.claim(KERNEL_PID, 1, &trap(3, at + 1)).expect("its breakpoint");
        assert_eq!((stop.kind, stop.cpu, stop.registers.rip), (TrapKind::Breakpoint, 1, at));
        // A process's int3 at that address is not the kernel's.
        assert_eq!(debugger.claim(7, 1, &trap(3, at + 1)), None);
        // A step asked of CPU 1's kernel: its debug exception there only.
        assert_eq!(debugger.claim(KERNEL_PID, 1, &trap(1, at + 2)), None, "not asked");
        debugger.expect_kernel_step(1);
        assert_eq!(debugger.claim(KERNEL_PID, 0, &trap(1, at + 2)), None, "another CPU");
        let step = debugger.claim(KERNEL_PID, 1, &trap(1, at + 2)).expect("the step");
        assert_eq!((step.kind, step.registers.rflags & RFLAGS_TF), (TrapKind::Step, 0));
        // Out: the byte is back and the checker's record forgets it.
        assert!(debugger.remove(&ram, at, &BTreeMap::new()));
        assert_eq!(byte(&ram, text + 1), 0x48);
        assert!(debugger.patches.lock().unwrap().is_empty());
        assert!(!debugger.remove(&ram, at, &BTreeMap::new()));
        // Left behind by a debugger that goes: restored by remove_all; a
        // step it asked resumes its CPU instead of panicking the kernel.
        debugger.insert_kernel(&ram, at, breakable, true).unwrap();
        debugger.expect_kernel_step(0);
        debugger.remove_all(&ram, &BTreeMap::new());
        assert_eq!(byte(&ram, text + 1), 0x48);
        let mut left = debugger.succeeded(false);
        assert!(left.take_abandoned_step(KERNEL_PID, 0, &trap(1, at + 2)));
        assert!(!left.take_abandoned_step(KERNEL_PID, 0, &trap(1, at + 2)));
    }

    #[test]
    fn hardware_breakpoints_take_kernel_addresses_four_at_most() {
        let mut debugger = Debugger::attach();
        assert!(debugger.insert_hardware(USER_IMAGE_BASE).is_err(), "every program shares user addresses");
        for i in 0..HARDWARE_SLOTS as u64 {
            debugger.insert_hardware(KERNEL_VMA_BASE + 0x10_0000 + i).unwrap();
        }
        debugger.insert_hardware(KERNEL_VMA_BASE + 0x10_0000).unwrap();
        assert_eq!(debugger.hardware.len(), HARDWARE_SLOTS, "the same address once");
        assert!(debugger.insert_hardware(KERNEL_VMA_BASE + 0x20_0000).unwrap_err().contains("all in use"));
        assert!(std::mem::take(&mut debugger.hardware_changed));
        assert!(debugger.remove_hardware(KERNEL_VMA_BASE + 0x10_0001));
        assert!(!debugger.remove_hardware(KERNEL_VMA_BASE + 0x10_0001));
        assert!(debugger.hardware_changed);
        // A debugger that leaves has its breakpoints switched off in KVM.
        debugger.hardware_changed = false;
        let left = debugger.succeeded(false);
        assert!(left.hardware.is_empty() && left.hardware_changed);
    }
}
