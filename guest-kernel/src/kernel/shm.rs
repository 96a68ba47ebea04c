//! The shared-memory system calls: thin adapters over
//! [`crate::shared::SharedMemory`], which holds the logic (and its tests).
//! This module finds the caller, writes results to user memory, hands
//! refusals to [`Kernel::refused`] (the quota policy) and logs the events the
//! logic returns, in order, once the operation is complete (so the published
//! tables match at every event).
//!
//! TLB: the kernel runs on one CPU without PCIDs, so only the live address
//! space can hold cached translations; unmapping invalidates those page by
//! page, and every other address space's entries were flushed when CR3 last
//! changed. Revocation is therefore complete when the system call returns.

use super::memory::write_phys;
use super::process::Process;
use super::syscalls::Outcome;
use super::syscalls::SLICE_BUDGET;
use super::{Kernel, TrapFrame};
use crate::address_space::Refusal;
use crate::capability::CapTable;
use crate::shared::{Holder, Holders, MapProgress, UnmapProgress};
use alloc::vec::Vec;
use superos_protocol::event::Event;
use superos_protocol::syscall::{CapInfo, SysError, CAPS_MAX};
use zerocopy::IntoBytes;

impl Holders for Vec<Process> {
    fn holder(&mut self, pid: u32) -> Option<Holder<'_>> {
        self.iter_mut().find(|p| p.pid == pid).map(|p| Holder { space: &mut p.space, caps: &mut p.caps })
    }
}

/// A fresh capability table for a new process; the key scrambles handles so
/// that they mean nothing in another process.
pub fn new_cap_table(pid: u32, boot_entropy: u64) -> CapTable {
    let mixed = (u64::from(pid) ^ boot_entropy).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    CapTable::new(CAPS_MAX, (mixed >> 32) as u32 ^ mixed as u32)
}

impl Kernel {
    fn emit_all(&mut self, events: Vec<Event>) {
        for event in events {
            self.emit(event);
        }
    }

    /// `shm_create(len, rights)`, in slices of [`SLICE_BUDGET`]: the first
    /// checks everything and reserves the id, each allocates a bounded
    /// number of frames into the caller's `building` (the caller rewound to
    /// the gate between them), the last makes the region live.
    pub(super) fn sys_shm_create(&mut self, frame: &mut TrapFrame, len: u64, rights: u64) -> Outcome {
        let (pid, index) = self.caller();
        let resumed = self.resume_point(frame, index, u64::MAX).0 != u64::MAX;
        let stale = if resumed { None } else { self.processes[index].building.take() };
        if let Some(stale) = stale {
            self.shm.create_abort(&mut self.memory, stale);
        }
        if self.processes[index].building.is_none() {
            match self.shm.create_begin(&mut self.memory, &mut self.processes, pid, len, rights) {
                Ok(build) => self.processes[index].building = Some(build),
                Err(refusal) => return self.refused(frame, refusal),
            }
        }
        let mut build = self.processes[index].building.take().expect("set above");
        match self.shm.create_step(&mut self.memory, &mut build, SLICE_BUDGET) {
            Ok(false) => {
                let done = build.frames.len() as u64;
                self.processes[index].building = Some(build);
                self.restart(frame, index, done, 0)
            }
            Ok(true) => match self.shm.create_finish(&mut self.memory, &mut self.processes, pid, build) {
                Ok((handle, events)) => {
                    self.emit_all(events);
                    self.after_allocation(index);
                    Outcome::Return(Ok(handle))
                }
                Err(refusal) => self.refused(frame, refusal),
            },
            Err(refusal) => self.refused(frame, refusal),
        }
    }

    /// `shm_grant(handle, pid, rights)`.
    pub(super) fn sys_shm_grant(&mut self, handle: u64, target: u64, rights: u64) -> Result<u64, Refusal> {
        let (pid, _) = self.caller();
        let events = self.shm.grant(&mut self.processes, pid, handle, target, rights)?;
        self.emit_all(events);
        Ok(0)
    }

    /// `shm_accept(region)`.
    pub(super) fn sys_shm_accept(&mut self, frame: &mut TrapFrame, region: u64) -> Outcome {
        let (pid, _) = self.caller();
        match self.shm.accept(&mut self.processes, pid, region) {
            Ok((handle, events)) => {
                self.emit_all(events);
                Outcome::Return(Ok(handle))
            }
            Err(refusal) => self.refused(frame, refusal),
        }
    }

