//! GDT, TSS and IDT, in the layout `superos_protocol::cpu` describes (and
//! the VMM checks): kernel CS 0x10, kernel DS 0x18, user DS 0x2b, user CS
//! 0x33, TSS 0x40, and nothing else ring 3 could load. Slot 0x20, which
//! `STAR` names for a 32-bit `sysret`, is a null descriptor: the kernel
//! returns with `iretq`, and a 32-bit user code segment would let ring 3
//! switch to compatibility mode.

use super::entry;
use super::{KernelCell, FLUSH_VECTOR, SPURIOUS_VECTOR, TIMER_VECTOR, WAKE_VECTOR};
use superos_protocol::cpu::{self as design, CpuStack, IST_SLOTS, MAX_CPUS};
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::{PrivilegeLevel, VirtAddr};

pub use design::{
    KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR, STAR_VALUE, TSS_SELECTOR, USER_CODE_SELECTOR,
    USER_DATA_SELECTOR,
};

/// Each CPU's TSS (its kernel and IST stacks) and GDT (whose TSS
/// descriptor names that TSS); the IDT is shared.
static TSS: [KernelCell<TaskStateSegment>; MAX_CPUS as usize] =
    [const { KernelCell::new(TaskStateSegment::new()) }; MAX_CPUS as usize];
static GDT: [KernelCell<GlobalDescriptorTable<{ design::GDT_SLOTS }>>; MAX_CPUS as usize] =
    [const { KernelCell::new(GlobalDescriptorTable::empty()) }; MAX_CPUS as usize];
static IDT: KernelCell<Option<InterruptDescriptorTable>> = KernelCell::new(None);

/// The top of CPU 0's IST stack for `vector`'s slot (linker-script symbols).
fn boot_ist_top(vector: u8) -> u64 {
    match vector {
        8 => core::ptr::addr_of!(entry::__ist_double_fault_top) as u64,
        2 => core::ptr::addr_of!(entry::__ist_nmi_top) as u64,
        1 => core::ptr::addr_of!(entry::__ist_debug_top) as u64,
        18 => core::ptr::addr_of!(entry::__ist_machine_check_top) as u64,
        _ => unreachable!("IST_SLOTS names only these vectors"),
    }
}

/// The IST index (0-based, as the x86_64 crate counts them) of `vector`.
fn ist_index(vector: u8) -> u16 {
    let slot = IST_SLOTS.iter().find(|s| s.vector == vector).expect("vector has an IST slot");
    u16::from(slot.slot) - 1
}

/// The top of `cpu`'s kernel stack: CPU 0's is in the kernel image, the
/// others' in their windows of [`design::CPU_STACKS_VA`].
pub fn kernel_stack_top(cpu: u32) -> u64 {
    match design::ap_stack(cpu, CpuStack::Kernel) {
        Some((_, top)) => top,
        None => core::ptr::addr_of!(entry::__kernel_stack_top) as u64,
    }
}

/// Fills `cpu`'s TSS and GDT and loads them (segment registers, TR, an
/// empty LDTR). The stacks of an application processor must be mapped.
fn load_cpu_tables(cpu: u32) {
    let index = cpu as usize;
    // SAFETY: each CPU fills its own TSS and GDT once, before loading them,
    // and nothing else touches them afterwards.
    let (tss, gdt) = unsafe { (TSS[index].get(), GDT[index].get()) };
    tss.privilege_stack_table[0] = VirtAddr::new(kernel_stack_top(cpu));
    for (i, slot) in IST_SLOTS.iter().enumerate() {
        let top = match design::ap_stack(cpu, CpuStack::Ist(i)) {
            Some((_, top)) => top,
            None => boot_ist_top(slot.vector),
        };
        tss.interrupt_stack_table[usize::from(ist_index(slot.vector))] = VirtAddr::new(top);
    }

    let null = Descriptor::UserSegment(0);
    gdt.append(null); // 0x08
    let code = gdt.append(Descriptor::kernel_code_segment()); // 0x10
    let data = gdt.append(Descriptor::kernel_data_segment()); // 0x18
    gdt.append(null); // 0x20: named by STAR, never a usable segment
    gdt.append(Descriptor::user_data_segment()); // 0x28
    gdt.append(Descriptor::user_code_segment()); // 0x30
    gdt.append(null); // 0x38
                      // SAFETY: the TSS is a static that lives for the whole run and is not
                      // moved; it is only modified above, before the descriptor is loaded.
    let tss_selector = gdt.append(unsafe { Descriptor::tss_segment_unchecked(TSS[index].as_ptr()) }); // 0x40
    debug_assert_eq!(code.0, KERNEL_CODE_SELECTOR);
    debug_assert_eq!(tss_selector.0, TSS_SELECTOR);

    // SAFETY: the GDT is a static, so the 'static borrow `load` needs holds
    // for as long as the CPU uses it; it is never modified again.
    unsafe { (*GDT[index].as_ptr()).load_unsafe() };
    // SAFETY: the selectors index the descriptors appended above; a null
    // LDT selector disables the LDT.
    unsafe {
        CS::set_reg(code);
        SS::set_reg(data);
        DS::set_reg(data);
        ES::set_reg(data);
        load_tss(tss_selector);
        // No LDT: whatever LDTR held at entry (KVM starts it as a present
        // segment at linear address 0), ring 3 must not find descriptors
        // through it.
        core::arch::asm!("lldt {0:x}", in(reg) 0u16, options(nostack, preserves_flags));
    }
}

