//! The io_uring backend: one ring per worker; every operation is one SQE whose `user_data` is the
//! operation's id, and every CQE is one [`Event`].

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::{Cancel, Driver, Event, OpBody, Target};

/// `user_data` of the internal read on the worker's eventfd (the cross-thread wake-up).
const WAKE: u64 = u64::MAX;
/// `user_data` of internal cancel requests; their own CQEs are not reported.
const CANCEL: u64 = u64::MAX - 1;

/// The opcodes this backend needs; checked once when a ring is created.
const REQUIRED: [(u8, &str); 7] = [
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
    (opcode::Read::CODE, "READ"),
];

pub(crate) struct Uring {
    ring: IoUring,
    /// Created disabled (single issuer): the first thread to use it enables it and becomes
    /// its only submitter.
    disabled: bool,
    /// The eventfd that other threads write to wake this worker.
    wake_fd: RawFd,
    /// Target of the read on `wake_fd`; the kernel may write it while `wake_armed`.
    wake_buf: Box<u64>,
    wake_armed: bool,
    /// Set once everything was cancelled for good: no more wake-up reads.
    quiescing: bool,
    /// Events reaped while making room in a full submission queue.
    stash: Vec<Event>,
}

impl Uring {
    /// Creates a ring of `entries` submission slots that wakes up when `wake_fd` is written.
    ///
    /// # Errors
    /// The kernel's refusal (`EPERM` under a seccomp filter or `kernel.io_uring_disabled`,
    /// `ENOSYS` on old kernels, `ENOMEM` under a low `RLIMIT_MEMLOCK`), or `Unsupported` when an
    /// opcode or feature this backend needs is missing.
    pub(crate) fn new(entries: u32, wake_fd: RawFd) -> io::Result<Self> {
        // Fastest first: task work deferred to our own waits, on a ring only the worker's thread
        // drives (it is created disabled and enabled by that thread on first use); then
        // cooperative task work; then the plain ring.
        let cq = entries.saturating_mul(8);
        let (ring, deferred) = match IoUring::builder()
            .setup_cqsize(cq)
            .setup_clamp()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_r_disabled()
            .build(entries)
        {
            Ok(ring) => (ring, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let ring = match IoUring::builder()
                    .setup_cqsize(cq)
                    .setup_clamp()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag()
                    .build(entries)
                {
                    Ok(ring) => ring,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
                        .setup_cqsize(cq)
                        .setup_clamp()
                        .build(entries)?,
                    Err(e) => return Err(e),
                };
                (ring, false)
            }
            Err(e) => return Err(e),
        };
        if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_nodrop() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks EXT_ARG or NODROP (Linux 5.11 or later is needed)",
            ));
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in REQUIRED {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring opcode {name} is not supported by this kernel"),
                ));
            }
        }
        Ok(Uring {
            ring,
            disabled: deferred,
            wake_fd,
            wake_buf: Box::new(0),
            wake_armed: false,
            quiescing: false,
            stash: Vec::new(),
        })
    }

    /// Enables a ring created disabled, from the thread that will drive it.
    fn enable(&mut self) -> io::Result<()> {
        if self.disabled {
            self.ring.submitter().register_enable_rings()?;
            self.disabled = false;
        }
        Ok(())
    }

    /// Queues one SQE, making room first when the submission queue is full.
    ///
    /// # Safety
    /// Every pointer in `sqe` must stay valid until its CQE is reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        self.enable()?;
        loop {
            // SAFETY: the caller guarantees that what `sqe` points to outlives the operation.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            // Reaping frees completion slots, which a kernel short of them needs before it
            // takes more submissions.
            let mut stash = std::mem::take(&mut self.stash);
            self.reap(&mut stash);
            self.stash = stash;
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        if self.wake_armed || self.quiescing {
            return Ok(());
        }
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake_fd), buf.cast(), 8)
            .build()
            .user_data(WAKE);
        // SAFETY: `wake_buf` is a heap allocation owned by `self`; while `wake_armed` is set,
        // `Drop` leaks it instead of freeing it, and the eventfd outlives the worker.
        unsafe { self.push(&sqe)? };
        self.wake_armed = true;
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Event>) {
        for cqe in self.ring.completion() {
            match cqe.user_data() {
                WAKE => self.wake_armed = false,
                CANCEL => {}
                id => out.push(Event {
                    id,
                    res: cqe.result(),
                }),
            }
        }
    }
}

impl Driver for Uring {
    fn start(&mut self, id: u64, target: Target, body: &mut OpBody) -> io::Result<()> {
        let fd = types::Fd(target.fd);
        let sqe = match body {
            OpBody::Accept => opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build(),
            OpBody::Connect(addr) => {
                opcode::Connect::new(fd, addr.as_ptr().cast(), addr.len()).build()
            }
            OpBody::Recv(buf) => {
                let spare = buf.spare_capacity_mut();
                let len = u32::try_from(spare.len()).unwrap_or(u32::MAX);
                opcode::Recv::new(fd, spare.as_mut_ptr().cast(), len).build()
            }
            OpBody::Send(buf, offset) => {
                let rest = buf.get(*offset..).unwrap_or_default();
                let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
                opcode::Send::new(fd, rest.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            }
            OpBody::Timeout(_, ts) => opcode::Timeout::new(ts).build(),
        };
        // SAFETY: the port keeps `body` (the buffer, address or timespec the SQE points into)
        // boxed in its in-flight table, untouched, until this id's event has been reaped.
        unsafe { self.push(&sqe.user_data(id)) }
    }

    fn cancel(&mut self, what: Cancel) {
        let builder = match what {
            Cancel::Op(id) => types::CancelBuilder::user_data(id),
            Cancel::Fd(fd) => types::CancelBuilder::fd(types::Fd(fd)).all(),
            Cancel::All => {
                self.quiescing = true;
                types::CancelBuilder::any()
            }
        };
        let sqe = opcode::AsyncCancel2::new(builder).build().user_data(CANCEL);
        // SAFETY: a cancel request points at no memory.
        if let Err(e) = unsafe { self.push(&sqe) } {
            tracing::warn!("io_uring: could not queue a cancel request: {e}");
        }
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        self.enable()?;
        self.arm_wake()?;
        out.append(&mut self.stash);
        let ready = !out.is_empty() || !self.ring.completion().is_empty();
        let res = match timeout {
            _ if ready => self.ring.submit(),
            Some(t) if t.is_zero() => self.ring.submit(),
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match res {
            Ok(_) => {}
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                _ => return Err(e),
            },
        }
        self.reap(out);
        if !self.wake_armed {
            // Reset the eventfd's counter was done by the read itself; re-arm for the next post.
            self.arm_wake()?;
        }
        Ok(())
    }

    fn idle(&self) -> bool {
        !self.wake_armed
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if self.wake_armed {
            // The kernel may still complete the read into this buffer while the ring is torn
            // down; eight bytes leaked once per worker are the price of never freeing it early.
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
    }
}
