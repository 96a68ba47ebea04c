//! Shared memory: regions, capability-gated grants, opt-in mappings and
//! immediate revocation (the contract's "Shared Memory Model"). Every step is
//! an explicit system call and a kernel event:
//!
//! 1. `shm_create` allocates the region's frames (owned `Shared(id)`, zeroed)
//!    and gives the creator a capability; nothing is mapped.
//! 2. `shm_grant` puts a capability with at most the granter's rights in
//!    another process's table; nothing is mapped.
//! 3. `shm_map` maps the region into the caller (owner included) at an
//!    address the kernel picks, with rights within the capability's.
//! 4. `mem_protect` may only reduce a mapping's rights; nothing resizes or
//!    moves a region.
//! 5. `shm_revoke`/`shm_destroy` (owner only) remove mappings and
//!    capabilities at once; the revoked range stays reserved so a later
//!    access faults as `use-after-revoke`. Frames are freed only at destroy,
//!    after every mapping is gone.
//!
//! TLB: the kernel runs on one CPU without PCIDs, so only the live address
//! space can hold cached translations; `Memory::flush` invalidates those
//! page by page, and every other address space's entries were flushed when
//! CR3 last changed.

use super::memory::write_phys;
use super::{Kernel, TrapFrame};
use crate::address_space::{Memory, Refusal};
use crate::capability::{CapTable, Capability, Rights};
use alloc::vec::Vec;
use superos_protocol::event::{Event, FaultKind};
use superos_protocol::layout::PAGE_SIZE;
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{
    CapInfo, SysError, CAPS_MAX, PROT_EXEC, PROT_READ, PROT_WRITE, SHM_MAX, SHM_PARTICIPANTS_MAX,
};
use zerocopy::IntoBytes;

/// A process holding a capability for a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Participant {
    /// Its pid.
    pub pid: u32,
    /// Its capability's rights.
    pub rights: Rights,
    /// Where it has the region mapped, and with which `PROT_*`.
    pub mapping: Option<(u64, u64)>,
}

/// A live shared region.
pub struct SharedRegion {
    /// Region id (`MEM_SHARE:<id>`).
    pub id: u32,
    /// The creating process.
    pub owner: u32,
    /// Its frames, in order.
    pub frames: Vec<u64>,
    /// Everyone holding a capability (the owner first).
    pub participants: Vec<Participant>,
}

impl SharedRegion {
    /// Length in bytes (regions are never empty).
    pub fn byte_len(&self) -> u64 {
        self.frames.len() as u64 * PAGE_SIZE
    }

    fn participant(&mut self, pid: u32) -> Option<&mut Participant> {
        self.participants.iter_mut().find(|p| p.pid == pid)
    }
}

/// A fresh capability table for a new process; the key scrambles handles so
/// that they mean nothing in another process.
pub fn new_cap_table(pid: u32, boot_entropy: u64) -> CapTable {
    let mixed = (u64::from(pid) ^ boot_entropy).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    CapTable::new(CAPS_MAX, (mixed >> 32) as u32 ^ mixed as u32)
}

/// What a shm call did, for the dispatcher.
pub enum ShmOutcome {
    /// Resume the caller with this result.
    Return(Result<u64, SysError>),
    /// The caller was terminated (quota policy `kill`).
    Killed,
}

impl Kernel {
    fn region_index(&self, id: u32) -> Option<usize> {
        self.regions.iter().position(|r| r.id == id)
    }

    /// The caller's capability for `handle`, with the region's index.
    fn capability(&self, index: usize, handle: u64) -> Result<(Capability, usize), SysError> {
        let capability = self.processes[index].caps.get(handle).ok_or(SysError::BadHandle)?;
        let region = self.region_index(capability.region).ok_or(SysError::BadHandle)?;
        Ok((capability, region))
    }

