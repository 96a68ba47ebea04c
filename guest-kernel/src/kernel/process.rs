//! Processes: creation from a boot spec, round-robin scheduling, blocking,
//! and termination (exit, fault, quota, deadlock) with full revocation of the
//! process's memory.

use super::memory::write_phys;
use super::smp;
use super::{Kernel, TrapFrame};
use crate::address_space::{AddressSpace, Memory, Quotas, Refusal};
use crate::arch::user_state::SegmentBases;
use crate::arch::{cpu, TIMER_VECTOR};
use crate::capability::CapTable;
use crate::elf_image::check_user_image;
use crate::fault::{Region, RegionKind};
use crate::shared::RegionBuild;
use alloc::collections::VecDeque;
use superos_protocol::boot::ARGS_LEN;
use superos_protocol::cpu::MAX_CPUS;
use superos_protocol::cpu::{initial_fxsave_image, FXSAVE_FCW, FXSAVE_MXCSR};
use superos_protocol::event::{Event, FaultKind, SpawnError};
use superos_protocol::introspect::NO_CPU;
use superos_protocol::layout::{PAGE_SIZE, USER_ARGS_MAX, USER_STACK_TOP};
use superos_protocol::syscall::{encode_result, SysError};
use x86_64::structures::paging::PageTableFlags as Flags;

/// A message waiting in a mailbox: its bytes are in a kernel frame owned
/// `Message(receiver)`.
#[derive(Clone, Copy, Debug)]
pub struct Message {
    /// Who sent it.
    pub sender: u32,
    /// Its length.
    pub len: u64,
    /// The frame holding its bytes.
    pub frame: u64,
}

/// What a process is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessState {
    /// Ready to run.
    Runnable,
    /// Waiting in `ipc_recv` for a message, into `buf` (at most `cap` bytes).
    Receiving {
        /// The receive buffer.
        buf: u64,
        /// Its capacity.
        cap: u64,
    },
}

/// One process.
pub struct Process {
    /// Its pid.
    pub pid: u32,
    /// Index of its boot spec.
    pub spec_index: usize,
    /// Its address space.
    pub space: AddressSpace,
    /// What it is doing.
    pub state: ProcessState,
    /// Saved user context while the process is not running.
    pub context: TrapFrame,
    /// Its FS and GS bases while it is not running (its FPU/SIMD registers
    /// and segment selectors are in its own save page: [`super::user_cpu`]).
    pub bases: SegmentBases,
    /// Times the timer took the CPU away from it.
    pub preemptions: u64,
    /// The CPU running it, or switching to or from it (`NO_CPU`: none).
    pub cpu: u32,
    /// Messages waiting for it, oldest first.
    pub mailbox: VecDeque<Message>,
    /// Its shared-memory capabilities.
    pub caps: CapTable,
    /// (virtual, resident, shared bytes, state, CPU) as last published for the VMM.
    pub published: (u64, u64, u64, u32, u32),
    /// A system call its work budget interrupted, resumed when the process
    /// enters the gate again with the same registers.
    pub resume: Option<Resume>,
    /// The region a sliced `shm_create` is building (its frames so far).
    pub building: Option<RegionBuild>,
    /// `run --trace`: the system call it entered and has not returned from.
    pub traced_syscall: Option<u64>,
}

/// Where an interrupted system call (`mem_unmap`, `mem_protect`) goes on:
/// the kernel rewound the caller to the gate stub, so that it enters again
/// with the same registers once it is scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// `rax` (the call), `rdi`, `rsi`, `rdx` of the call.
    pub call: [u64; 4],
    /// Where the next slice starts (an address, or a page index).
    pub at: u64,
    /// What the earlier slices did (pages freed), or what the call keeps
    /// between slices (`shm_map`: the mapping's address).
    pub done: u64,
}

/// How a process ended.
pub enum Termination {
    /// `exit(code)`.
    Exit(i64),
    /// Killed for a fault.
    Killed {
        /// Why.
        fault: FaultKind,
        /// Where.
        addr: u64,
    },
}

impl Kernel {
    /// Starts the next run of boot process `spec_index`, logging a spawn
    /// failure if it cannot be created.
    pub(super) fn start_run(&mut self, spec_index: usize) {
        self.runs_started[spec_index] += 1;
        if let Err(error) = self.spawn(spec_index) {
            self.emit(Event::SpawnFailed { spec_index: spec_index as u64, error: Some(error) });
        }
    }

