//! Creating the KVM virtual machine and its single vCPU.

use crate::arch::regs;
use crate::cpu::CpuFeatures;
use crate::memory::GuestRam;
use crate::write_log::KvmWriteLog;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use std::path::Path;
use std::sync::Arc;
use superos_protocol::boot::HostFlavor;
use superos_protocol::layout::PAGE_SIZE;
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

/// The hardware virtualisation an ordinary KVM uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Virtualization {
    /// AMD-V (`svm`, `kvm_amd`).
    Svm,
    /// Intel VT-x (`vmx`, `kvm_intel`).
    Vmx,
}

/// The host, precisely: PVM, or ordinary KVM with SVM or VMX and whether
/// it uses nested paging (NPT or EPT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostKind {
    /// PVM or ordinary KVM.
    pub flavor: HostFlavor,
    /// Ordinary KVM: SVM or VMX (`None`: neither module loaded and neither
    /// CPU flag present).
    pub virtualization: Option<Virtualization>,
    /// Ordinary KVM: `kvm_amd`'s `npt` or `kvm_intel`'s `ept` parameter
    /// (`None`: not readable).
    pub nested_paging: Option<bool>,
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.flavor == HostFlavor::Pvm {
            return f.write_str("PVM (kvm_pvm: ring-0 guest code emulated)");
        }
        let paging = |name: &str| match self.nested_paging {
            Some(true) => format!(", {name}"),
            Some(false) => format!(", no {name} (shadow paging)"),
            None => format!(", {name} unknown"),
        };
        match self.virtualization {
            Some(Virtualization::Svm) => write!(f, "KVM (AMD SVM{})", paging("NPT")),
            Some(Virtualization::Vmx) => write!(f, "KVM (Intel VMX{})", paging("EPT")),
            None => f.write_str("KVM (no svm or vmx CPU flag, no kvm_amd or kvm_intel module)"),
        }
    }
}

/// What this host is: `/sys/module/kvm_pvm`, the loaded `kvm_amd` or
/// `kvm_intel` module and its `npt` or `ept` parameter, and the CPU flags
/// of `/proc/cpuinfo`. See [`parse_host_kind`].
pub fn detect_host_kind() -> HostKind {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    parse_host_kind(
        detect_host_flavor() == HostFlavor::Pvm,
        &read("/proc/cpuinfo").unwrap_or_default(),
        Path::new("/sys/module/kvm_amd").exists().then(|| read("/sys/module/kvm_amd/parameters/npt")),
        Path::new("/sys/module/kvm_intel").exists().then(|| read("/sys/module/kvm_intel/parameters/ept")),
    )
}

/// The host from what [`detect_host_kind`] reads: `pvm` (`kvm_pvm`
/// exists), the text of `/proc/cpuinfo`, and for `kvm_amd` and `kvm_intel`
/// `None` if the module is not loaded, else its `npt` or `ept` parameter
/// (`Y`/`N`, `1`/`0`; `None` inside if unreadable). A loaded module names the
/// extension KVM uses; without one, the CPU flags (`svm`, `vmx`) do.
pub fn parse_host_kind(
    pvm: bool,
    cpuinfo: &str,
    kvm_amd_npt: Option<Option<String>>,
    kvm_intel_ept: Option<Option<String>>,
) -> HostKind {
    if pvm {
        return HostKind { flavor: HostFlavor::Pvm, virtualization: None, nested_paging: None };
    }
    let flag = |name: &str| {
        cpuinfo.lines().filter(|line| line.starts_with("flags")).any(|line| {
            line.split_once(':').is_some_and(|(_, flags)| flags.split_whitespace().any(|f| f == name))
        })
    };
    let parameter = |value: Option<String>| match value.as_deref().map(str::trim) {
        Some("Y" | "y" | "1") => Some(true),
        Some("N" | "n" | "0") => Some(false),
        _ => None,
    };
    let (virtualization, nested_paging) = match (kvm_amd_npt, kvm_intel_ept) {
        (Some(npt), _) => (Some(Virtualization::Svm), parameter(npt)),
        (None, Some(ept)) => (Some(Virtualization::Vmx), parameter(ept)),
        (None, None) if flag("svm") => (Some(Virtualization::Svm), None),
        (None, None) if flag("vmx") => (Some(Virtualization::Vmx), None),
        (None, None) => (None, None),
    };
    HostKind { flavor: HostFlavor::Kvm, virtualization, nested_paging }
}

