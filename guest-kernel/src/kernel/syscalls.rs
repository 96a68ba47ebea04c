//! The system calls. Every pointer and length is checked against the caller's
//! own page tables and regions before anything is read or written; a bad
//! argument is a typed error return, never a kernel fault. The kernel reads
//! and writes user memory through the direct map, never through user
//! addresses.

use super::host::console_write;
use super::memory::{copy_phys, write_phys};
use super::process::{Message, ProcessState, Resume, Termination};
use super::{Kernel, TrapFrame};
use crate::address_space::{Chunks, Memory, Refusal};
use superos_protocol::event::Event;
use superos_protocol::hypercall::STATUS_OK;
use superos_protocol::layout::GATE_VA;
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{
    self as sc, encode_recv, encode_result, MemStat, SysError, Syscall, MAILBOX_DEPTH, MAILBOX_PER_SENDER,
    MESSAGE_MAX, RECV_NONBLOCK,
};
use zerocopy::IntoBytes;

/// Units of work one slice of `mem_unmap` or `mem_protect` may spend (see
/// `paging::unmap_range`: an entry looked at is 1, a present page or table
/// acted on 17, an emptiness scan 64); then the caller is rescheduled
/// and the call goes on where it stopped when the caller runs again. With
/// the walks skipping absent tables, this bounds the ring-0 time of one
/// kernel entry (see `docs/ARCHITECTURE.md`, "Bounded kernel time").
pub const SLICE_BUDGET: u64 = 1024;

/// What a system call did.
pub(super) enum Outcome {
    /// Resume the caller with this result.
    Return(Result<u64, SysError>),
    /// The frame has already been dealt with (the caller exited, was killed,
    /// blocked, or yielded).
    Handled,
}

impl Kernel {
    /// Dispatches the system call in `frame` (from the gate stub).
    pub(super) fn syscall(&mut self, frame: &mut TrapFrame) {
        let (a0, a1, a2) = (frame.rdi, frame.rsi, frame.rdx);
        let outcome = match Syscall::from_raw(frame.rax) {
            Some(Syscall::Write) => {
                let result = self.sys_write(a0, a1);
                self.outcome(frame, result)
            }
            Some(Syscall::Exit) => {
                self.terminate_current(frame, Termination::Exit(a0 as i64));
                Outcome::Handled
            }
            Some(Syscall::Yield) => {
                frame.rax = 0;
                self.reschedule(frame, true);
                Outcome::Handled
            }
            Some(Syscall::GetPid) => Outcome::Return(Ok(u64::from(self.caller().0))),
            Some(Syscall::MemMap) => self.sys_mem_map(frame, a0, a1),
            Some(Syscall::MemUnmap) => self.sys_mem_unmap(frame, a0, a1),
            Some(Syscall::MemProtect) => self.sys_mem_protect(frame, a0, a1, a2),
            Some(Syscall::MemStat) => {
                let result = self.sys_mem_stat(a0);
                self.outcome(frame, result)
            }
            Some(Syscall::IpcSend) => {
                let result = self.sys_ipc_send(a0, a1, a2);
                self.outcome(frame, result)
            }
            Some(Syscall::IpcRecv) => self.sys_ipc_recv(frame, a0, a1, a2),
            Some(Syscall::ShmCreate) => self.sys_shm_create(frame, a0, a1),
            Some(Syscall::ShmGrant) => {
                let result = self.sys_shm_grant(a0, a1, a2);
                self.outcome(frame, result)
            }
            Some(Syscall::ShmMap) => self.sys_shm_map(frame, a0, a1),
            Some(Syscall::ShmUnmap) => self.sys_shm_unmap(frame, a0),
            Some(Syscall::ShmRevoke) => Outcome::Return(self.sys_shm_revoke(a0, a1)),
            Some(Syscall::ShmDestroy) => Outcome::Return(self.sys_shm_destroy(a0)),
            Some(Syscall::CapDrop) => Outcome::Return(self.sys_cap_drop(a0)),
            Some(Syscall::ShmAccept) => self.sys_shm_accept(frame, a0),
            Some(Syscall::CapList) => {
                let result = self.sys_cap_list(a0, a1);
                self.outcome(frame, result)
            }
            Some(Syscall::GateSelfTest) | None => Outcome::Return(Err(SysError::NoSys)),
        };
        if let Outcome::Return(result) = outcome {
            frame.rax = encode_result(result);
        }
    }

    /// (pid, index) of the calling process.
    pub(super) fn caller(&self) -> (u32, usize) {
        let index = self.current().unwrap_or_else(|| panic!("system call with no current process"));
        (self.processes[index].pid, index)
    }

