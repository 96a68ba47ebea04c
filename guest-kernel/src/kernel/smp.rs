//! Several CPUs: the application processors' stacks and start, the big
//! kernel lock, which CPU has which address space live, and TLB shootdown
//! (`docs/SMP.md`).
//!
//! The bootstrap CPU starts them one at a time, after the gate self-test
//! (so each takes the final entry MSRs) and before `KernelReady`: it maps
//! the CPU's stacks in the kernel half (in the window
//! [`superos_protocol::cpu::CPU_STACKS_VA`] names, guard pages unmapped),
//! asks the VMM to start it in long mode at [`ap_start`] on its kernel
//! stack with the kernel's tables, and waits for it to come online. An AP
//! loads its own GDT and TSS (its stacks) and the shared IDT, turns on the
//! protection features and entry MSRs of `superos_protocol::cpu`, reports
//! itself online, starts its timer and enters the scheduler under the lock.
//!
//! **The big kernel lock.** Every entry into the kernel (from ring 3 or
//! from the idle context) takes [`BigLock`] before it touches kernel data
//! and releases it just before `iretq`; kernel data, the event ring and
//! the hypercall parameter blocks are only touched by its holder, which is
//! what makes [`crate::arch::KernelCell`]'s argument true with several
//! CPUs. There is no other lock, so there is no lock order. Two entries
//! take no lock: an NMI (it touches nothing) and the TLB-flush IPI (below).
//! A CPU waiting for the lock halts with interrupts on (`lock_wait`: on the
//! PVM host a spinning ring-0 CPU would burn a host core emulating its
//! loop, starving the holder); the holder wakes the waiters with the
//! wake-up IPI when it releases the lock. An interrupt that arrives there
//! only acknowledges itself and serves the flush mailbox, so the holder can
//! always finish a shootdown.
//!
//! **TLB shootdown.** [`LIVE_PML4`] holds the address space each CPU has
//! loaded (every CR3 write goes through [`switch_address_space`]). No PCID
//! and no global user pages: a CPU that does not have a space loaded
//! caches nothing of it. When the holder removes or reduces a mapping
//! ([`crate::address_space::Memory::flush`]), it flushes locally, then, for
//! every other CPU with that space live, raises its mailbox flag, sends it
//! the flush IPI and waits until the flag is down ([`shootdown`]). The
//! target reloads CR3 (dropping every non-global entry) before lowering it:
//! in the IPI handler (ring 3, or the idle context), or in its lock spin.
//! So when the call that changed the tables returns, no CPU holds a
//! translation made before the change, and frames are released only after
//! it (the address space flushes before it frees).

use super::{set_entry_msrs, Gate, Kernel};
use crate::address_space::Memory;
use crate::arch::entry::ap_start;
use crate::arch::{cpu, lapic, tables, KernelCell, FLUSH_VECTOR, WAKE_VECTOR};
use crate::paging::{self, PageSize, KERNEL_TABLE_FLAGS};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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

/// The CPU whose stacks hold `address` (a trap frame's): an application
/// processor's window of `CPU_STACKS_VA`, else CPU 0 (its stacks are in
/// the kernel image).
#[inline(always)]
pub fn cpu_of_stack(address: u64) -> u32 {
    let start = superos_protocol::cpu::CPU_STACKS_VA;
    let stride = superos_protocol::cpu::CPU_STACKS_STRIDE;
    match address.checked_sub(start).map(|offset| offset / stride) {
        Some(cpu) if cpu < u64::from(MAX_CPUS) => cpu as u32,
        _ => 0,
    }
}

/// No CPU holds the lock.
const NO_OWNER: u32 = u32::MAX;

/// A ticket lock: CPUs get it in the order they asked.
#[repr(C)]
pub struct BigLock {
    next: AtomicU32,
    serving: AtomicU32,
    owner: AtomicU32,
    /// CPUs halted waiting for the lock (a mask).
    waiters: AtomicU32,
}

/// The big kernel lock (unmangled: the VMM reads it, from the ELF's
/// symbol, to say who held it when a guest stopped).
#[no_mangle]
pub static BIG_LOCK: BigLock = BigLock {
    next: AtomicU32::new(0),
    serving: AtomicU32::new(0),
    owner: AtomicU32::new(NO_OWNER),
    waiters: AtomicU32::new(0),
};

impl BigLock {
    /// Takes the lock for `cpu`, serving `cpu`'s flush mailbox while it waits.
    pub fn lock(&self, cpu: u32) {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        if self.serving.load(Ordering::Acquire) != ticket {
            self.waiters.fetch_or(1 << cpu, Ordering::SeqCst);
            while self.serving.load(Ordering::Acquire) != ticket {
                serve_flush(cpu);
                // SAFETY: halts with interrupts on for one `hlt`; every
                // interrupt that can arrive there is handled without the
                // lock (`is_lock_wait_interrupt`).
                unsafe { crate::arch::entry::lock_wait() };
            }
            self.waiters.fetch_and(!(1 << cpu), Ordering::SeqCst);
        }
        self.owner.store(cpu, Ordering::Relaxed);
    }

    /// Releases the lock (its holder, before `iretq`) and wakes the CPUs
    /// waiting for it.
    pub fn unlock(&self) {
        let cpu = self.owner.swap(NO_OWNER, Ordering::Relaxed);
        self.serving.fetch_add(1, Ordering::SeqCst);
        let waiters = self.waiters.load(Ordering::SeqCst);
        if waiters != 0 {
            wake(cpu, waiters);
        }
    }