/// A VM with guest RAM registered, an in-kernel irqchip and its vCPUs.
pub struct Vm {
    /// Kept open for the VM's lifetime.
    _kvm: Kvm,
    /// Kept open for the VM's lifetime (shared with a [`KvmWriteLog`]).
    vm: Arc<VmFd>,
    /// The memory slots registered: `(start, end, flags)`, slot = index.
    slots: Vec<(u64, u64, u32)>,
    /// Host address of guest-physical 0.
    host_address: u64,
    /// The bootstrap vCPU (CPU 0).
    pub vcpu: VcpuFd,
    /// The application processors' vCPUs (CPUs 1 and up), halted until
    /// the kernel starts them ([`crate::aps`]).
    pub aps: Vec<VcpuFd>,
    /// The guest-physical range registered read-only (`[start, end)`), if any.
    read_only: Option<(u64, u64)>,
    /// What the CPUID given to the vCPU says about the protection features.
    features: CpuFeatures,
}

impl Vm {
    /// Creates the VM over `ram`. `read_only` (page-aligned, inside `ram`)
    /// is registered as a read-only memory slot where KVM supports them
    /// (`KVM_CAP_READONLY_MEM`, which ordinary KVM and the PVM fork both
    /// have): the guest's writes there are dropped and reach the VMM as
    /// MMIO writes. The rest of RAM is ordinary read-write memory.
    ///
    /// `cpus` vCPUs (1 ..= [`superos_protocol::cpu::MAX_CPUS`]) are created,
    /// each with the host's CPUID and its own APIC ID (its index).
    pub fn new(ram: &GuestRam, read_only: Option<(u64, u64)>, cpus: u32) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
        vm.set_tss_address(KVM_TSS_ADDRESS).map_err(VmError::SetTssAddress)?;
        // The irqchip (and with it the local APIC timer) must exist before
        // the vCPU is created.
        vm.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let read_only = read_only.filter(|&(start, end)| {
            start < end
                && start % PAGE_SIZE == 0
                && end % PAGE_SIZE == 0
                && end <= ram.size()
                && vm.check_extension(Cap::ReadonlyMem)
        });
        let slots = memory_slots(ram.size(), read_only);
        let host_address = ram.host_address() as u64;
        for (slot, &(start, end, flags)) in slots.iter().enumerate() {
            register_slot(&vm, host_address, slot as u32, start, end, flags).map_err(VmError::SetMemory)?;
        }
        // Without the host's CPUID some MSR writes (EFER.SCE) raise #GP.
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(VmError::Cpuid)?;
        let mut vcpus = Vec::new();
        for index in 0..cpus.clamp(1, superos_protocol::cpu::MAX_CPUS) {
            let vcpu = vm.create_vcpu(u64::from(index)).map_err(VmError::CreateVcpu)?;
            let mut own = cpuid.clone();
            with_apic_id(own.as_mut_slice(), index);
            vcpu.set_cpuid2(&own).map_err(VmError::Cpuid)?;
            vcpus.push(vcpu);
        }
        let entries: Vec<_> =
            cpuid.as_slice().iter().map(|e| (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx)).collect();
        let features = CpuFeatures::from_entries(&entries);
        let vcpu = vcpus.remove(0);
        let aps = vcpus;
        Ok(Vm { _kvm: kvm, vm: Arc::new(vm), slots, host_address, vcpu, aps, read_only, features })
    }

    /// The write log of the read-write slots (with the VMM's own writes,
    /// see [`crate::write_log`]). KVM's dirty log is off until the log's
    /// first harvest turns it on: a run that never checks twice never pays
    /// for it (a logged page is write-protected again at every harvest, and
    /// its next write faults into KVM).
    pub fn write_log(&self) -> KvmWriteLog {
        let slots = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, &(_, _, flags))| flags & KVM_MEM_READONLY == 0)
            .map(|(slot, &(start, end, flags))| (slot as u32, start, end, flags))
            .collect();
        KvmWriteLog::new(self.vm.clone(), self.host_address, slots)
    }

    /// The range registered read-only, if one was.
    pub fn read_only(&self) -> Option<(u64, u64)> {
        self.read_only
    }

    /// The protection features the vCPU's CPUID has (what the kernel must
    /// turn on, and the XCR0 it must set).
    pub fn features(&self) -> CpuFeatures {
        self.features
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

/// Sets the APIC ID CPUID reports for vCPU `index` (leaf 1 EBX[31:24],
/// and leaf 0xb's x2APIC ID in EDX): the same as the LAPIC's, which KVM
/// gives each vCPU from its index.
fn with_apic_id(entries: &mut [kvm_bindings::kvm_cpuid_entry2], index: u32) {
    for entry in entries {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => entry.edx = index,
            _ => {}
        }
    }
}