    /// Applies a shared-quota refusal: an error, or (policy `kill`) the
    /// caller's termination. Either way it is logged.
    fn shared_quota_refusal(&mut self, frame: &mut TrapFrame, index: usize, refusal: Refusal) -> ShmOutcome {
        match refusal {
            Refusal::Error(error) => ShmOutcome::Return(Err(error)),
            Refusal::Quota { kind, requested, limit } => {
                let pid = self.processes[index].pid;
                self.emit(Event::QuotaDenied { pid, quota: Some(kind), requested, limit });
                if self.processes[index].space.quotas().kill {
                    self.kill_current(frame, FaultKind::SharedQuotaExceeded, 0);
                    ShmOutcome::Killed
                } else {
                    ShmOutcome::Return(Err(SysError::QuotaExceeded))
                }
            }
        }
    }

    /// `shm_create(len, rights)`.
    pub(super) fn sys_shm_create(&mut self, frame: &mut TrapFrame, len: u64, rights: u64) -> ShmOutcome {
        let Some(rights) = Rights::from_user(rights) else {
            return ShmOutcome::Return(Err(SysError::InvalidArgument));
        };
        if len == 0 {
            return ShmOutcome::Return(Err(SysError::InvalidArgument));
        }
        if len > SHM_MAX {
            return ShmOutcome::Return(Err(SysError::TooLarge));
        }
        let len = len.next_multiple_of(PAGE_SIZE);
        let (pid, index) = self.caller();
        if self.processes[index].caps.len() >= CAPS_MAX {
            return ShmOutcome::Return(Err(SysError::QuotaExceeded));
        }
        if let Err(refusal) = self.processes[index].space.charge_shared(len) {
            return self.shared_quota_refusal(frame, index, refusal);
        }
        let id = self.next_region_id;
        let mut frames = Vec::with_capacity((len / PAGE_SIZE) as usize);
        for _ in 0..len / PAGE_SIZE {
            match self.memory.alloc_frame(FrameOwner::Shared(id)) {
                Some(frame) => frames.push(frame),
                None => {
                    frames.into_iter().for_each(|f| self.memory.release_frame(f));
                    self.processes[index].space.uncharge_shared(len);
                    return ShmOutcome::Return(Err(SysError::OutOfMemory));
                }
            }
        }
        self.next_region_id += 1;
        let handle = self.processes[index]
            .caps
            .insert(Capability { region: id, rights })
            .expect("the table had room (checked above)");
        self.regions.push(SharedRegion {
            id,
            owner: pid,
            frames,
            participants: alloc::vec![Participant { pid, rights, mapping: None }],
        });
        self.emit(Event::ShmCreated { pid, region: id.into(), len, rights: rights.bits() });
        self.after_allocation(index);
        ShmOutcome::Return(Ok(handle))
    }

    /// `shm_grant(handle, pid, rights)`.
    pub(super) fn sys_shm_grant(&mut self, handle: u64, target: u64, rights: u64) -> Result<u64, SysError> {
        let (pid, index) = self.caller();
        let (capability, region) = self.capability(index, handle)?;
        let requested = Rights::from_user(rights).ok_or(SysError::InvalidArgument)?;
        if !capability.rights.can_grant() {
            return Err(SysError::NotPermitted);
        }
        let granted = capability.rights.derive(requested).ok_or(SysError::NotPermitted)?;
        let target = u32::try_from(target).map_err(|_| SysError::NoSuchProcess)?;
        let target_index =
            self.processes.iter().position(|p| p.pid == target).ok_or(SysError::NoSuchProcess)?;
        let shared = &self.regions[region];
        if target == pid || shared.participants.iter().any(|p| p.pid == target) {
            return Err(SysError::InvalidArgument);
        }
        if shared.participants.len() >= SHM_PARTICIPANTS_MAX {
            return Err(SysError::QuotaExceeded);
        }
        let id = capability.region;
        self.processes[target_index]
            .caps
            .insert(Capability { region: id, rights: granted })
            .ok_or(SysError::QuotaExceeded)?;
        self.regions[region].participants.push(Participant { pid: target, rights: granted, mapping: None });
        self.emit(Event::ShmGranted {
            pid,
            region: id.into(),
            grantee: target.into(),
            rights: granted.bits(),
        });
        Ok(0)
    }

