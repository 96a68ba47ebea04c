//! Pure x86-64 knowledge the VMM needs: the boot page tables, the initial
//! register state for direct long-mode entry, and a page-table walker. Nothing
//! here talks to KVM.

pub mod paging;
pub mod regs;