    fn spawn(&mut self, spec_index: usize) -> Result<(), SpawnError> {
        let spec = &self.boot.processes()[spec_index];
        let program = self.boot.programs().get(spec.program as usize).ok_or(SpawnError::NoSuchProgram)?;
        let image_end = program.gpa.checked_add(program.len).ok_or(SpawnError::BadElf)?;
        if image_end > self.boot.mem_size {
            return Err(SpawnError::BadElf);
        }
        // The range was checked to lie inside guest RAM (direct-mapped).
        // SAFETY: program images are in a reserved region nothing writes.
        let image =
            unsafe { core::slice::from_raw_parts(super::direct::<u8>(program.gpa), program.len as usize) };
        let plan = check_user_image(image)?;
        if self.processes.len() >= super::introspect::PROCESS_CAPACITY {
            return Err(SpawnError::TooManyProcesses);
        }
        let pid = self.next_pid;
        let quotas = Quotas::from(spec.quota);
        let mut space = AddressSpace::new(&mut self.memory, pid, self.kernel_pml4, self.gate_frame, quotas)
            .ok_or(SpawnError::OutOfMemory)?;
        let loaded = load_image(&mut self.memory, &mut space, &plan, image).and_then(|()| {
            // The top stack page holds the argument bytes; the rest of the
            // stack is demand-zero.
            let top = space.map_private_page(
                &mut self.memory,
                USER_STACK_TOP - PAGE_SIZE,
                Flags::WRITABLE | Flags::NO_EXECUTE,
            )?;
            let len = (spec.args_len as usize).min(ARGS_LEN);
            write_phys(top + PAGE_SIZE - USER_ARGS_MAX, &spec.args[..len]);
            // The user state it starts with: FPU/SIMD exceptions masked,
            // nothing pending, every register zero (an `xsave` header of
            // zeros says every component is in its initial state), null
            // segment selectors.
            // The frame is zero (freed frames are scrubbed), so only the two
            // non-zero fields of the initial image need writing.
            let state = space.map_user_state_page(&mut self.memory)?;
            let image = initial_fxsave_image();
            write_phys(state + FXSAVE_FCW as u64, &image[FXSAVE_FCW..FXSAVE_FCW + 2]);
            write_phys(state + FXSAVE_MXCSR as u64, &image[FXSAVE_MXCSR..FXSAVE_MXCSR + 4]);
            Ok(len as u64)
        });
        let args_len = match loaded {
            Ok(len) => len,
            Err(refusal) => {
                space.destroy(&mut self.memory);
                return Err(match refusal {
                    Refusal::Quota { .. } => SpawnError::QuotaExceeded,
                    Refusal::Error(_) => SpawnError::OutOfMemory,
                });
            }
        };
        let args_va = USER_STACK_TOP - USER_ARGS_MAX;
        let mut context = TrapFrame::new_user(plan.entry, args_va & !0xf, true);
        context.rdi = args_va;
        context.rsi = args_len;
        self.next_pid += 1;
        self.spawned += 1;
        let pml4 = space.pml4();
        self.processes.push(Process {
            pid,
            spec_index,
            space,
            state: ProcessState::Runnable,
            context,
            bases: SegmentBases::default(),
            preemptions: 0,
            cpu: NO_CPU,
            mailbox: VecDeque::new(),
            caps: super::shm::new_cap_table(pid, self.boot_entropy),
            published: (0, 0, 0, 0, NO_CPU),
            resume: None,
            building: None,
            traced_syscall: None,
        });
        self.emit(Event::ProcessSpawned { pid, spec_index: spec_index as u64, pml4_gpa: pml4 });
        Ok(())
    }

    /// Kills the current process for `fault` at `addr`.
    pub(super) fn kill_current(&mut self, frame: &mut TrapFrame, fault: FaultKind, addr: u64) {
        self.terminate_current(frame, Termination::Killed { fault, addr });
    }

    /// Ends the current process and runs the next one.
    pub(super) fn terminate_current(&mut self, frame: &mut TrapFrame, how: Termination) {
        let Some(index) = self.current[self.cpu as usize].take() else {
            panic!("trap from ring 3 with no current process");
        };
        let event = {
            let process = &self.processes[index];
            match how {
                Termination::Exit(code) => {
                    Event::ProcessExited { pid: process.pid, code, preemptions: process.preemptions }
                }
                Termination::Killed { fault, addr } => {
                    super::introspect::publish_fault(process.pid, process.space.pml4(), addr, frame);
                    Event::ProcessKilled {
                        pid: process.pid,
                        fault: Some(fault),
                        addr,
                        rip: frame.rip,
                        error_code: frame.error_code,
                        vector: frame.vector,
                    }
                }
            }
        };
        self.remove_process(index, event);
        self.reschedule(frame, false);
    }