    /// `shm_map(handle, prot)`.
    pub(super) fn sys_shm_map(&mut self, frame: &mut TrapFrame, handle: u64, prot: u64) -> ShmOutcome {
        let (pid, index) = self.caller();
        let (capability, region) = match self.capability(index, handle) {
            Ok(found) => found,
            Err(error) => return ShmOutcome::Return(Err(error)),
        };
        if prot & PROT_EXEC != 0 {
            return ShmOutcome::Return(Err(SysError::NotPermitted));
        }
        let writable = match prot {
            PROT_READ => false,
            p if p == PROT_READ | PROT_WRITE => true,
            _ => return ShmOutcome::Return(Err(SysError::InvalidArgument)),
        };
        if writable && !capability.rights.can_write() || !capability.rights.can_read() {
            return ShmOutcome::Return(Err(SysError::NotPermitted));
        }
        let shared = &self.regions[region];
        let me = shared.participants.iter().find(|p| p.pid == pid).expect("a capability holder participates");
        if me.mapping.is_some() {
            return ShmOutcome::Return(Err(SysError::AlreadyMapped));
        }
        // The owner was charged at creation; others are charged when they map.
        let charge = if shared.owner == pid { 0 } else { shared.byte_len() };
        if let Err(refusal) = self.processes[index].space.charge_shared(charge) {
            return self.shared_quota_refusal(frame, index, refusal);
        }
        let id = capability.region;
        let frames = core::mem::take(&mut self.regions[region].frames);
        let mapped = self.processes[index].space.map_shared(&mut self.memory, id, &frames, writable);
        self.regions[region].frames = frames;
        let addr = match mapped {
            Ok(addr) => addr,
            Err(error) => {
                self.processes[index].space.uncharge_shared(charge);
                return ShmOutcome::Return(Err(error));
            }
        };
        if let Some(me) = self.regions[region].participant(pid) {
            me.mapping = Some((addr, prot));
        }
        self.emit(Event::ShmMapped { pid, region: id.into(), addr, prot });
        ShmOutcome::Return(Ok(addr))
    }

    /// `shm_unmap(addr)`.
    pub(super) fn sys_shm_unmap(&mut self, addr: u64) -> Result<u64, SysError> {
        let (pid, index) = self.caller();
        let (id, len) = self.processes[index].space.unmap_shared(&mut self.memory, addr)?;
        if let Some(region) = self.region_index(id) {
            let owner = self.regions[region].owner;
            if let Some(me) = self.regions[region].participant(pid) {
                me.mapping = None;
            }
            if owner != pid {
                self.processes[index].space.uncharge_shared(len);
            }
        }
        self.emit(Event::ShmUnmapped { pid, region: id.into(), addr });
        Ok(0)
    }

    /// `shm_revoke(handle, pid)`: owner only.
    pub(super) fn sys_shm_revoke(&mut self, handle: u64, target: u64) -> Result<u64, SysError> {
        let (pid, index) = self.caller();
        let (_, region) = self.capability(index, handle)?;
        if self.regions[region].owner != pid {
            return Err(SysError::NotPermitted);
        }
        let target = u32::try_from(target).map_err(|_| SysError::InvalidArgument)?;
        if target == pid || !self.regions[region].participants.iter().any(|p| p.pid == target) {
            return Err(SysError::InvalidArgument);
        }
        self.revoke_participant(region, target, pid);
        Ok(0)
    }

    /// `shm_destroy(handle)`: owner only.
    pub(super) fn sys_shm_destroy(&mut self, handle: u64) -> Result<u64, SysError> {
        let (pid, index) = self.caller();
        let (_, region) = self.capability(index, handle)?;
        if self.regions[region].owner != pid {
            return Err(SysError::NotPermitted);
        }
        self.destroy_region(region, pid);
        Ok(0)
    }

