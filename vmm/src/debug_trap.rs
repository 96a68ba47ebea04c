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

use crate::inspect::{TrapKind, TrapStop};
use crate::memory::GuestRam;
use crate::walk;
use std::collections::{BTreeMap, BTreeSet};
use superos_protocol::introspect::UserContext;
use superos_protocol::layout::{GATE_VA, PAGE_SIZE, USER_HALF_END};

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
        Debugger {
            attached,
            abandoned_steps,
            abandoned_kernel_step: self.abandoned_kernel_step || self.kernel_step_armed,
            ..Debugger::default()
        }
    }

    /// Whether the trap `pid` took with `registers` is a step a debugger
    /// that left set up (once): the process then resumes as it is, trap
    /// flag clear.
    pub fn take_abandoned_step(&mut self, pid: u32, registers: &UserContext) -> bool {
        registers.vector == DEBUG_VECTOR && self.abandoned_steps.remove(&pid)
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
        let addrs: Vec<u64> = self.wanted.keys().copied().collect();
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
        assert!(!left.take_abandoned_step(4, &trap(3, 0x40_1000)), "a breakpoint is not a step");
        assert!(left.take_abandoned_step(4, &trap(1, 0x40_1000)));
        assert!(!left.take_abandoned_step(4, &trap(1, 0x40_1003)), "once: then the program's own");
        // A debugger that attaches meanwhile does not claim it as its own.
        let mut debugger = Debugger::attach();
        debugger.expect_step(5);
        let mut next = debugger.succeeded(true);
        assert_eq!(next.claim(5, 0, &trap(1, 0x40_1000)), None);
        assert!(next.take_abandoned_step(5, &trap(1, 0x40_1000)));
    }
}
