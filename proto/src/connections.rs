//! What a server lets in: at most `--max-connections` connections held at once per listener
//! (past it a new one is closed at once, so the clients already connected keep their file
//! descriptors and their CPU), and a connection that sends nothing within
//! [`FIRST_BYTE_TIMEOUT`] is closed. Once talking, a connection is watched by HTTP/2
//! keepalive ([`crate::server::builder`]), which closes dead peers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Longest a new plaintext connection may stay silent before it is closed (a TLS one has
/// [`crate::tls::HANDSHAKE_TIMEOUT`] instead).
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one listener holds at once unless `--max-connections` says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// File descriptors kept for everything but accepted connections (the store, etcd, the
/// connections this process opens): the connection limit stays this far below the
/// process's descriptor limit.
pub const RESERVED_FDS: usize = 256;

static MAX_CONNECTIONS: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_CONNECTIONS);
/// Connections refused for want of a place, over the process's life (logged sparingly).
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Sets the connection limit of the listeners this process opens from now on, within its
/// file-descriptor limit, which it first raises to the hard limit (as Go's runtime does).
/// Returns the limit in force.
pub fn set_max_connections(wanted: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let fds = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => nix::libc::rlim_t::MAX, // 32 bits on armv7
    };
    let room = usize::try_from(fds)
        .unwrap_or(usize::MAX)
        .saturating_sub(RESERVED_FDS)
        .max(1);
    let max = wanted.clamp(1, room);
    if max < wanted {
        tracing::warn!(
            wanted,
            max,
            fds,
            "--max-connections is above the file-descriptor limit; raise `ulimit -n`"
        );
    }
    MAX_CONNECTIONS.store(max, Ordering::Relaxed);
    max
}

/// The places of one listener.
#[derive(Clone)]
pub struct Places(Arc<Semaphore>);

impl Places {
    /// As many places as the process's connection limit.
    pub fn new() -> Self {
        Self::with(MAX_CONNECTIONS.load(Ordering::Relaxed))
    }

    pub fn with(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max)))
    }

    /// A place for a connection just accepted, or `None`: then the caller closes it.
    pub fn take(&self, peer: std::net::SocketAddr) -> Option<OwnedSemaphorePermit> {
        let place = self.0.clone().try_acquire_owned().ok();
        if place.is_none() {
            let refused = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
            // A flood would flood the log too: the 1st, 2nd, 4th, 8th... refusal.
            if refused.is_power_of_two() {
                tracing::warn!(%peer, refused, "connection refused: the server holds its limit of connections (--max-connections)");
            }
        }
        place
    }
}

impl Default for Places {
    fn default() -> Self {
        Self::new()
    }
}

/// An accepted connection holding its place (given back when it closes), and, until its
/// peer's first byte, the deadline for it.
pub struct Admitted<IO> {
    io: IO,
    first_byte: Option<Pin<Box<Sleep>>>,
    _place: OwnedSemaphorePermit,
}

impl<IO> Admitted<IO> {
    /// `io` in `place`; with `first_byte`, closed unless its peer sends within it.
    pub fn new(io: IO, place: OwnedSemaphorePermit, first_byte: Option<Duration>) -> Self {
        Self {
            io,
            first_byte: first_byte.map(|d| Box::pin(tokio::time::sleep(d))),
            _place: place,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Admitted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.first_byte.as_mut() else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.first_byte = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer sent nothing within {FIRST_BYTE_TIMEOUT:?}"),
                )))
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Admitted<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Waits (bounded) until the server closes `client`'s connection.
    async fn closed(client: &mut TcpStream) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut byte)).await;
        match read.expect("closed within 10 s") {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("the server sent {n} bytes"),
        }
    }

    #[tokio::test]
    async fn a_listener_holds_its_limit_and_closes_silent_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first_byte = Duration::from_millis(500);
        // The server's accept loop runs on its own, as a server's does.
        let (tx, mut incoming) = tokio::sync::mpsc::channel(4);
        let accepting = tokio::spawn(async move {
            let mut accepted = Box::pin(crate::tls::accept_with(
                listener,
                None,
                Places::with(2),
                first_byte,
            ));
            while let Some(io) = accepted.next().await {
                if tx.send(io).await.is_err() {
                    return;
                }
            }
        });

        // Two places: a talking client and a silent one take them.
        let mut talking = TcpStream::connect(addr).await.unwrap();
        talking.write_all(b"x").await.unwrap();
        let mut talking_io = incoming.recv().await.unwrap().unwrap();
        // Its deadline starts when it is accepted, which is after this.
        let before_silent = Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let silent_io = incoming.recv().await.unwrap().unwrap();

        // A third is closed at once, and the listener serves on.
        let mut third = TcpStream::connect(addr).await.unwrap();
        closed(&mut third).await;

        // The silent one is closed at its deadline, not before; the talking one is not.
        let server_side = tokio::spawn(async move {
            let mut silent_io = silent_io;
            let mut byte = [0u8; 1];
            silent_io.read(&mut byte).await
        });
        let read = server_side.await.unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
        let waited = before_silent.elapsed();
        assert!(waited >= first_byte, "closed after {waited:?}");
        closed(&mut silent).await;
        let mut byte = [0u8; 1];
        talking_io.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x");

        // The silent one's place is free again: the next client is let in.
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        fourth.write_all(b"y").await.unwrap();
        let mut fourth_io = tokio::time::timeout(Duration::from_secs(10), incoming.recv())
            .await
            .expect("let in")
            .unwrap()
            .unwrap();
        fourth_io.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"y");
        drop(talking);
        accepting.abort();
    }
}
