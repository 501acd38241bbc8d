//! Safe wrappers of the system calls the serving path needs: sendfile(2) from a drive to a
//! socket, send(2) with MSG_MORE for response heads, and posix_fadvise(2) read-ahead hints.
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
    // SAFETY: both descriptors are open for the borrow's lifetime; `offset` is a valid,
    // exclusively borrowed off_t the kernel updates; no user memory is read or written.
    let sent = unsafe { libc::sendfile(to.as_raw_fd(), from.as_raw_fd(), &mut offset, count) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    *offset_bytes = u64::try_from(offset).expect("the kernel returns a non-negative offset");
    Ok(usize::try_from(sent).expect("non-negative"))
}

/// Sends bytes on a socket with MSG_MORE (more data follows: the kernel may hold them back to
/// share a packet with the body) or without it; returns how many were queued.
pub fn send(to: BorrowedFd<'_>, bytes: &[u8], more_follows: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | if more_follows { libc::MSG_MORE } else { 0 };
    // SAFETY: `bytes` is a valid slice for its length for the duration of the call; the
    // descriptor is open for the borrow's lifetime.
    let sent = unsafe { libc::send(to.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), flags) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
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
        drop(writer);
        let mut received = String::new();
        reader.read_to_string(&mut received).unwrap();
        assert_eq!(received, "head:456789");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
