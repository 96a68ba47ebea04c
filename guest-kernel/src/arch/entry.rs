//! Assembly entry points: the kernel's `_start`, one stub per interrupt vector,
//! the `syscall` entry, the stub `CSTAR` and `SYSENTER_EIP` name (every use
//! of it kills the caller), and the common path that saves a
//! [`super::TrapFrame`], calls [`crate::kernel::trap_dispatch`] and resumes
//! whatever context the frame then holds with `iretq`.
//!
//! Each CPU has one kernel stack. Every entry from ring 3 starts on its
//! CPU's empty stack (TSS.RSP0 for interrupts and exceptions, an IST stack
//! for NMI, #DB, #MC and #DF, an explicit switch for `syscall` in the CPU's
//! own entry), so the kernel keeps no per-process kernel state on a stack:
//! switching processes means rewriting the frame before `iretq`. A CPU with
//! nothing to run resumes the idle context (`idle_loop` in ring 0, on the
//! top of its kernel stack, interrupts on), so an interrupt there builds the
//! same frame at the same place as one from ring 3. The common path resets RFLAGS before any Rust code runs, so
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

    // The way into the kernel and back: the start of its debug path, where
    // a debugger's breakpoint would trap again before it could be answered
    // (kernel.ld).
    .section .text.debug_path, "ax"
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

    .irp vector, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,32,48,49,255
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
    // One entry per CPU (each CPU's LSTAR names its own), each with its own
    // scratch slot and kernel stack: no register is free to find them.
    .irp cpu, 0,1,2,3,4,5,6,7
    .global syscall_entry_cpu\cpu
syscall_entry_cpu\cpu:
    mov [rip + syscall_user_rsp + 8 * \cpu], rsp
    mov rsp, [rip + cpu_kernel_stack_tops + 8 * \cpu]
    push {user_ss}
    push qword ptr [rip + syscall_user_rsp + 8 * \cpu]
    push r11
    push {user_cs}
    push rcx
    push 0
    push {syscall_vector}
    jmp trap_common
    .type syscall_entry_cpu\cpu, @function
    .size syscall_entry_cpu\cpu, . - syscall_entry_cpu\cpu
    .endr
    // CPU 0's entry under the name the CPU design gives it.
    .global syscall_entry
    .set syscall_entry, syscall_entry_cpu0

    // CSTAR (syscall from compatibility mode) and SYSENTER_EIP, per CPU.
    // Neither is a way into this kernel: compatibility mode has no code
    // segment, and SYSENTER_CS is zero. Should a CPU enter here anyway,
    // leave whatever stack it came on at once and report a foreign entry,
    // which kills the caller (rcx is the user RIP for syscall; the rest is
    // not kept).
    .irp cpu, 0,1,2,3,4,5,6,7
    .global foreign_entry_cpu\cpu
foreign_entry_cpu\cpu:
    mov rsp, [rip + cpu_kernel_stack_tops + 8 * \cpu]
    push {user_ss}
    push 0
    push 2
    push {user_cs}
    push rcx
    push 0
    push {foreign_vector}
    jmp trap_common
    .type foreign_entry_cpu\cpu, @function
    .size foreign_entry_cpu\cpu, . - foreign_entry_cpu\cpu
    .endr
    .global foreign_entry
    .set foreign_entry, foreign_entry_cpu0

    // What a CPU with nothing to run runs: a ring-0 context (entered with
    // iretq, interrupts on, on the top of its kernel stack) that halts until
    // an interrupt, which enters the kernel like one from ring 3.
    .global idle_loop
idle_loop:
    hlt
    jmp idle_loop
    .global idle_loop_end
idle_loop_end:
    .type idle_loop, @function
    .size idle_loop, . - idle_loop

    // lock_wait(): halts until an interrupt with interrupts on (the sti
    // shadow makes `sti; hlt` atomic: an interrupt already pending wakes
    // the hlt), then returns with them off again. What a CPU waiting for
    // the big kernel lock runs; an interrupt there only acknowledges
    // itself (and serves a flush request) before it returns here.
    .global lock_wait
lock_wait:
    sti
    hlt
    cli
    ret
    .global lock_wait_end
lock_wait_end:
    .type lock_wait, @function
    .size lock_wait, . - lock_wait

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

    // Each CPU's kernel stack top (CPU 0's in the image, the others' at
    // their windows of CPU_STACKS_VA), and its entries for the MSRs.
    .balign 8
    .global cpu_kernel_stack_tops
cpu_kernel_stack_tops:
    .quad __kernel_stack_top
    .irp cpu, 1,2,3,4,5,6,7
    .quad {stacks_va} + \cpu * {stacks_stride} + {guard} + {kernel_stack}
    .endr
    .global syscall_entry_table
syscall_entry_table:
    .irp cpu, 0,1,2,3,4,5,6,7
    .quad syscall_entry_cpu\cpu
    .endr
    .global foreign_entry_table
foreign_entry_table:
    .irp cpu, 0,1,2,3,4,5,6,7
    .quad foreign_entry_cpu\cpu
    .endr

    .section .data
    .balign 8
syscall_user_rsp:
    .fill 8, 8, 0
"#,
    kernel_main = sym crate::kernel::kernel_main,
    ap_main = sym crate::kernel::smp::ap_main,
    dispatch = sym crate::kernel::trap_dispatch,
    user_ss = const tables::USER_DATA_SELECTOR,
    user_cs = const tables::USER_CODE_SELECTOR,
    syscall_vector = const SYSCALL_VECTOR,
    foreign_vector = const superos_protocol::cpu::entry_vector::FOREIGN,
    stacks_va = const superos_protocol::cpu::CPU_STACKS_VA,
    stacks_stride = const superos_protocol::cpu::CPU_STACKS_STRIDE,
    guard = const superos_protocol::cpu::STACK_GUARD_BYTES,
    kernel_stack = const superos_protocol::cpu::KERNEL_STACK_BYTES,
);

const _: () = assert!(superos_protocol::cpu::MAX_CPUS == 8, "the .irp lists above name CPUs 0 to 7");

extern "C" {
    /// Addresses of the stubs for exception vectors 0..32.
    pub static trap_stub_table: [u64; 32];
    /// Stub for the timer vector.
    pub fn trap_stub_32();
    /// Stub for the TLB-flush IPI vector.
    pub fn trap_stub_48();
    /// Stub for the wake-up IPI vector.
    pub fn trap_stub_49();
    /// Each CPU's `syscall` entry (its LSTAR).
    pub static syscall_entry_table: [u64; 8];
    /// Each CPU's entry for CSTAR and SYSENTER_EIP (kills the caller).
    pub static foreign_entry_table: [u64; 8];
    /// The idle context's code, `[idle_loop, idle_loop_end)`.
    pub fn idle_loop();
    /// One past the idle loop.
    pub fn idle_loop_end();
    /// Halts until an interrupt, with interrupts on only for the halt.
    pub fn lock_wait();
    /// One past `lock_wait`.
    pub fn lock_wait_end();
    /// Stub for the spurious vector.
    pub fn trap_stub_255();
    /// Where an application processor starts.
    pub fn ap_start();
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
