//! Private user CPU state: what ring 3 can change without a system call and
//! the trap frame does not hold goes with its process at every switch:
//! the x87, MMX, SSE and AVX registers (with the x87 control/status words
//! and MXCSR), the DS, ES, FS and GS selectors, and the FS and GS bases.
//!
//! Ring 0 cannot move most of it on the PVM host: its instruction emulator
//! has no `xsave`, ring 3 there runs natively with the host's XCR0 (AVX on,
//! whatever the guest sets, so `fxsave` would leave the upper halves of the
//! YMM registers behind), and ring 3's segment selectors live in the
//! hardware registers the emulated ring 0 never touches. So the registers
//! are moved in ring 3, by two stubs in the kernel-owned gate page, in the
//! process's own address space and to its own save page
//! ([`USER_STATE_VA`]): a switch from A to B runs A's save stub (`xsave64
//! [rdi]`, stores of DS/ES/FS/GS, then the gate's entry instruction back
//! into the kernel), switches to B's address space, runs B's restore stub
//! (`xrstor64 [rdi]`, loads of the selectors, back into the kernel), loads
//! B's FS and GS bases (after the selectors, which reload them) and only
//! then resumes B. The stubs run with interrupts off and no single-stepping,
//! so no process code runs in between; they are recognised only at their
//! exact return address while the kernel expects them (a process calling
//! into them itself is an illegal gate entry). The same mechanism runs on
//! every host, so a program behaves the same on each.
//!
//! A save page holds only its own process's state. A process that corrupts
//! it is killed when its restore stub faults (harm to itself alone); the
//! next process's restore replaces whatever the faulting one left behind.

use super::{smp, Kernel, TrapFrame};
use crate::arch::user_state::SegmentBases;
use superos_protocol::cpu::XSAVE_REQUEST;
use superos_protocol::layout::{
    GATE_RESTORE_STUB_OFFSET, GATE_SAVE_STUB_OFFSET, GATE_VA, USER_STATE_SELECTORS_OFFSET, USER_STATE_VA,
};

/// Which stub is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The current process's save stub; then the process `to` (a pid) is
    /// restored, or (`None`) the CPU goes idle.
    Saving {
        /// The process to run next.
        to: Option<u32>,
    },
    /// The current process's restore stub; then its context is resumed.
    Restoring,
}

impl Step {
    fn offset(self) -> u64 {
        match self {
            Step::Saving { .. } => GATE_SAVE_STUB_OFFSET,
            Step::Restoring => GATE_RESTORE_STUB_OFFSET,
        }
    }
}

/// Longest stub: `xsave64`, `fxsave64` (4 bytes each), four 6-byte
/// selector moves, a 2-byte entry instruction.
const STUB_MAX: usize = 4 + 4 + 4 * 6 + 2;

/// A stub's bytes (the rest of the gate page is `int3`).
pub struct Stub {
    /// Where it starts in the gate page.
    pub offset: u64,
    bytes: [u8; STUB_MAX],
    len: usize,
}

