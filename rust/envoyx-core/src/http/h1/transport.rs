//! What the HTTP/1 codec needs of a byte stream: readiness without a buffer, then
//! non-blocking reads and writes. An idle connection waits in `poll_read_ready`
//! and only takes a buffer once bytes are there.
//!
//! TLS fits under the same trait: its `poll_read_ready` is Ready at once when the
//! TLS session already holds decrypted bytes (else the socket's readiness), and its
//! `try_read` decrypts into the caller's buffer; the TLS library's own record
//! buffers are then the only per-connection buffers an idle TLS connection keeps.

use std::io;
use std::task::{Context, Poll};

use tokio::net::TcpStream;

pub trait Transport: 'static {
    /// Ready when a read may make progress (bytes, end of stream or an error).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads what is there; `WouldBlock` when nothing is.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    /// Ready once what was written is with the kernel (TLS may hold records back
    /// when the socket is full); a plain socket always is.
    fn poll_flush(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    /// Sends end-of-stream (a FIN) after what was written.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Transport for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        socket2::SockRef::from(self).shutdown(std::net::Shutdown::Write)
    }
}

/// Reads into `buf` once something is there.
pub fn poll_read<T: Transport + ?Sized>(
    io: &T,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(io.poll_read_ready(cx))?;
        match io.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}

/// Writes some of `buf` once the stream takes bytes.
pub fn poll_write<T: Transport + ?Sized>(
    io: &T,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(io.poll_write_ready(cx))?;
        match io.try_write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}