/// Loads the bootstrap CPU's GDT and TSS and builds and loads the IDT.
/// Called once, early at boot.
pub fn init() {
    load_cpu_tables(0);
    // SAFETY: called once at boot before anything else uses the IDT cell.
    let idt = unsafe { IDT.get() };

    // Vectors 15, 22-27 and 31 are reserved by the architecture and never
    // raised; everything else gets its stub.
    let idt = idt.insert(InterruptDescriptorTable::new());
    // SAFETY: the assembler fills trap_stub_table with the stubs of entry.rs,
    // which save a TrapFrame and match each vector's error-code convention.
    let stubs = unsafe { &entry::trap_stub_table };
    // Covers every set_handler_addr call below.
    // SAFETY: each address is its vector's stub, a valid handler for kernel CS.
    unsafe {
        let addr = |v: usize| VirtAddr::new(stubs[v]);
        idt.divide_error.set_handler_addr(addr(0));
        idt.debug.set_handler_addr(addr(1)).set_stack_index(ist_index(1));
        idt.non_maskable_interrupt.set_handler_addr(addr(2)).set_stack_index(ist_index(2));
        // int3 is the system-call gate on PVM hosts: callable from ring 3.
        idt.breakpoint.set_handler_addr(addr(3)).set_privilege_level(PrivilegeLevel::Ring3);
        const _: () = assert!(design::USER_GATE_VECTOR == 3);
        idt.overflow.set_handler_addr(addr(4));
        idt.bound_range_exceeded.set_handler_addr(addr(5));
        idt.invalid_opcode.set_handler_addr(addr(6));
        idt.device_not_available.set_handler_addr(addr(7));
        idt.double_fault.set_handler_addr(addr(8)).set_stack_index(ist_index(8));
        idt.invalid_tss.set_handler_addr(addr(10));
        idt.segment_not_present.set_handler_addr(addr(11));
        idt.stack_segment_fault.set_handler_addr(addr(12));
        idt.general_protection_fault.set_handler_addr(addr(13));
        idt.page_fault.set_handler_addr(addr(14));
        idt.x87_floating_point.set_handler_addr(addr(16));
        idt.alignment_check.set_handler_addr(addr(17));
        idt.machine_check.set_handler_addr(addr(18)).set_stack_index(ist_index(18));
        idt.simd_floating_point.set_handler_addr(addr(19));
        idt.virtualization.set_handler_addr(addr(20));
        idt.cp_protection_exception.set_handler_addr(addr(21));
        idt.hv_injection_exception.set_handler_addr(addr(28));
        idt.vmm_communication_exception.set_handler_addr(addr(29));
        idt.security_exception.set_handler_addr(addr(30));
        idt[TIMER_VECTOR].set_handler_addr(VirtAddr::new(entry::trap_stub_32 as *const () as u64));
        idt[SPURIOUS_VECTOR].set_handler_addr(VirtAddr::new(entry::trap_stub_255 as *const () as u64));
        idt[FLUSH_VECTOR].set_handler_addr(VirtAddr::new(entry::trap_stub_48 as *const () as u64));
        idt[WAKE_VECTOR].set_handler_addr(VirtAddr::new(entry::trap_stub_49 as *const () as u64));
    }
    load_idt();
}

fn load_idt() {
    // SAFETY: the IDT lives in a static, built once by `init` on the
    // bootstrap CPU before any application processor starts, and is never
    // modified after.
    if let Some(idt) = unsafe { (*IDT.as_ptr()).as_ref() } {
        // SAFETY: as above: a 'static table that no longer changes.
        unsafe { idt.load_unsafe() };
    }
}

/// Loads application processor `cpu`'s GDT and TSS (its stacks must be
/// mapped) and the shared IDT.
pub fn init_application_processor(cpu: u32) {
    load_cpu_tables(cpu);
    load_idt();
}

/// Replaces the IDT with an empty one (debug: forces a triple fault on the
/// next exception).
pub fn load_empty_idt() {
    use x86_64::instructions::tables::{lidt, DescriptorTablePointer};
    let pointer = DescriptorTablePointer { limit: 0, base: VirtAddr::new(0) };
    // SAFETY: deliberately breaks exception delivery; only used by the
    // DEBUG_TRIPLE_FAULT boot flag, which expects the VM to shut down.
    unsafe { lidt(&pointer) };
}