impl Stub {
    /// Its code.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The two stubs, for a gate whose entry instruction is `entry` and a CPU
/// with or without XSAVE.
///
/// The save stub is `xsave64 [rdi]` (every component XCR0 enables, AVX
/// and up included), then `fxsave64 [rdi]`, then stores of DS, ES, FS, GS;
/// the restore stub `xrstor64 [rdi]`, `fxrstor64 [rdi]`, loads of the
/// selectors. The x87/SSE state (MXCSR included) is moved by `fxsave`/
/// `fxrstor` whatever XCR0 says, so it stays private even where a
/// hypervisor does not honour the kernel's XCR0 (nested KVM under QEMU's
/// TCG drops the guest's `xsetbv`: ring 3 runs with XCR0 = x87 there). The
/// two share the legacy area of the image; `fxrstor` leaves the upper
/// halves of the YMM registers to `xrstor`. Without XSAVE only the `fx`
/// forms are used.
pub fn stubs(entry: &[u8], xsave: bool) -> [Stub; 2] {
    // REX.W 0f ae /r [rdi]: /4 xsave, /5 xrstor, /0 fxsave, /1 fxrstor.
    const XSAVE: [u8; 4] = [0x48, 0x0f, 0xae, 0x27];
    const XRSTOR: [u8; 4] = [0x48, 0x0f, 0xae, 0x2f];
    const FXSAVE: [u8; 4] = [0x48, 0x0f, 0xae, 0x07];
    const FXRSTOR: [u8; 4] = [0x48, 0x0f, 0xae, 0x0f];
    // mov [rdi + disp32], sreg is 8c /r; mov sreg, [rdi + disp32] is 8e /r;
    // ModRM 10 sreg 111 for es 0, ds 3, fs 4, gs 5.
    let selectors = |opcode: u8| {
        let mut bytes = [0u8; 24];
        for (i, sreg) in [3u8, 0, 4, 5].into_iter().enumerate() {
            let disp = (USER_STATE_SELECTORS_OFFSET as u32 + 2 * i as u32).to_le_bytes();
            bytes[i * 6..i * 6 + 6].copy_from_slice(&[
                opcode,
                0x87 | (sreg << 3),
                disp[0],
                disp[1],
                disp[2],
                disp[3],
            ]);
        }
        bytes
    };
    let stub = |offset: u64, moves: &[&[u8; 4]], selector_opcode: u8| {
        let mut stub = Stub { offset, bytes: [0xcc; STUB_MAX], len: 0 };
        let mut push = |part: &[u8]| {
            stub.bytes[stub.len..stub.len + part.len()].copy_from_slice(part);
            stub.len += part.len();
        };
        for part in moves {
            push(&part[..]);
        }
        push(&selectors(selector_opcode));
        push(entry);
        stub
    };
    let (save, restore): (&[&[u8; 4]], &[&[u8; 4]]) =
        if xsave { (&[&XSAVE, &FXSAVE], &[&XRSTOR, &FXRSTOR]) } else { (&[&FXSAVE], &[&FXRSTOR]) };
    [stub(GATE_SAVE_STUB_OFFSET, save, 0x8c), stub(GATE_RESTORE_STUB_OFFSET, restore, 0x8e)]
}

impl Kernel {
    /// True if `frame` is stub `step` coming back through the gate.
    pub(super) fn is_switch_stub_return(&self, frame: &TrapFrame, step: Step) -> bool {
        let [save, restore] = self.switch_returns;
        let expected = match step {
            Step::Saving { .. } => save,
            Step::Restoring => restore,
        };
        frame.vector == self.gate.vector() && frame.rip == expected
    }

    /// A ring-3 context that runs stub `step` on the current address space's
    /// save page: interrupts off, no trap flag, no register of anyone else's.
    fn switch_stub_frame(step: Step) -> TrapFrame {
        let mut frame = TrapFrame::new_user(GATE_VA + step.offset(), 0, false);
        frame.rdi = USER_STATE_VA;
        frame.rax = XSAVE_REQUEST & 0xffff_ffff;
        frame.rdx = XSAVE_REQUEST >> 32;
        frame
    }

    /// Starts the switch away from the current process, whose context is
    /// already saved: its FS and GS bases now, its registers by its save stub.
    pub(super) fn save_user_state_then_run(&mut self, frame: &mut TrapFrame, next_pid: Option<u32>) {
        if let Some(index) = self.current() {
            self.processes[index].bases = SegmentBases::save();
        }
        // The next process is this CPU's from now on: no other may take it.
        let cpu = self.cpu;
        if let Some(next) = next_pid.and_then(|pid| self.processes.iter_mut().find(|p| p.pid == pid)) {
            next.cpu = cpu;
        }
        let step = Step::Saving { to: next_pid };
        self.switch_step[cpu as usize] = Some(step);
        *frame = Self::switch_stub_frame(step);
    }

    /// Makes process `index` current (its address space) and runs its
    /// restore stub; its context is resumed when the stub is back.
    pub(super) fn restore_user_state_then_run(&mut self, frame: &mut TrapFrame, index: usize) {
        // SAFETY: every process PML4 shares the kernel half.
        unsafe { smp::switch_address_space(self.cpu, self.processes[index].space.pml4()) };
        self.set_current(Some(index));
        self.idle &= !(1 << self.cpu);
        self.switch_step[self.cpu as usize] = Some(Step::Restoring);
        *frame = Self::switch_stub_frame(Step::Restoring);
    }

    /// A stub came back: take the switch one step further.
    pub(super) fn continue_switch(&mut self, frame: &mut TrapFrame, step: Step) {
        match step {
            Step::Saving { to: None } => {
                // Its state is saved: it may run anywhere now. Something may
                // have become ready while the stub ran (a message for a
                // process this CPU let go of): look again before idling.
                self.set_current(None);
                self.reschedule(frame, false);
            }
            Step::Saving { to: Some(to) } => {
                // This CPU claimed `to` (no other runs it) and nothing
                // removes a runnable process it does not run, so it is
                // still there; were it not, the saved process itself would
                // simply run on.
                let next = self.processes.iter().position(|p| p.pid == to).or(self.current());
                match next {
                    Some(index) => self.restore_user_state_then_run(frame, index),
                    None => self.enter_idle(frame),
                }
            }
            Step::Restoring => {
                let Some(index) = self.current() else {
                    panic!("a restore stub came back with no current process");
                };
                let process = &self.processes[index];
                process.bases.restore();
                *frame = process.context;
            }
        }
    }
}