    /// `shm_map(handle, prot)`, in slices of [`SLICE_BUDGET`]: the first
    /// reserves and charges the mapping, each maps a bounded number of
    /// pages, and the caller is rewound to the gate between them (the
    /// `Resume` keeps the next page and the address).
    pub(super) fn sys_shm_map(&mut self, frame: &mut TrapFrame, handle: u64, prot: u64) -> Outcome {
        let (pid, index) = self.caller();
        let (from, addr) = match self.resume_point(frame, index, u64::MAX) {
            (u64::MAX, _) => {
                match self.shm.map_begin(&mut self.memory, &mut self.processes, pid, handle, prot) {
                    Ok(addr) => (0, addr),
                    Err(refusal) => return self.refused(frame, refusal),
                }
            }
            resumed => resumed,
        };
        match self.shm.map_continue(&mut self.memory, &mut self.processes, pid, addr, from, SLICE_BUDGET) {
            Ok(MapProgress::More(next)) => self.restart(frame, index, next, addr),
            Ok(MapProgress::Done(event)) => {
                self.emit(event);
                Outcome::Return(Ok(addr))
            }
            Err(refusal) => self.refused(frame, refusal),
        }
    }

    /// `shm_unmap(addr)`, in slices of [`SLICE_BUDGET`] (the caller rewound
    /// to the gate between them, `Resume::at` the next address).
    pub(super) fn sys_shm_unmap(&mut self, frame: &mut TrapFrame, addr: u64) -> Outcome {
        let (pid, index) = self.caller();
        let (from, _) = self.resume_point(frame, index, addr);
        match self.shm.unmap_slice(&mut self.memory, &mut self.processes, pid, addr, from, SLICE_BUDGET) {
            Ok(UnmapProgress::More(next)) => self.restart(frame, index, next, 0),
            Ok(UnmapProgress::Done(events)) => {
                self.emit_all(events);
                Outcome::Return(Ok(0))
            }
            Err(error) => Outcome::Return(Err(error)),
        }
    }

    /// `shm_revoke(handle, pid)`: the owner or `pid`'s granter.
    pub(super) fn sys_shm_revoke(&mut self, handle: u64, target: u64) -> Result<u64, SysError> {
        let (pid, _) = self.caller();
        let events = self.shm.revoke(&mut self.memory, &mut self.processes, pid, handle, target)?;
        self.emit_all(events);
        Ok(0)
    }

    /// `shm_destroy(handle)`: owner only.
    pub(super) fn sys_shm_destroy(&mut self, handle: u64) -> Result<u64, SysError> {
        let (pid, _) = self.caller();
        let events = self.shm.destroy(&mut self.memory, &mut self.processes, pid, handle)?;
        self.emit_all(events);
        Ok(0)
    }

    /// `cap_drop(handle)`.
    pub(super) fn sys_cap_drop(&mut self, handle: u64) -> Result<u64, SysError> {
        let (pid, _) = self.caller();
        let events = self.shm.drop_capability(&mut self.memory, &mut self.processes, pid, handle)?;
        self.emit_all(events);
        Ok(0)
    }

    /// `cap_list(buf, max)`.
    pub(super) fn sys_cap_list(&mut self, buf: u64, max: u64) -> Result<u64, Refusal> {
        let (pid, index) = self.caller();
        let record = core::mem::size_of::<CapInfo>() as u64;
        let max = max.min(CAPS_MAX as u64);
        let chunks = self.processes[index].space.user_buffer(&mut self.memory, buf, max * record, true)?;
        // Each record straight into the user's buffer, as it lies in memory
        // (`repr(C)`, no padding): nothing collected, nothing allocated.
        let mut held = 0u64;
        for info in self.shm.cap_infos(pid, &self.processes[index].caps) {
            if held < max {
                let mut bytes = info.as_bytes();
                for piece in chunks.range(held * record, record) {
                    let (now, rest) = bytes.split_at(piece.len as usize);
                    write_phys(piece.phys, now);
                    bytes = rest;
                }
            }
            held += 1;
        }
        Ok(held)
    }

    /// Before process `pid` goes away: destroy the regions it owns (revoking
    /// them from everyone), then revoke what others derived from its
    /// capabilities in regions it does not own, each step an event while it
    /// is still a consistent, live process.
    pub(super) fn destroy_owned_regions(&mut self, pid: u32) {
        let mut events = self.shm.destroy_owned(&mut self.memory, &mut self.processes, pid);
        events.extend(self.shm.revoke_derived(&mut self.memory, &mut self.processes, pid));
        self.emit_all(events);
    }

    /// After process `pid` is gone: drop it from the regions it participated in.
    pub(super) fn forget_participant(&mut self, pid: u32) {
        self.shm.forget(pid);
    }
}
