//! Assembly entry points: the kernel's `_start`, one stub per interrupt vector,
//! the `syscall` entry, the stub `CSTAR` and `SYSENTER_EIP` name (every use
//! of it kills the caller), and the common path that saves a
//! [`super::TrapFrame`], calls [`crate::kernel::trap_dispatch`] and resumes
//! whatever context the frame then holds with `iretq`.
//!
//! There is one kernel stack. Every entry from ring 3 starts on an empty stack
//! (TSS.RSP0 for interrupts and exceptions, an IST stack for NMI, #DB, #MC and
//! #DF, an explicit switch for `syscall`), so the kernel keeps no per-process
//! kernel state on a stack: switching processes means rewriting the frame
//! before `iretq`. The common path resets RFLAGS before any Rust code runs, so
//! flags a user left set (AC, which would lift SMAP; DF) never reach the kernel.

use super::{tables, SYSCALL_VECTOR};
use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    cli
    lea rsp, [rip + __kernel_stack_top]
    xor ebp, ebp
    // rdi = guest-physical address of the boot info, from the VMM.
    call {kernel_main}
    ud2
    .type _start, @function
    .size _start, . - _start

    // An application processor, started by the VMM in long mode on its own
    // kernel stack (rsp) with rdi = its CPU number.
    .global ap_start
ap_start:
    cli
    xor ebp, ebp
    call {ap_main}
    ud2
    .type ap_start, @function
    .size ap_start, . - ap_start

    .text
    .macro TRAP_NO_ERROR_CODE vector
    .global trap_stub_\vector
trap_stub_\vector:
    push 0
    push \vector
    jmp trap_common
    .endm

    .macro TRAP_WITH_ERROR_CODE vector
    .global trap_stub_\vector
trap_stub_\vector:
    push \vector
    jmp trap_common
    .endm

    .irp vector, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,32,255
    TRAP_NO_ERROR_CODE \vector
    .endr
    .irp vector, 8,10,11,12,13,14,17,21,29,30
    TRAP_WITH_ERROR_CODE \vector
    .endr

trap_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    // Known flags for the kernel: IF, DF, AC, TF, NT and IOPL clear.
    push 2
    popfq
    mov rdi, rsp
    call {dispatch}
trap_exit:
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    .global trap_iretq
trap_iretq:
    iretq

    // syscall: rcx = user rip, r11 = user rflags, rsp = user stack. Build the
    // same frame an interrupt from ring 3 would, then share the common path.
    .global syscall_entry
syscall_entry:
    mov [rip + syscall_user_rsp], rsp
    lea rsp, [rip + __kernel_stack_top]
    push {user_ss}
    push qword ptr [rip + syscall_user_rsp]
    push r11
    push {user_cs}
    push rcx
    push 0
    push {syscall_vector}
    jmp trap_common
    .type syscall_entry, @function
    .size syscall_entry, . - syscall_entry

    // CSTAR (syscall from compatibility mode) and SYSENTER_EIP. Neither is a
    // way into this kernel: compatibility mode has no code segment, and
    // SYSENTER_CS is zero. Should a CPU enter here anyway, leave whatever
    // stack it came on at once and report a foreign entry, which kills the
    // caller (rcx is the user RIP for syscall; the rest is not kept).
    .global foreign_entry
foreign_entry:
    lea rsp, [rip + __kernel_stack_top]
    push {user_ss}
    push 0
    push 2
    push {user_cs}
    push rcx
    push 0
    push {foreign_vector}
    jmp trap_common
    .type foreign_entry, @function
    .size foreign_entry, . - foreign_entry

    // enter_user(frame: *const TrapFrame) -> !: resume the context in `frame`.
    .global enter_user
enter_user:
    mov rsp, rdi
    jmp trap_exit

    .section .rodata
    .balign 8
    .global trap_stub_table
trap_stub_table:
    .irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad trap_stub_\vector
    .endr

    .section .data
    .balign 8
syscall_user_rsp:
    .quad 0
"#,
    kernel_main = sym crate::kernel::kernel_main,
    ap_main = sym crate::kernel::smp::ap_main,
    dispatch = sym crate::kernel::trap_dispatch,
    user_ss = const tables::USER_DATA_SELECTOR,
    user_cs = const tables::USER_CODE_SELECTOR,
    syscall_vector = const SYSCALL_VECTOR,
    foreign_vector = const superos_protocol::cpu::entry_vector::FOREIGN,
);

extern "C" {
    /// Addresses of the stubs for exception vectors 0..32.
    pub static trap_stub_table: [u64; 32];
    /// Stub for the timer vector.
    pub fn trap_stub_32();
    /// Stub for the spurious vector.
    pub fn trap_stub_255();
    /// Where an application processor starts.
    pub fn ap_start();
    /// The `syscall` entry point (LSTAR).
    pub fn syscall_entry();
    /// The entry `CSTAR` and `SYSENTER_EIP` name: kills the caller.
    pub fn foreign_entry();
    /// The `iretq` that resumes every ring-3 context (a fault here means
    /// the context could not be resumed).
    pub fn trap_iretq();
    /// Resumes the ring-3 context stored at `frame`; never returns.
    pub fn enter_user(frame: *const super::TrapFrame) -> !;
    /// Top of the kernel stack (linker script).
    pub static __kernel_stack_top: u8;
    /// Top of the double-fault IST stack (linker script).
    pub static __ist_double_fault_top: u8;
    /// Top of the NMI IST stack (linker script).
    pub static __ist_nmi_top: u8;
    /// Top of the debug-exception IST stack (linker script).
    pub static __ist_debug_top: u8;
    /// Top of the machine-check IST stack (linker script).
    pub static __ist_machine_check_top: u8;
}