    /// The CPU holding the lock (the caller, for kernel code).
    pub fn owner(&self) -> u32 {
        match self.owner.load(Ordering::Relaxed) {
            NO_OWNER => 0,
            cpu => cpu,
        }
    }
}

/// The PML4 each CPU has loaded (0: none yet).
static LIVE_PML4: [AtomicU64; MAX_CPUS as usize] = [const { AtomicU64::new(0) }; MAX_CPUS as usize];
/// Each CPU's flush mailbox: raised by the lock holder, lowered by the CPU
/// once it has flushed.
static FLUSH_PENDING: [AtomicBool; MAX_CPUS as usize] = [const { AtomicBool::new(false) }; MAX_CPUS as usize];

/// Loads `pml4` on `cpu` (the caller) and records it.
///
/// # Safety
/// `pml4` must map the kernel half as every address space does.
pub unsafe fn switch_address_space(cpu: u32, pml4: u64) {
    LIVE_PML4[cpu as usize % MAX_CPUS as usize].store(pml4, Ordering::Release);
    // SAFETY: the caller's guarantee.
    unsafe { cpu::write_cr3(pml4) };
}

/// If `cpu`'s mailbox is raised: flushes its TLB (a CR3 reload drops every
/// non-global entry) and lowers it.
pub fn serve_flush(cpu: u32) {
    let pending = &FLUSH_PENDING[cpu as usize % MAX_CPUS as usize];
    if pending.load(Ordering::Acquire) {
        let cr3 = cpu::read_cr3();
        // SAFETY: reloads the live tables unchanged.
        unsafe { cpu::write_cr3(cr3) };
        pending.store(false, Ordering::Release);
    }
}

/// `DEBUG_SKIP_SHOOTDOWN`: no CPU is ever asked to flush.
static SKIP_SHOOTDOWN: AtomicBool = AtomicBool::new(false);

/// Sets `DEBUG_SKIP_SHOOTDOWN` (the bug the SMP tests must catch).
pub fn skip_shootdowns(skip: bool) {
    SKIP_SHOOTDOWN.store(skip, Ordering::Relaxed);
}

/// Called by the lock holder on `cpu` after it removed or reduced a mapping
/// of the space rooted at `pml4` (and flushed its own TLB): returns once
/// every other CPU with that space live has flushed.
pub fn shootdown(cpu: u32, pml4: u64) {
    if SKIP_SHOOTDOWN.load(Ordering::Relaxed) {
        return;
    }
    // The other CPUs online, lowest first (none: nothing to do, at the cost
    // of a test; the common case on one CPU and for most calls on several).
    let mut others = ONLINE.load(Ordering::Acquire) & !(1 << cpu);
    let mut targets = 0u32;
    while others != 0 {
        let other = others.trailing_zeros();
        others &= others - 1;
        if LIVE_PML4[other as usize].load(Ordering::Acquire) == pml4 {
            FLUSH_PENDING[other as usize].store(true, Ordering::Release);
            lapic::send_ipi(other, FLUSH_VECTOR);
            targets |= 1 << other;
        }
    }
    while targets != 0 {
        let mut waiting = targets;
        while waiting != 0 {
            let other = waiting.trailing_zeros();
            waiting &= waiting - 1;
            if !FLUSH_PENDING[other as usize].load(Ordering::Acquire) {
                targets &= !(1 << other);
            }
        }
        core::hint::spin_loop();
    }
}

/// Whether a CPU online other than `cpu` has `pml4` loaded.
pub fn loaded_elsewhere(cpu: u32, pml4: u64) -> bool {
    let mut others = ONLINE.load(Ordering::Acquire) & !(1 << cpu);
    while others != 0 {
        let other = others.trailing_zeros();
        others &= others - 1;
        if LIVE_PML4[other as usize].load(Ordering::Acquire) == pml4 {
            return true;
        }
    }
    false
}

/// Sends the wake-up IPI to every CPU in `cpus` (a mask) but `cpu`.
pub fn wake(cpu: u32, cpus: u32) {
    let mut targets = cpus & ONLINE.load(Ordering::Acquire) & !(1 << cpu);
    while targets != 0 {
        let other = targets.trailing_zeros();
        targets &= targets - 1;
        lapic::send_ipi(other, WAKE_VECTOR);
    }
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
    // Its CR3 is the kernel's tables (the VMM loaded the ones the
    // bootstrap CPU passed): recorded before it is reported online.
    LIVE_PML4[cpu as usize].store(cpu::read_cr3() & !0xfff, Ordering::Release);
    ONLINE.fetch_or(1 << cpu, Ordering::AcqRel);
    // Its local APIC on (and its timer) first: a CPU waiting for the lock
    // halts until the wake-up IPI, which a disabled APIC would not take.
    lapic::start_timer(crate::arch::TIMER_VECTOR, crate::arch::SPURIOUS_VECTOR);
    // The bootstrap CPU holds the lock until the scenario's processes
    // exist; then this CPU runs one of them or idles.
    BIG_LOCK.lock(cpu);
    let mut frame = crate::arch::TrapFrame::default();
    let kernel = super::kernel();
    kernel.cpu = cpu;
    kernel.enter_idle(&mut frame);
    kernel.reschedule(&mut frame, false);
    BIG_LOCK.unlock();
    // SAFETY: the frame is a ring-3 context (a restore stub of the process
    // this CPU claimed) or the idle context, both resumable from here.
    unsafe { crate::arch::entry::enter_user(&frame) }
}