    /// The outcome of a call that may be refused: every refusal, a quota's
    /// above all, goes through [`Self::refused`].
    pub(super) fn outcome(&mut self, frame: &mut TrapFrame, result: Result<u64, Refusal>) -> Outcome {
        match result {
            Ok(value) => Outcome::Return(Ok(value)),
            Err(refusal) => self.refused(frame, refusal),
        }
    }

    /// Applies a refusal to the caller: a plain error is returned; a quota is
    /// logged (`QuotaDenied`) and the process's policy decides: the error, or
    /// its termination.
    pub(super) fn refused(&mut self, frame: &mut TrapFrame, refusal: Refusal) -> Outcome {
        match refusal {
            Refusal::Error(error) => Outcome::Return(Err(error)),
            Refusal::Quota { kind, requested, limit } => {
                let (pid, index) = self.caller();
                self.emit(Event::QuotaDenied { pid, quota: Some(kind), requested, limit });
                if self.processes[index].space.quotas().kill {
                    self.kill_current(frame, kind.fault(), 0);
                    Outcome::Handled
                } else {
                    Outcome::Return(Err(SysError::QuotaExceeded))
                }
            }
        }
    }

    /// `write(buf, len)`: the whole range is validated against the caller's
    /// mappings before a single byte is printed.
    fn sys_write(&mut self, buf: u64, len: u64) -> Result<u64, Refusal> {
        if len > sc::WRITE_MAX {
            return Err(SysError::TooLarge.into());
        }
        let (pid, index) = self.caller();
        let chunks = self.processes[index].space.user_buffer(&mut self.memory, buf, len, false)?;
        for chunk in chunks.iter() {
            if console_write(pid, chunk.phys, chunk.len) != STATUS_OK {
                return Err(SysError::InvalidArgument.into());
            }
        }
        Ok(len)
    }

    fn sys_mem_map(&mut self, frame: &mut TrapFrame, len: u64, prot: u64) -> Outcome {
        let (pid, index) = self.caller();
        match self.processes[index].space.map_anonymous(len, prot) {
            Ok(addr) => {
                let len = len.next_multiple_of(superos_protocol::layout::PAGE_SIZE);
                self.emit(Event::MemMapped { pid, addr, len, prot });
                self.after_allocation(index);
                Outcome::Return(Ok(addr))
            }
            Err(refusal) => self.refused(frame, refusal),
        }
    }

    /// Where this call starts: the resume point of the caller's interrupted
    /// call if this is that call entering again, else `default`; with what
    /// the earlier slices did.
    pub(super) fn resume_point(&mut self, frame: &TrapFrame, index: usize, default: u64) -> (u64, u64) {
        let call = [frame.rax, frame.rdi, frame.rsi, frame.rdx];
        match self.processes[index].resume.take() {
            Some(resume) if resume.call == call => (resume.at, resume.done),
            _ => (default, 0),
        }
    }

    /// Interrupts the current call after a slice of [`SLICE_BUDGET`]: the
    /// caller is rewound to the gate stub (its registers unchanged, so it
    /// makes the same call again) and the others get the CPU first.
    pub(super) fn restart(&mut self, frame: &mut TrapFrame, index: usize, at: u64, done: u64) -> Outcome {
        let call = [frame.rax, frame.rdi, frame.rsi, frame.rdx];
        self.processes[index].resume = Some(Resume { call, at, done });
        frame.rip = GATE_VA;
        self.reschedule(frame, true);
        Outcome::Handled
    }

    fn sys_mem_unmap(&mut self, frame: &mut TrapFrame, addr: u64, len: u64) -> Outcome {
        let (pid, index) = self.caller();
        let (from, done) = self.resume_point(frame, index, addr);
        match self.processes[index].space.unmap_slice(&mut self.memory, addr, len, from, SLICE_BUDGET) {
            Ok((freed, Some(at))) => self.restart(frame, index, at, done + freed),
            Ok((freed, None)) => {
                let len = len.next_multiple_of(superos_protocol::layout::PAGE_SIZE);
                self.emit(Event::MemUnmapped { pid, addr, len, freed_pages: done + freed });
                self.processes[index].space.pressure_crossings().for_each(drop);
                Outcome::Return(Ok(0))
            }
            Err(refusal) => self.refused(frame, refusal),
        }
    }

    fn sys_mem_protect(&mut self, frame: &mut TrapFrame, addr: u64, len: u64, prot: u64) -> Outcome {
        let (pid, index) = self.caller();
        let (from, _) = self.resume_point(frame, index, addr);
        match self.processes[index].space.protect_slice(&mut self.memory, addr, len, prot, from, SLICE_BUDGET)
        {
            Ok(Some(at)) => self.restart(frame, index, at, 0),
            Ok(None) => {
                let len = len.next_multiple_of(superos_protocol::layout::PAGE_SIZE);
                self.emit(Event::MemProtected { pid, addr, len, prot });
                Outcome::Return(Ok(0))
            }
            Err(refusal) => self.refused(frame, refusal),
        }
    }

