//! Initial vCPU state for entering the kernel directly in 64-bit long mode.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// CR0: protection, monitor coprocessor, extension type, numeric error,
/// write protect, paging.
pub const CR0_LONG_MODE: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: physical address extension.
pub const CR4_LONG_MODE: u64 = 1 << 5;
/// EFER: long mode enable, long mode active, no-execute enable.
pub const EFER_LONG_MODE: u64 = (1 << 8) | (1 << 10) | (1 << 11);
/// Boot code selector (the kernel's GDT uses the same one).
pub const BOOT_CODE_SELECTOR: u16 = 0x10;
/// Boot data selector.
pub const BOOT_DATA_SELECTOR: u16 = 0x18;

/// Puts `sregs` in 64-bit mode with paging rooted at `pml4`.
pub fn setup_long_mode(sregs: &mut kvm_sregs, pml4: u64) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: BOOT_CODE_SELECTOR,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment { selector: BOOT_DATA_SELECTOR, type_: 0x3, l: 0, db: 1, ..code };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    // No LDT: KVM's reset state is a present LDT at linear 0 with limit
    // 0xffff, which ring 3 could reach with a TI=1 selector until the
    // kernel loads a null LDTR itself.
    sregs.ldt = kvm_segment {
        selector: 0,
        base: 0,
        limit: 0,
        type_: 0x2,
        present: 0,
        s: 0,
        l: 0,
        g: 0,
        unusable: 1,
        ..code
    };
    sregs.cr0 = CR0_LONG_MODE;
    sregs.cr3 = pml4;
    sregs.cr4 = CR4_LONG_MODE;
    sregs.efer = EFER_LONG_MODE;
}

/// General registers at kernel entry: `rip` = entry, `rdi` = boot info.
pub fn entry_registers(entry: u64, boot_info_gpa: u64) -> kvm_regs {
    kvm_regs { rip: entry, rdi: boot_info_gpa, rflags: 0x2, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_state_is_consistent() {
        let mut sregs = kvm_sregs::default();
        setup_long_mode(&mut sregs, 0x9000);
        assert_eq!(sregs.cr3, 0x9000);
        assert_ne!(sregs.cr0 & (1 << 31), 0, "paging");
        assert_ne!(sregs.efer & (1 << 10), 0, "long mode active");
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.ss.l, 0);
        assert_eq!((sregs.ldt.selector, sregs.ldt.present, sregs.ldt.unusable), (0, 0, 1), "no LDT");
        let regs = entry_registers(0xffff_ffff_8010_0000, 0x1000);
        assert_eq!((regs.rip, regs.rdi, regs.rflags), (0xffff_ffff_8010_0000, 0x1000, 2));
    }
}
