//! What a connection needs from its socket: readiness it can poll in place,
//! and reads and writes that never block. TCP in production; a Unix socket
//! pair lets tests drive one connection task with no HTTP or TCP around it.

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// A non-blocking stream socket, polled for readiness by its one task.
pub trait Socket: AsyncWrite + Unpin + Send + Sync + 'static {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// Both types have the same inherent readiness API; the trait only names it.
macro_rules! socket {
    ($ty:ty) => {
        impl Socket for $ty {
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$ty>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$ty>::poll_write_ready(self, cx)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$ty>::try_read(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$ty>::try_write(self, buf)
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                <$ty>::try_write_vectored(self, bufs)
            }
        }
    };
}

socket!(tokio::net::TcpStream);
#[cfg(unix)]
socket!(tokio::net::UnixStream);
