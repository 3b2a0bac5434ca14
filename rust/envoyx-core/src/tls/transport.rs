//! A server TLS session as the HTTP/1.1 codec's [`Transport`] (readiness, then
//! non-blocking reads and writes through `&self`), and as `AsyncRead`/`AsyncWrite`
//! for HTTP/2 and the TCP proxy.
//!
//! tokio-rustls runs the handshake; the established session is then driven here
//! from rustls' own (sans-I/O) connection, because the codec waits for readiness
//! without holding a buffer, which `TlsStream`'s `&mut` read API cannot offer.
//! rustls' record buffers are the only buffers an idle TLS connection keeps.
//!
//! Writes: plaintext is encrypted into rustls' buffer and sent as far as the socket
//! takes it; what the socket did not take goes out before the next write, on the
//! next readiness poll, or in [`Transport::poll_flush`], which the codec calls
//! before it closes or waits for the next request.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustls::ServerConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::http::h1::Transport;

/// Most plaintext encrypted per write: one TLS record's worth at a time keeps
/// rustls' send buffer small when the socket is slow.
const MAX_PLAINTEXT_PER_WRITE: usize = 16 * 1024;

pub struct TlsTransport {
    tcp: TcpStream,
    tls: RefCell<ServerConnection>,
}

/// The socket as `std::io::Read`/`Write` for rustls, without blocking.
struct Sock<'a>(&'a TcpStream);

impl Read for Sock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Sock<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsTransport {
    pub fn new(tcp: TcpStream, tls: ServerConnection) -> Self {
        TlsTransport {
            tcp,
            tls: RefCell::new(tls),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Sends what rustls holds; `WouldBlock` when the socket takes no more.
    fn send_pending(&self, tls: &mut ServerConnection) -> io::Result<()> {
        while tls.wants_write() {
            tls.write_tls(&mut Sock(&self.tcp))?;
        }
        Ok(())
    }

    /// Sends what rustls holds, waiting for the socket as needed.
    fn poll_send_pending(
        &self,
        tls: &mut ServerConnection,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.send_pending(tls) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                r => return Poll::Ready(r),
            }
        }
    }

    fn has_plaintext(tls: &mut ServerConnection) -> bool {
        match tls.process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            // The error surfaces from the next read.
            Err(_) => true,
        }
    }
}

impl Transport for TlsTransport {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut tls = self.tls.borrow_mut();
        // A response's tail still in rustls goes out first (the waker is also
        // registered for the socket's write readiness if it is full).
        if tls.wants_write()
            && let Poll::Ready(Err(e)) = self.poll_send_pending(&mut tls, cx)
        {
            return Poll::Ready(Err(e));
        }
        if Self::has_plaintext(&mut tls) {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut tls = self.tls.borrow_mut();
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify: an end like any other
                // for HTTP's framing, which knows whether the message was whole.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match tls.read_tls(&mut Sock(&self.tcp)) {
                Ok(0) => {
                    // End of the socket: let rustls see it, then read once more
                    // (what it decrypted, or the end).
                    let _ = tls.process_new_packets();
                    return match tls.reader().read(buf) {
                        Ok(n) => Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                        Err(e) => Err(e),
                    };
                }
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        // rustls queued an alert for the peer: try to send it.
                        let _ = self.send_pending(&mut tls);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    // Key updates and the like want an answer.
                    match self.send_pending(&mut tls) {
                        Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                        _ => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut tls = self.tls.borrow_mut();
        ready!(self.poll_send_pending(&mut tls, cx))?;
        Poll::Ready(Ok(()))
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut tls = self.tls.borrow_mut();
        // Nothing new is taken while older records wait for the socket.
        self.send_pending(&mut tls)?;
        let n = tls
            .writer()
            .write(&buf[..buf.len().min(MAX_PLAINTEXT_PER_WRITE)])?;
        match self.send_pending(&mut tls) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut tls = self.tls.borrow_mut();
        self.poll_send_pending(&mut tls, cx)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        let mut tls = self.tls.borrow_mut();
        tls.send_close_notify();
        let _ = self.send_pending(&mut tls);
        socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write)
    }
}

impl AsyncRead for TlsTransport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = ready!(crate::http::h1::poll_read(
            &*self,
            cx,
            buf.initialize_unfilled()
        ))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsTransport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        crate::http::h1::poll_write(&*self, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Transport::poll_flush(&*self, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut tls = self.tls.borrow_mut();
        tls.send_close_notify();
        ready!(self.poll_send_pending(&mut tls, cx))?;
        Poll::Ready(socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write))
    }
}