    fn sys_mem_stat(&mut self, buf: u64) -> Result<u64, Refusal> {
        let (_, index) = self.caller();
        let size = core::mem::size_of::<MemStat>() as u64;
        let space = &mut self.processes[index].space;
        let chunks = space.user_buffer(&mut self.memory, buf, size, true)?;
        // Computed after the buffer was faulted in, so it counts that page.
        let stat = space.stat();
        let mut bytes = stat.as_bytes();
        for chunk in chunks.iter() {
            let (head, rest) = bytes.split_at(chunk.len as usize);
            write_phys(chunk.phys, head);
            bytes = rest;
        }
        self.after_allocation(index);
        Ok(0)
    }

    /// `ipc_send(pid, buf, len)`: copies the message into a kernel frame in
    /// the receiver's mailbox, or straight into a waiting receiver's buffer.
    fn sys_ipc_send(&mut self, target: u64, buf: u64, len: u64) -> Result<u64, Refusal> {
        if len > MESSAGE_MAX {
            return Err(SysError::TooLarge.into());
        }
        let (sender, index) = self.caller();
        let chunks = self.processes[index].space.user_buffer(&mut self.memory, buf, len, false)?;
        let target_index = u32::try_from(target)
            .ok()
            .and_then(|pid| self.processes.iter().position(|p| p.pid == pid))
            .ok_or(SysError::NoSuchProcess)?;
        // The mailbox rule: MAILBOX_DEPTH slots, at most MAILBOX_PER_SENDER
        // of them another sender's.
        let mailbox = &self.processes[target_index].mailbox;
        if mailbox.len() >= MAILBOX_DEPTH
            || target_index != index
                && mailbox.iter().filter(|m| m.sender == sender).count() >= MAILBOX_PER_SENDER
        {
            return Err(SysError::MailboxFull.into());
        }
        let receiver = self.processes[target_index].pid;
        let frame = self.memory.alloc_frame(FrameOwner::Message(receiver)).ok_or(SysError::OutOfMemory)?;
        let mut offset = 0;
        for chunk in chunks.iter() {
            copy_phys(chunk.phys, frame + offset, chunk.len);
            offset += chunk.len;
        }
        self.processes[target_index].mailbox.push_back(Message { sender, len, frame });
        if let ProcessState::Receiving { buf, cap } = self.processes[target_index].state {
            // The receiver's buffer was checked when it blocked; its pages
            // cannot have changed since (it has not run), so this succeeds.
            let result = self.processes[target_index]
                .space
                .user_buffer(&mut self.memory, buf, cap, true)
                .map_err(|refusal| match refusal {
                    Refusal::Error(error) => error,
                    Refusal::Quota { .. } => SysError::QuotaExceeded,
                })
                .and_then(|chunks| self.deliver(target_index, &chunks, cap));
            self.wake(target_index, result);
        }
        Ok(0)
    }

    /// `ipc_recv(buf, cap, flags)`.
    fn sys_ipc_recv(&mut self, frame: &mut TrapFrame, buf: u64, cap: u64, flags: u64) -> Outcome {
        if flags & !RECV_NONBLOCK != 0 {
            return Outcome::Return(Err(SysError::InvalidArgument));
        }
        let cap = cap.min(MESSAGE_MAX);
        let (_, index) = self.caller();
        // Check the whole buffer up front, so a bad buffer is reported even
        // when no message is waiting.
        let chunks = match self.processes[index].space.user_buffer(&mut self.memory, buf, cap, true) {
            Ok(chunks) => chunks,
            Err(refusal) => return self.refused(frame, refusal),
        };
        if !self.processes[index].mailbox.is_empty() {
            return Outcome::Return(self.deliver(index, &chunks, cap));
        }
        if flags & RECV_NONBLOCK != 0 {
            return Outcome::Return(Err(SysError::WouldBlock));
        }
        self.processes[index].state = ProcessState::Receiving { buf, cap };
        self.reschedule(frame, true);
        Outcome::Handled
    }

    /// Copies the oldest message of process `index` into its receive buffer
    /// (`chunks`, `cap` bytes) and frees the message frame.
    fn deliver(&mut self, index: usize, chunks: &Chunks, cap: u64) -> Result<u64, SysError> {
        let process = &mut self.processes[index];
        let message = *process.mailbox.front().expect("deliver is only called with mail waiting");
        if message.len > cap {
            return Err(SysError::BufferTooSmall);
        }
        let mut offset = 0;
        for chunk in chunks.truncated(message.len).iter() {
            copy_phys(message.frame + offset, chunk.phys, chunk.len);
            offset += chunk.len;
        }
        process.mailbox.pop_front();
        self.memory.release_dirty_prefix(message.frame, message.len);
        Ok(encode_recv(message.sender, message.len as u32))
    }
}
