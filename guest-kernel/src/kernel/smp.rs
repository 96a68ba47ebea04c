//! Application processors (CPUs 1 and up): their stacks, their start, and
//! their state until the scheduler runs processes on them (issue 14, in
//! progress; `docs/SMP.md`).
//!
//! The bootstrap CPU starts them one at a time, after the gate self-test
//! (so each takes the final entry MSRs) and before `KernelReady`: it maps
//! the CPU's stacks in the kernel half (in the window
//! [`superos_protocol::cpu::CPU_STACKS_VA`] names, guard pages unmapped),
//! asks the VMM to start it in long mode at [`ap_start`] on its kernel
//! stack with the kernel's tables, and waits for it to come online. An AP
//! loads its own GDT and TSS (its stacks) and the shared IDT, turns on the
//! protection features and entry MSRs of `superos_protocol::cpu`, reports
//! itself online and halts with interrupts off: it touches no kernel data
//! and never runs ring 3 yet, so the single-CPU argument of
//! [`crate::arch::KernelCell`] still holds.

use super::{set_entry_msrs, Gate, Kernel};
use crate::address_space::Memory;
use crate::arch::entry::ap_start;
use crate::arch::{cpu, tables, KernelCell};
use crate::paging::{self, PageSize, KERNEL_TABLE_FLAGS};
use core::sync::atomic::{AtomicU32, Ordering};
use superos_protocol::cpu::{ap_stack, CpuStack, IST_SLOTS, MAX_CPUS};
use superos_protocol::hypercall::{self as hc, Hypercall};
use superos_protocol::layout::PAGE_SIZE;
use superos_protocol::ownership::FrameOwner;
use x86_64::structures::paging::PageTableFlags as Flags;

/// Bit `n` set once CPU `n` is online (CPU 0 from the start).
static ONLINE: AtomicU32 = AtomicU32::new(1);
/// The gate in force, for the entry MSRs of the CPUs being started: 0 for
/// `syscall`, 1 for `int3`.
static GATE: AtomicU32 = AtomicU32::new(0);

static CPU_START_PARAMS: KernelCell<hc::CpuStartParams> =
    KernelCell::new(hc::CpuStartParams { cpu: 0, status: 0, rip: 0, rsp: 0, pml4: 0 });

/// How long the bootstrap CPU waits for an AP to come online: one second
/// (by the TSC), or this many spins where its frequency is unknown.
const ONLINE_TIMEOUT_MS: u64 = 1000;
const ONLINE_TIMEOUT_SPINS: u64 = 100_000_000;

/// CPUs online.
pub fn online_count() -> u32 {
    ONLINE.load(Ordering::Acquire).count_ones()
}

impl Kernel {
    /// Starts every application processor the boot info asks for, one at a
    /// time, each online before the next. Returns the CPUs online.
    pub(super) fn start_application_processors(&mut self) -> u32 {
        let count = self.boot.cpu_count.clamp(1, MAX_CPUS);
        GATE.store(u32::from(self.gate == Gate::Int3), Ordering::Release);
        for cpu in 1..count {
            self.map_cpu_stacks(cpu);
            // SAFETY: KernelCell invariant (only the bootstrap CPU runs
            // kernel code that uses kernel data).
            let params = unsafe { CPU_START_PARAMS.get() };
            *params = hc::CpuStartParams {
                cpu,
                status: hc::STATUS_PENDING,
                rip: ap_start as *const () as u64,
                rsp: tables::kernel_stack_top(cpu),
                pml4: self.kernel_pml4,
            };
            super::hypercall_with(Hypercall::CpuStart, params);
            // SAFETY: the VMM wrote `status` during the hypercall; read it afresh.
            let status = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(params.status)) };
            if status != hc::STATUS_OK {
                panic!("the VMM did not start CPU {cpu} (status {status})");
            }
            self.wait_online(cpu);
        }
        online_count()
    }

    /// Maps CPU `cpu`'s kernel and IST stacks (fresh kernel frames) in the
    /// kernel half, leaving the guard page below each unmapped.
    fn map_cpu_stacks(&mut self, cpu: u32) {
        let stacks = core::iter::once(CpuStack::Kernel).chain((0..IST_SLOTS.len()).map(CpuStack::Ist));
        for stack in stacks {
            let Some((bottom, top)) = ap_stack(cpu, stack) else { continue };
            for va in (bottom..top).step_by(PAGE_SIZE as usize) {
                let frame = self
                    .memory
                    .alloc_frame(FrameOwner::Kernel)
                    .unwrap_or_else(|| panic!("out of memory for CPU {cpu}'s stacks"));
                let mut tables = super::KernelTables(&mut self.memory);
                let flags = Flags::WRITABLE | Flags::NO_EXECUTE;
                paging::map(
                    &mut tables,
                    self.kernel_pml4,
                    va,
                    frame,
                    PageSize::Size4K,
                    flags,
                    KERNEL_TABLE_FLAGS,
                )
                .unwrap_or_else(|e| panic!("mapping CPU {cpu}'s stack page {va:#x}: {e:?}"));
            }
        }
    }

    fn wait_online(&self, cpu: u32) {
        let khz = self.boot.tsc_khz;
        // SAFETY: rdtsc has no side effects.
        let start = unsafe { core::arch::x86_64::_rdtsc() };
        let mut spins = 0u64;
        while ONLINE.load(Ordering::Acquire) & (1 << cpu) == 0 {
            core::hint::spin_loop();
            spins += 1;
            // SAFETY: as above.
            let elapsed = unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(start);
            let late =
                elapsed.checked_div(khz).map_or(spins > ONLINE_TIMEOUT_SPINS, |ms| ms > ONLINE_TIMEOUT_MS);
            if late {
                panic!("CPU {cpu} did not come online within {ONLINE_TIMEOUT_MS} ms");
            }
        }
    }
}

/// Where an application processor starts (from [`ap_start`], on its own
/// kernel stack, with the kernel's tables and interrupts off).
#[no_mangle]
pub extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = cpu as u32;
    if cpu == 0 || cpu >= MAX_CPUS {
        cpu::halt_forever();
    }
    tables::init_application_processor(cpu);
    super::enable_protection_features();
    let gate = if GATE.load(Ordering::Acquire) == 0 { Gate::Syscall } else { Gate::Int3 };
    set_entry_msrs(gate, cpu);
    ONLINE.fetch_or(1 << cpu, Ordering::AcqRel);
    cpu::halt_forever()
}