    /// `cap_list(buf, max)`.
    pub(super) fn sys_cap_list(&mut self, buf: u64, max: u64) -> Result<u64, SysError> {
        let (pid, index) = self.caller();
        let record = core::mem::size_of::<CapInfo>() as u64;
        let max = max.min(CAPS_MAX as u64);
        let chunks = self.processes[index].space.user_buffer(&mut self.memory, buf, max * record, true)?;
        let mut infos: Vec<u8> = Vec::new();
        let held: Vec<(u64, Capability)> = self.processes[index].caps.iter().collect();
        for &(handle, capability) in held.iter().take(max as usize) {
            let Some(region) = self.region_index(capability.region) else { continue };
            let shared = &self.regions[region];
            let mapped_at = shared
                .participants
                .iter()
                .find(|p| p.pid == pid)
                .and_then(|p| p.mapping)
                .map_or(0, |(addr, _)| addr);
            let info = CapInfo {
                handle,
                region: capability.region,
                owner: shared.owner,
                rights: capability.rights.bits(),
                len: shared.byte_len(),
                mapped_at,
            };
            infos.extend_from_slice(info.as_bytes());
        }
        let mut bytes = infos.as_slice();
        for chunk in chunks.iter() {
            let take = (chunk.len as usize).min(bytes.len());
            write_phys(chunk.phys, &bytes[..take]);
            bytes = &bytes[take..];
        }
        Ok(held.len() as u64)
    }

    /// Takes `target`'s capability for region `region` away and removes its
    /// mapping at once (the range stays reserved as revoked).
    fn revoke_participant(&mut self, region: usize, target: u32, by: u32) {
        let id = self.regions[region].id;
        let owner = self.regions[region].owner;
        let len = self.regions[region].byte_len();
        let Some(position) = self.regions[region].participants.iter().position(|p| p.pid == target) else {
            return;
        };
        let participant = self.regions[region].participants.remove(position);
        let mut addr = 0;
        if let Some(process) = self.processes.iter_mut().find(|p| p.pid == target) {
            process.caps.remove_region(id);
            if participant.mapping.is_some() {
                addr = process.space.revoke_shared(&mut self.memory, id).unwrap_or(0);
                if target != owner {
                    process.space.uncharge_shared(len);
                }
            }
        }
        self.emit(Event::ShmRevoked { pid: by, region: id.into(), target: target.into(), addr });
    }

    /// Revokes region `region` from every participant (owner last), then
    /// scrubs and frees its frames.
    pub(super) fn destroy_region(&mut self, region: usize, by: u32) {
        let owner = self.regions[region].owner;
        let others: Vec<u32> =
            self.regions[region].participants.iter().map(|p| p.pid).filter(|&p| p != owner).collect();
        for pid in others {
            self.revoke_participant(region, pid, by);
        }
        let id = self.regions[region].id;
        let len = self.regions[region].byte_len();
        if let Some(process) = self.processes.iter_mut().find(|p| p.pid == owner) {
            process.caps.remove_region(id);
            process.space.revoke_shared(&mut self.memory, id);
            process.space.uncharge_shared(len);
        }
        let shared = self.regions.remove(region);
        let frames_freed = shared.frames.len() as u64;
        for frame in shared.frames {
            self.memory.release_frame(frame);
        }
        self.emit(Event::ShmDestroyed { pid: by, region: id.into(), frames_freed });
    }

    /// Before process `pid` goes away: destroy the regions it owns (revoking
    /// them from everyone, with events).
    pub(super) fn destroy_owned_regions(&mut self, pid: u32) {
        while let Some(region) = self.regions.iter().position(|r| r.owner == pid) {
            self.destroy_region(region, pid);
        }
    }

    /// After process `pid` is gone: drop it from the regions it participated in.
    pub(super) fn forget_participant(&mut self, pid: u32) {
        for region in &mut self.regions {
            region.participants.retain(|p| p.pid != pid);
        }
    }
}