    /// Removes process `index` (not the live one): logs `event`, revokes all
    /// its memory, discards its messages, and starts the next run of its boot
    /// spec if it has runs left.
    fn remove_process(&mut self, index: usize, event: Event) {
        // Its regions go first, revoked from everyone (each step an event),
        // while it is still a consistent, live process.
        let pid = self.processes[index].pid;
        self.destroy_owned_regions(pid);
        // SAFETY: the kernel's tables map the kernel like every process's, and
        // the process being removed may be the one CR3 points at.
        unsafe { smp::switch_address_space(self.cpu, self.kernel_pml4) };
        let index = self.processes.iter().position(|p| p.pid == pid).expect("still listed");
        let process = self.processes.remove(index);
        for current in &mut self.current {
            match *current {
                Some(i) if i > index => *current = Some(i - 1),
                Some(i) if i == index => panic!("pid {pid} removed while a CPU runs it"),
                _ => {}
            }
        }
        self.resume_at = index;
        for message in process.mailbox {
            self.memory.release_dirty_prefix(message.frame, message.len);
        }
        if let Some(build) = process.building {
            self.shm.create_abort(&mut self.memory, build);
        }
        // Torn down a slice per kernel entry from now on (`KernelMemory::reap`).
        self.memory.bury(process.space);
        self.forget_participant(pid);
        self.emit(event);
        let spec = process.spec_index;
        let runs = self.boot.processes()[spec].runs.max(1);
        if self.runs_started[spec] < runs {
            self.start_run(spec);
        }
    }

    /// Round-robin: resumes the next runnable process after the current one
    /// (possibly the current one again) that no other CPU runs or is
    /// switching to or from; with none, the idle context while another CPU
    /// still runs a process, else (every process waits for a message nobody
    /// can send) the deadlock is resolved. `current_alive` says whether the
    /// context in `frame` belongs to a live current process and must be saved.
    pub(super) fn reschedule(&mut self, frame: &mut TrapFrame, current_alive: bool) {
        loop {
            let count = self.processes.len();
            if count == 0 {
                self.finish();
            }
            let start = self.current().map_or(self.resume_at, |c| c + 1);
            let next = (0..count)
                .map(|offset| (start + offset) % count)
                .find(|&i| self.processes[i].state == ProcessState::Runnable && !self.claimed_elsewhere(i));
            let Some(next) = next else {
                if self.other_cpus_busy() {
                    self.go_idle(frame, current_alive);
                    return;
                }
                self.resolve_deadlock(frame, current_alive);
                continue;
            };
            if Some(next) == self.current() {
                let pml4 = self.processes[next].space.pml4();
                if cpu::read_cr3() & !0xfff != pml4 {
                    // SAFETY: a removal switched to the kernel's tables; every
                    // process PML4 shares the kernel half.
                    unsafe { smp::switch_address_space(self.cpu, pml4) };
                }
                return;
            }
            // The CPU state ring 3 can change (FPU/SIMD registers, segment
            // selectors and bases) goes with its process (`user_cpu`): the
            // current one's is saved, and whatever the CPU holds, saved or
            // dying with a killed process, is replaced by the next one's
            // before it runs.
            self.fresh_slice[self.cpu as usize] = true;
            if let (Some(current), true) = (self.current(), current_alive) {
                self.save_context(current, frame);
                let next_pid = self.processes[next].pid;
                self.save_user_state_then_run(frame, Some(next_pid));
            } else {
                self.restore_user_state_then_run(frame, next);
            }
            return;
        }
    }

    /// Keeps the context in `frame` as process `index`'s.
    fn save_context(&mut self, index: usize, frame: &TrapFrame) {
        let process = &mut self.processes[index];
        process.context = *frame;
        if frame.vector == u64::from(TIMER_VECTOR) {
            process.preemptions += 1;
        }
    }

    /// Nothing for this CPU to run: its current process (if alive) is saved
    /// first, then the CPU resumes the idle context.
    fn go_idle(&mut self, frame: &mut TrapFrame, current_alive: bool) {
        if let (Some(current), true) = (self.current(), current_alive) {
            self.save_context(current, frame);
            self.save_user_state_then_run(frame, None);
            return;
        }
        self.enter_idle(frame);
    }

