//! Creating the KVM virtual machine and its single vCPU.

use crate::arch::regs;
use crate::memory::GuestRam;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::path::Path;
use superos_protocol::boot::HostFlavor;
use thiserror::Error;

/// Where KVM may put the TSS it needs for real-mode emulation on Intel hosts
/// (three pages just below the 4 GiB boundary, far above guest RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors setting up the VM, named after the step that failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?): {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    SetMemory(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VCPU failed.
    #[error("KVM_CREATE_VCPU failed: {0}")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2 failed.
    #[error("setting the vCPU's CPUID failed: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
    /// Reading or writing vCPU registers failed.
    #[error("setting up vCPU registers failed: {0}")]
    Registers(#[source] kvm_ioctls::Error),
}

/// Which KVM this is: the PVM fork exposes `/sys/module/kvm_pvm`.
pub fn detect_host_flavor() -> HostFlavor {
    if Path::new("/sys/module/kvm_pvm").exists() {
        HostFlavor::Pvm
    } else {
        HostFlavor::Kvm
    }
}

/// A VM with guest RAM registered, an in-kernel irqchip and one vCPU.
pub struct Vm {
    /// Kept open for the VM's lifetime.
    _kvm: Kvm,
    /// Kept open for the VM's lifetime.
    _vm: VmFd,
    /// The vCPU.
    pub vcpu: VcpuFd,
}

impl Vm {
    /// Creates the VM over `ram`.
    pub fn new(ram: &GuestRam) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
        vm.set_tss_address(KVM_TSS_ADDRESS).map_err(VmError::SetTssAddress)?;
        // The irqchip (and with it the local APIC timer) must exist before
        // the vCPU is created.
        vm.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_address() as u64,
        };
        // SAFETY: the region is `ram`'s mapping, which outlives the VM (`run::run`
        // drops the `Vm` before the `GuestRam` it was created over).
        unsafe { vm.set_user_memory_region(region) }.map_err(VmError::SetMemory)?;
        let vcpu = vm.create_vcpu(0).map_err(VmError::CreateVcpu)?;
        // Without the host's CPUID some MSR writes (EFER.SCE) raise #GP.
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(VmError::Cpuid)?;
        vcpu.set_cpuid2(&cpuid).map_err(VmError::Cpuid)?;
        Ok(Vm { _kvm: kvm, _vm: vm, vcpu })
    }

    /// Sets the registers for direct long-mode entry at `entry`.
    pub fn setup_registers(&self, entry: u64, pml4: u64, boot_info_gpa: u64) -> Result<(), VmError> {
        let mut sregs = self.vcpu.get_sregs().map_err(VmError::Registers)?;
        regs::setup_long_mode(&mut sregs, pml4);
        self.vcpu.set_sregs(&sregs).map_err(VmError::Registers)?;
        self.vcpu.set_regs(&regs::entry_registers(entry, boot_info_gpa)).map_err(VmError::Registers)
    }

    /// The guest TSC frequency in kHz, or 0 if KVM does not say.
    pub fn tsc_khz(&self) -> u64 {
        self.vcpu.get_tsc_khz().map(u64::from).unwrap_or(0)
    }
}
