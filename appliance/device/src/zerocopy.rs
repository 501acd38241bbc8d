//! Safe wrappers of the system calls the serving path needs: sendfile(2) from a drive to a
//! socket, send(2) with MSG_MORE for response heads, posix_fadvise(2) read-ahead hints,
//! cachestat(2) to ask whether a range is in the page cache before sending it inline, and a
//! poll(2) probe of whether a socket can take bytes now, pread(2) for bodies that user space
//! must encrypt, and the switch of a socket to the kernel's TLS layer.
//!
//! They take borrowed descriptors and plain values, never block the caller longer than the
//! kernel call itself, and report every failure as an `io::Error`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sends up to `count` bytes from `from` at `*offset_bytes` to the socket `to`; advances the
/// offset by what was sent and returns that count (0 means the source has no bytes there).
/// On a non-blocking socket a full send buffer is `WouldBlock`.
pub fn sendfile(
    to: BorrowedFd<'_>,
    from: BorrowedFd<'_>,
    offset_bytes: &mut u64,
    count: usize,
) -> io::Result<usize> {
    let mut offset = libc::off_t::try_from(*offset_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // A signal that arrives before any byte moves (a cold read can wait on the drive long
    // enough for one) is no failure: the call is made again.
    let sent = retry_interrupted(|| {
        // SAFETY: both descriptors are open for the borrow's lifetime; `offset` is a valid,
        // exclusively borrowed off_t the kernel updates; no user memory is read or written.
        unsafe { libc::sendfile(to.as_raw_fd(), from.as_raw_fd(), &mut offset, count) }
    })?;
    *offset_bytes = u64::try_from(offset).expect("the kernel returns a non-negative offset");
    Ok(usize::try_from(sent).expect("non-negative"))
}

/// Runs a system call until no signal interrupts it: its non-negative result, or the error
/// it set.
fn retry_interrupted(mut call: impl FnMut() -> isize) -> io::Result<isize> {
    loop {
        let result = call();
        if result >= 0 {
            return Ok(result);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Whether the socket can take bytes now (poll(2) for POLLOUT without waiting). An error or
/// hang-up condition counts as writable: the next write reports it.
pub fn writable_now(socket: BorrowedFd<'_>) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ready = retry_interrupted(|| {
        // SAFETY: `poll` is one valid pollfd for the call; the descriptor is open for the
        // borrow's lifetime; a zero timeout never waits.
        unsafe { libc::poll(&mut poll, 1, 0) as isize }
    })?;
    Ok(ready > 0)
}

/// Reads up to `buf.len()` bytes of `from` at `offset_bytes` (pread(2)): the count read, 0 at
/// the end. For bodies that must pass through user space (TLS encrypted by the process).
pub fn pread(from: BorrowedFd<'_>, offset_bytes: u64, buf: &mut [u8]) -> io::Result<usize> {
    let offset = libc::off_t::try_from(offset_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    let read = retry_interrupted(|| {
        // SAFETY: `buf` is a valid, exclusively borrowed slice for its length for the call;
        // the descriptor is open for the borrow's lifetime.
        unsafe { libc::pread(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) }
    })?;
    Ok(usize::try_from(read).expect("non-negative"))
}

/// Turns on the kernel's TLS layer on a connected TCP socket (`setsockopt(TCP_ULP, "tls")`):
/// what kernel TLS needs before any key is given. Fails with ENOENT when the kernel has no
/// TLS module (or may not load it).
pub fn enable_tls_ulp(socket: BorrowedFd<'_>) -> io::Result<()> {
    const NAME: &[u8; 3] = b"tls";
    // SAFETY: `NAME` is a valid buffer of the given length for the call; the descriptor is
    // open for the borrow's lifetime.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            NAME.as_ptr().cast(),
            3,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lets kernel TLS send sendfile(2) data straight from the page cache without its own copy
/// (`TLS_TX_ZEROCOPY_RO`, Linux 5.19+; it takes effect with NIC offload). Safe only when the
/// file bytes cannot change while they are in flight: the store never rewrites a published
/// range while it can be read. Fails on kernels without the option.
pub fn tls_tx_zerocopy_sendfile(socket: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid c_int for the call and its size is passed; the descriptor is
    // open for the borrow's lifetime.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_TLS,
            libc::TLS_TX_ZEROCOPY_RO,
            (&on as *const libc::c_int).cast(),
            4,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends bytes on a socket with MSG_MORE (more data follows: the kernel may hold them back to
/// share a packet with the body) or without it; returns how many were queued.
pub fn send(to: BorrowedFd<'_>, bytes: &[u8], more_follows: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | if more_follows { libc::MSG_MORE } else { 0 };
    let sent = retry_interrupted(|| {
        // SAFETY: `bytes` is a valid slice for its length for the duration of the call; the
        // descriptor is open for the borrow's lifetime.
        unsafe { libc::send(to.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), flags) }
    })?;
    Ok(usize::try_from(sent).expect("non-negative"))
}

/// Asks the kernel to start reading a range into the page cache now (asynchronously), so a
/// later sendfile finds it there instead of blocking on the drive.
pub fn prefetch(from: BorrowedFd<'_>, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    let length = libc::off_t::try_from(length_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length beyond off_t"))?;
    // SAFETY: posix_fadvise only takes values and an open descriptor; it touches no memory.
    let error =
        unsafe { libc::posix_fadvise(from.as_raw_fd(), offset, length, libc::POSIX_FADV_WILLNEED) };
    if error != 0 {
        return Err(io::Error::from_raw_os_error(error));
    }
    Ok(())
}

/// cachestat(2)'s number; the same on every architecture (the unified table since 6.5).
const SYS_CACHESTAT: libc::c_long = 451;

/// Whether a range of a descriptor is in the page cache, as far as the kernel can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// Every page of the range is cached: sendfile will not wait for the drive.
    Resident,
    /// At least one page must come from the drive.
    Cold,
    /// The kernel has no cachestat(2) (before 6.5): nothing is known.
    Unknown,
}

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Asks the kernel (cachestat(2)) whether every page of `offset_bytes..+length_bytes` of
/// `from` is cached. It walks the page-cache tree of the range and never touches the drive.
pub fn residency(from: BorrowedFd<'_>, offset_bytes: u64, length_bytes: u64) -> Residency {
    if length_bytes == 0 {
        return Residency::Resident;
    }
    let page = 4096u64;
    let first = offset_bytes / page;
    let last = (offset_bytes + length_bytes - 1) / page;
    let range = CachestatRange {
        off: first * page,
        len: (last - first + 1) * page,
    };
    let mut stat = Cachestat::default();
    // SAFETY: `range` and `stat` are valid, properly laid out (repr(C), the kernel's
    // struct cachestat_range and struct cachestat) for the duration of the call; flags 0.
    let result = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            from.as_raw_fd() as libc::c_long,
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0 as libc::c_long,
        )
    };
    if result != 0 {
        return Residency::Unknown;
    }
    if stat.nr_cache > last - first {
        Residency::Resident
    } else {
        Residency::Cold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn sendfile_moves_bytes_from_a_file_to_a_socket() {
        let dir = std::env::temp_dir().join(format!("zerocopy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("source");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(b"0123456789abcdef")
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (mut reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        prefetch(file.as_fd(), 0, 16).unwrap();
        assert_eq!(send(writer.as_fd(), b"head:", true).unwrap(), 5);
        let mut offset = 4;
        assert_eq!(
            sendfile(writer.as_fd(), file.as_fd(), &mut offset, 6).unwrap(),
            6
        );
        assert_eq!(offset, 10);
        assert_eq!(
            sendfile(writer.as_fd(), file.as_fd(), &mut 16, 6).unwrap(),
            0
        );
        assert_eq!(residency(file.as_fd(), 0, 16), Residency::Resident);
        drop(writer);
        let mut received = String::new();
        reader.read_to_string(&mut received).unwrap();
        assert_eq!(received, "head:456789");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn residency_sees_pages_leave_and_return() {
        let dir = std::env::temp_dir().join(format!("residency-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("source");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: fadvise only takes values and an open descriptor.
        let dropped =
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(dropped, 0);
        let before = residency(file.as_fd(), 8192, 65536);
        let mut buf = vec![0u8; 65536];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 8192).unwrap();
        let after = residency(file.as_fd(), 8192, 65536);
        if before == Residency::Unknown {
            assert_eq!(after, Residency::Unknown, "a kernel without cachestat");
        } else {
            assert_eq!(before, Residency::Cold);
            assert_eq!(after, Residency::Resident);
            assert_eq!(residency(file.as_fd(), 0, 1 << 20), Residency::Cold);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
