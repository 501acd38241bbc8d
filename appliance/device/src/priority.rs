//! Thread priorities for background work: the fill, the scrubber and other work that must
//! never take CPU or drive time from serving.
//!
//! Linux schedules threads, not processes, so each background thread lowers itself: the CPU
//! class `SCHED_IDLE` (runs only when no normal thread wants the core), or nice 19 where that
//! is refused, and the I/O class idle for the reads and writes the thread itself issues
//! (buffered and direct I/O it submits from its own context; io_uring work submitted by a
//! drive's ring thread carries the ring thread's class, not the caller's).

use std::io;

/// How far the calling thread was lowered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lowered {
    /// `SCHED_IDLE`.
    Idle,
    /// `SCHED_IDLE` was refused; nice 19 instead.
    Nice19,
}

/// Lowers the calling thread's CPU priority to `SCHED_IDLE` (else nice 19) and its I/O
/// priority to the idle class; threads it spawns afterwards inherit both.
pub fn lower_current_thread() -> io::Result<Lowered> {
    let cpu = set_sched_idle().map(|()| Lowered::Idle).or_else(|_| {
        set_nice(19)?;
        Ok::<_, io::Error>(Lowered::Nice19)
    })?;
    // The I/O class is a hint: a kernel without an I/O scheduler that honours it just ignores
    // it, so a refusal here does not make the thread any less lowered on the CPU.
    let _ = set_io_idle();
    Ok(cpu)
}

fn set_sched_idle() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let tid = libc::id_t::try_from(tid).map_err(|_| io::Error::other("thread id out of range"))?;
    // SAFETY: setpriority only takes values; PRIO_PROCESS with a thread id sets that thread.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `IOPRIO_CLASS_IDLE` for the calling thread (ioprio_set(2); libc has no wrapper).
fn set_io_idle() -> io::Result<()> {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: ioprio_set only takes values; who 0 is the calling thread.
    let result = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's scheduling policy and nice value, for tests and status.
pub fn current_thread_priority() -> io::Result<(i32, i32)> {
    // SAFETY: pid 0 is the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let tid = libc::id_t::try_from(tid).map_err(|_| io::Error::other("thread id out of range"))?;
    // SAFETY: getpriority only takes values.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    Ok((policy, nice))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_thread_is_idle_and_its_children_inherit_it() {
        std::thread::spawn(|| {
            let lowered = lower_current_thread().unwrap();
            let (policy, _) = current_thread_priority().unwrap();
            match lowered {
                Lowered::Idle => assert_eq!(policy, libc::SCHED_IDLE),
                Lowered::Nice19 => assert_eq!(current_thread_priority().unwrap().1, 19),
            }
            let child = std::thread::spawn(current_thread_priority).join().unwrap();
            assert_eq!(child.unwrap().0, policy);
        })
        .join()
        .unwrap();
        let (policy, _) = current_thread_priority().unwrap();
        assert_eq!(policy, libc::SCHED_OTHER, "only the lowered thread changes");
    }
}