    /// Makes `frame` the idle context: ring 0 at `idle_loop` on the top of
    /// this CPU's kernel stack with interrupts on, the kernel's own tables
    /// loaded (so it caches no process's translations).
    pub(super) fn enter_idle(&mut self, frame: &mut TrapFrame) {
        self.set_current(None);
        // SAFETY: the kernel's tables map the kernel half like every process's.
        unsafe { smp::switch_address_space(self.cpu, self.kernel_pml4) };
        self.idle |= 1 << self.cpu;
        *frame = TrapFrame {
            rip: crate::arch::entry::idle_loop as *const () as u64,
            cs: u64::from(crate::arch::tables::KERNEL_CODE_SELECTOR),
            rflags: 0x202,
            rsp: crate::arch::tables::kernel_stack_top(self.cpu),
            ss: u64::from(crate::arch::tables::KERNEL_DATA_SELECTOR),
            ..TrapFrame::default()
        };
    }

    /// Whether another CPU runs process `index` or is switching to or from it.
    pub(super) fn claimed_elsewhere(&self, index: usize) -> bool {
        let cpu = self.processes[index].cpu;
        cpu != NO_CPU && cpu != self.cpu
    }

    /// Whether process `index` is ready and no CPU runs it.
    pub(super) fn available(&self, index: usize) -> bool {
        let process = &self.processes[index];
        process.state == ProcessState::Runnable && process.cpu == NO_CPU
    }

    /// Whether another CPU runs a process or is in a switch.
    fn other_cpus_busy(&self) -> bool {
        (0..MAX_CPUS as usize)
            .filter(|&cpu| cpu != self.cpu as usize)
            .any(|cpu| self.current[cpu].is_some() || self.switch_step[cpu].is_some())
    }

    /// No process can run and some wait for messages that nobody can send:
    /// terminate every waiting process.
    fn resolve_deadlock(&mut self, frame: &mut TrapFrame, current_alive: bool) {
        if let (Some(current), true) = (self.current(), current_alive) {
            self.processes[current].context = *frame;
        }
        self.set_current(None);
        while let Some(index) = self.processes.iter().position(|p| p.state != ProcessState::Runnable) {
            let process = &self.processes[index];
            super::introspect::publish_fault(process.pid, process.space.pml4(), 0, &process.context);
            let event = Event::ProcessKilled {
                pid: process.pid,
                fault: Some(FaultKind::Deadlock),
                addr: 0,
                rip: process.context.rip,
                error_code: 0,
                vector: 0,
            };
            self.remove_process(index, event);
        }
    }

    /// Makes a blocked receiver runnable with `result` in its `rax`.
    pub(super) fn wake(&mut self, index: usize, result: Result<u64, SysError>) {
        let process = &mut self.processes[index];
        process.context.rax = encode_result(result);
        process.state = ProcessState::Runnable;
    }
}

/// Copies the image's segments into fresh private pages.
fn load_image<M: Memory>(
    memory: &mut M,
    space: &mut AddressSpace,
    plan: &crate::elf_image::LoadPlan,
    image: &[u8],
) -> Result<(), Refusal> {
    for segment in plan.segments() {
        let (kind, flags) = match (segment.rights.execute, segment.rights.write) {
            (true, _) => (RegionKind::Code, Flags::empty()),
            (false, true) => (RegionKind::Data, Flags::WRITABLE | Flags::NO_EXECUTE),
            (false, false) => (RegionKind::ReadOnlyData, Flags::NO_EXECUTE),
        };
        space.add_image_region(Region { start: segment.first_page(), end: segment.end_page(), kind })?;
        let file_start = segment.vaddr;
        let file_end = segment.vaddr + segment.file_len;
        for page in (segment.first_page()..segment.end_page()).step_by(PAGE_SIZE as usize) {
            let frame = space.map_private_page(memory, page, flags)?;
            let copy_start = file_start.max(page);
            let copy_end = file_end.min(page + PAGE_SIZE);
            if copy_start < copy_end {
                let source = (segment.file_offset + (copy_start - segment.vaddr)) as usize;
                write_phys(
                    frame + (copy_start - page),
                    &image[source..source + (copy_end - copy_start) as usize],
                );
            }
        }
    }
    Ok(())
}