/// Registers (or re-registers, with new flags) memory slot `slot`:
/// guest-physical `start..end` at `host_address + start`.
pub(crate) fn register_slot(
    vm: &VmFd,
    host_address: u64,
    slot: u32,
    start: u64,
    end: u64,
    flags: u32,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: start,
        memory_size: end - start,
        userspace_addr: host_address + start,
    };
    // The mapping outlives the VM and every handle to its fd: `run::run` and
    // `bench::probe` drop the `Vm` and the checker holding a `KvmWriteLog`
    // (which re-registers the slots at its first harvest) before the RAM.
    // SAFETY: `host_address` is the start of the guest RAM mapping and
    // `start..end` lies inside it (`memory_slots` never leaves RAM).
    unsafe { vm.set_user_memory_region(region) }
}

/// The memory slots for `size` bytes of RAM with `read_only` protected:
/// `(start, end, flags)`, read-write below, read-only, read-write above
/// (empty ones left out).
pub fn memory_slots(size: u64, read_only: Option<(u64, u64)>) -> Vec<(u64, u64, u32)> {
    let Some((start, end)) = read_only else { return vec![(0, size, 0)] };
    [(0, start, 0), (start, end, KVM_MEM_READONLY), (end, size, 0)]
        .into_iter()
        .filter(|&(s, e, _)| s < e)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_read_only_range() {
        assert_eq!(memory_slots(64 << 20, None), [(0, 64 << 20, 0)]);
        assert_eq!(
            memory_slots(64 << 20, Some((0x10_0000, 0x11_4000))),
            [(0, 0x10_0000, 0), (0x10_0000, 0x11_4000, KVM_MEM_READONLY), (0x11_4000, 64 << 20, 0)]
        );
        assert_eq!(memory_slots(0x20_0000, Some((0, 0x20_0000))), [(0, 0x20_0000, KVM_MEM_READONLY)]);
    }

    const AMD_CPUINFO: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\
        flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep syscall nx lm svm npt nrip_save\n\n";
    const INTEL_CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr vmx ept vpid smx est\n\n";
    /// A PVM machine's cpuinfo: a guest CPU, no virtualisation flag.
    const GUEST_CPUINFO: &str = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu vme hypervisor lm nx\n";

    fn some(value: &str) -> Option<Option<String>> {
        Some(Some(value.to_string()))
    }

    #[test]
    fn the_host_kind_is_parsed_from_fixed_texts() {
        let kvm = |virtualization, nested_paging| HostKind {
            flavor: HostFlavor::Kvm,
            virtualization,
            nested_paging,
        };
        let pvm = parse_host_kind(true, GUEST_CPUINFO, None, None);
        assert_eq!(pvm.flavor, HostFlavor::Pvm);
        assert_eq!(pvm.to_string(), "PVM (kvm_pvm: ring-0 guest code emulated)");
        // kvm_pvm wins even beside a loaded kvm_amd.
        assert_eq!(parse_host_kind(true, AMD_CPUINFO, some("Y\n"), None), pvm);

        let amd = parse_host_kind(false, AMD_CPUINFO, some("Y\n"), None);
        assert_eq!(amd, kvm(Some(Virtualization::Svm), Some(true)));
        assert_eq!(amd.to_string(), "KVM (AMD SVM, NPT)");
        let shadow = parse_host_kind(false, AMD_CPUINFO, some("0\n"), None);
        assert_eq!(shadow.to_string(), "KVM (AMD SVM, no NPT (shadow paging))");
        let intel = parse_host_kind(false, INTEL_CPUINFO, None, some("Y\n"));
        assert_eq!(intel.to_string(), "KVM (Intel VMX, EPT)");
        assert_eq!(parse_host_kind(false, INTEL_CPUINFO, None, some("N")).nested_paging, Some(false));
        // A module whose parameter cannot be read; no module at all (the
        // CPU flag names the extension); nothing.
        assert_eq!(
            parse_host_kind(false, AMD_CPUINFO, Some(None), None).to_string(),
            "KVM (AMD SVM, NPT unknown)"
        );
        assert_eq!(parse_host_kind(false, INTEL_CPUINFO, None, None), kvm(Some(Virtualization::Vmx), None));
        assert_eq!(parse_host_kind(false, AMD_CPUINFO, None, None), kvm(Some(Virtualization::Svm), None));
        assert_eq!(parse_host_kind(false, GUEST_CPUINFO, None, None), kvm(None, None));
        assert_eq!(parse_host_kind(false, "", None, Some(Some("garbage".into()))).nested_paging, None);
        // Flags are whole words: "svm_lock" or a model name is not svm.
        let lookalike = "model name\t: svm vmx\nflags\t\t: svm_lock vmx_x\n";
        assert_eq!(parse_host_kind(false, lookalike, None, None).virtualization, None);
    }
}
