//! The local APIC timer that drives preemption.

use superos_protocol::layout::LAPIC_VA;

const SPURIOUS: u64 = 0xf0;
const EOI: u64 = 0xb0;
const LVT_TIMER: u64 = 0x320;
const TIMER_INITIAL: u64 = 0x380;
const TIMER_DIVIDE: u64 = 0x3e0;
const LVT_PERIODIC: u32 = 1 << 17;
const APIC_ENABLE: u32 = 1 << 8;
/// Divide configuration value for "divide by 1".
const DIVIDE_BY_1: u32 = 0xb;

/// Timer period in APIC bus cycles. KVM's in-kernel APIC counts at 1 GHz, so
/// this is a 10 ms time slice.
pub const TIMER_PERIOD: u32 = 10_000_000;

fn write(register: u64, value: u32) {
    // SAFETY: LAPIC_VA maps the local APIC uncached (kernel page tables, set up
    // before any caller); these offsets are architectural 32-bit registers.
    unsafe { core::ptr::write_volatile((LAPIC_VA + register) as *mut u32, value) };
}

/// Enables the APIC and starts the periodic timer on `vector`.
pub fn start_timer(vector: u8, spurious_vector: u8) {
    write(SPURIOUS, APIC_ENABLE | u32::from(spurious_vector));
    write(TIMER_DIVIDE, DIVIDE_BY_1);
    write(LVT_TIMER, u32::from(vector) | LVT_PERIODIC);
    write(TIMER_INITIAL, TIMER_PERIOD);
}

const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;

/// ICR level bit: "assert", which every delivery mode but INIT de-assert
/// must set.
const ICR_ASSERT: u32 = 1 << 14;

/// Sends interrupt `vector` to the CPU whose APIC ID is `apic_id` (fixed
/// delivery, edge, physical destination; the VMM gives vCPU `n` APIC ID `n`).
pub fn send_ipi(apic_id: u32, vector: u8) {
    write(ICR_HIGH, apic_id << 24);
    write(ICR_LOW, ICR_ASSERT | u32::from(vector));
}

/// Signals the end of the current interrupt.
pub fn end_of_interrupt() {
    write(EOI, 0);
}
