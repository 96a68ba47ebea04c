//! GDT, TSS and IDT, in the layout `superos_protocol::cpu` describes (and
//! the VMM checks): kernel CS 0x10, kernel DS 0x18, user DS 0x2b, user CS
//! 0x33, TSS 0x40, and nothing else ring 3 could load. Slot 0x20, which
//! `STAR` names for a 32-bit `sysret`, is a null descriptor: the kernel
//! returns with `iretq`, and a 32-bit user code segment would let ring 3
//! switch to compatibility mode.

use super::entry;
use super::{KernelCell, SPURIOUS_VECTOR, TIMER_VECTOR};
use superos_protocol::cpu::{self as design, IST_SLOTS};
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

static TSS: KernelCell<TaskStateSegment> = KernelCell::new(TaskStateSegment::new());
static GDT: KernelCell<GlobalDescriptorTable<{ design::GDT_SLOTS }>> =
    KernelCell::new(GlobalDescriptorTable::empty());
static IDT: KernelCell<Option<InterruptDescriptorTable>> = KernelCell::new(None);

/// The top of the IST stack for `vector`'s slot, and the slot (0-based, as
/// the x86_64 crate counts them).
fn ist_stack(vector: u8) -> (u16, u64) {
    let slot = IST_SLOTS.iter().find(|s| s.vector == vector).expect("vector has an IST slot");
    // The symbols are defined by the linker script; only their addresses are taken.
    let top = match vector {
        8 => core::ptr::addr_of!(entry::__ist_double_fault_top) as u64,
        2 => core::ptr::addr_of!(entry::__ist_nmi_top) as u64,
        1 => core::ptr::addr_of!(entry::__ist_debug_top) as u64,
        18 => core::ptr::addr_of!(entry::__ist_machine_check_top) as u64,
        _ => unreachable!("IST_SLOTS names only these vectors"),
    };
    (u16::from(slot.slot) - 1, top)
}

/// Loads the GDT, TSS and IDT. Called once, early at boot.
pub fn init() {
    // SAFETY: called once at boot before anything else uses these cells.
    let (tss, gdt, idt) = unsafe { (TSS.get(), GDT.get(), IDT.get()) };
    let stack_top = core::ptr::addr_of!(entry::__kernel_stack_top) as u64;
    tss.privilege_stack_table[0] = VirtAddr::new(stack_top);
    for slot in IST_SLOTS {
        let (index, top) = ist_stack(slot.vector);
        tss.interrupt_stack_table[usize::from(index)] = VirtAddr::new(top);
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
    let tss_selector = gdt.append(unsafe { Descriptor::tss_segment_unchecked(TSS.as_ptr()) }); // 0x40
    debug_assert_eq!(code.0, KERNEL_CODE_SELECTOR);
    debug_assert_eq!(tss_selector.0, TSS_SELECTOR);

    // SAFETY: the GDT is a static, so the 'static borrow `load` needs holds
    // for as long as the CPU uses it; it is never modified again.
    unsafe { (*GDT.as_ptr()).load_unsafe() };
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
        idt.debug.set_handler_addr(addr(1)).set_stack_index(ist_stack(1).0);
        idt.non_maskable_interrupt.set_handler_addr(addr(2)).set_stack_index(ist_stack(2).0);
        // int3 is the system-call gate on PVM hosts: callable from ring 3.
        idt.breakpoint.set_handler_addr(addr(3)).set_privilege_level(PrivilegeLevel::Ring3);
        const _: () = assert!(design::USER_GATE_VECTOR == 3);
        idt.overflow.set_handler_addr(addr(4));
        idt.bound_range_exceeded.set_handler_addr(addr(5));
        idt.invalid_opcode.set_handler_addr(addr(6));
        idt.device_not_available.set_handler_addr(addr(7));
        idt.double_fault.set_handler_addr(addr(8)).set_stack_index(ist_stack(8).0);
        idt.invalid_tss.set_handler_addr(addr(10));
        idt.segment_not_present.set_handler_addr(addr(11));
        idt.stack_segment_fault.set_handler_addr(addr(12));
        idt.general_protection_fault.set_handler_addr(addr(13));
        idt.page_fault.set_handler_addr(addr(14));
        idt.x87_floating_point.set_handler_addr(addr(16));
        idt.alignment_check.set_handler_addr(addr(17));
        idt.machine_check.set_handler_addr(addr(18)).set_stack_index(ist_stack(18).0);
        idt.simd_floating_point.set_handler_addr(addr(19));
        idt.virtualization.set_handler_addr(addr(20));
        idt.cp_protection_exception.set_handler_addr(addr(21));
        idt.hv_injection_exception.set_handler_addr(addr(28));
        idt.vmm_communication_exception.set_handler_addr(addr(29));
        idt.security_exception.set_handler_addr(addr(30));
        idt[TIMER_VECTOR].set_handler_addr(VirtAddr::new(entry::trap_stub_32 as *const () as u64));
        idt[SPURIOUS_VECTOR].set_handler_addr(VirtAddr::new(entry::trap_stub_255 as *const () as u64));
    }
    // SAFETY: the IDT lives in a static and is never modified after loading.
    unsafe { idt.load_unsafe() };
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
