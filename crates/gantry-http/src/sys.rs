//! Socket reads and writes as direct system calls (rustix), for the plain-TCP paths of the
//! in-task HTTP/1.1 server and client.
//!
//! Why not tokio's `try_read`/`try_write` (std, then libc): libc's `recv`, `send` and `writev`
//! are thread-cancellation points, and in a process with more than one thread each call turns
//! the thread's asynchronous cancellation on and off around the syscall, two atomic
//! read-modify-write instructions. A proxied request makes four such calls; at a thousand
//! connections those atomics wait on stores to memory gone cold. nginx, one thread per worker,
//! pays none (glibc skips the dance in single-threaded processes). Readiness stays tokio's: the
//! `try_*` calls run inside `TcpStream::try_io`, which forgets readiness on `WouldBlock`, as
//! `codec::read_drained` does with the plain ones.
//!
//! The crate's only `unsafe`: telling a `BytesMut` how many bytes the kernel wrote into its
//! spare capacity, as tokio's own `try_read_buf` does.
#![allow(unsafe_code)]

use std::io::{self, IoSlice};
use std::os::fd::AsFd;

use bytes::BytesMut;
use rustix::net::{RecvFlags, SendFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// `recv(2)` into `buf`.
pub fn recv(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::net::recv(fd, buf, RecvFlags::empty())?.0)
}

/// `recv(2)` into `buf`'s spare capacity, extending it by what came.
pub fn recv_buf(fd: impl AsFd, buf: &mut BytesMut) -> io::Result<usize> {
    let ((got, _), _) = rustix::net::recv(fd, buf.spare_capacity_mut(), RecvFlags::empty())?;
    let n = got.len();
    // SAFETY: `recv` initialized the first `n` bytes of the spare capacity (`got` is them).
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `send(2)`, without `SIGPIPE` on a closed connection (an error instead, as std does).
pub fn send(fd: impl AsFd, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(fd, buf, SendFlags::NOSIGNAL)?)
}

/// `sendmsg(2)` of several slices at once, without `SIGPIPE`.
pub fn send_vectored(fd: impl AsFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    Ok(rustix::net::sendmsg(
        fd,
        bufs,
        &mut rustix::net::SendAncillaryBuffer::default(),
        SendFlags::NOSIGNAL,
    )?)
}

/// `TcpStream::try_read`, by `recv`: `WouldBlock` without a syscall unless the socket is
/// readable, and its readiness forgotten on `WouldBlock`.
pub fn try_recv(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    s.try_io(Interest::READABLE, || recv(s, buf))
}

/// `TcpStream::try_write`, by `send`.
pub fn try_send(s: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    s.try_io(Interest::WRITABLE, || send(s, buf))
}

/// `TcpStream::try_write_vectored`, by `sendmsg`.
pub fn try_send_vectored(s: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    s.try_io(Interest::WRITABLE, || send_vectored(s, bufs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_and_writes_a_socket_pair() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        assert_eq!(send(&b, b"hello").unwrap(), 5);
        assert_eq!(
            send_vectored(&b, &[IoSlice::new(b", "), IoSlice::new(b"world")]).unwrap(),
            7
        );
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(b">");
        let mut got = 0;
        while got < 12 {
            got += recv_buf(&a, &mut buf).unwrap();
        }
        assert_eq!(&buf[..], b">hello, world");
        a.write_all(b"xy").unwrap();
        let mut small = [0u8; 8];
        assert_eq!(recv(&b, &mut small).unwrap(), 2);
        assert_eq!(&small[..2], b"xy");
        // A read on a non-blocking socket with nothing queued: WouldBlock, as tokio expects.
        b.set_nonblocking(true).unwrap();
        let e = recv(&b, &mut small).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // A write after the peer is gone: an error, not a SIGPIPE that kills the process.
        drop(a);
        let mut failed = false;
        for _ in 0..100 {
            if send(&b, &[0u8; 1024]).is_err() {
                failed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(failed);
    }
}
