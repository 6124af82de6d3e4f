//! The TLS accept loop. tonic's own TLS has no hook for revocation lists, so the server terminates
//! TLS itself with tokio-rustls (TLS 1.3 only, client certificate from the study CA required,
//! revocation list checked) and hands finished connections to tonic. The revocation list file is
//! checked every `revocation_check_s` seconds (and at each new connection): once it changes, new
//! handshakes use it, and every open connection whose client certificate it now revokes is cut
//! ([`Revocable`]), so a revoked site does not keep a live connection.

use fedhcc_core::pki::{PkiError, ServerTlsFiles, server_config};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// An established connection that the accept loop can cut: once its certificate is revoked, every
/// read and write fails (`ConnectionAborted`), which ends the connection and its streams.
pub struct Revocable<S> {
    inner: S,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Removes the connection from the live table when it closes.
    _entry: LiveEntry,
}

impl<S> Revocable<S> {
    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), std::io::Error> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the peer's certificate was revoked"))
            }
            Poll::Pending => Ok(()),
        }
    }
}

use std::future::Future as _;

impl<S: AsyncRead + Unpin> AsyncRead for Revocable<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Revocable<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The open connections (their client certificate's serial and the token that cuts them), and the
/// serials the newest revocation list revokes.
#[derive(Clone, Default)]
struct Live(Arc<Mutex<LiveTable>>);

#[derive(Default)]
struct LiveTable {
    conns: HashMap<u64, (Vec<u8>, CancellationToken)>,
    revoked: BTreeSet<Vec<u8>>,
}

/// One connection's place in [`Live`], removed when the connection is dropped.
struct LiveEntry {
    live: Live,
    id: u64,
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        self.live.lock().conns.remove(&self.id);
    }
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, LiveTable> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a connection with its client certificate's serial (empty: none presented). One
    /// whose handshake finished under an older list, and that the newest revokes, is cut at once.
    fn add(&self, id: u64, serial: Vec<u8>) -> (CancellationToken, LiveEntry) {
        let token = CancellationToken::new();
        let mut t = self.lock();
        if !serial.is_empty() && t.revoked.contains(&serial) {
            token.cancel();
        }
        t.conns.insert(id, (serial, token.clone()));
        (token, LiveEntry { live: self.clone(), id })
    }

    /// Records the newest list and cuts every connection whose serial it revokes; returns how many.
    fn cut(&self, revoked: BTreeSet<Vec<u8>>) -> usize {
        let mut t = self.lock();
        let mut n = 0;
        for (serial, token) in t.conns.values() {
            if !serial.is_empty() && revoked.contains(serial) && !token.is_cancelled() {
                token.cancel();
                n += 1;
            }
        }
        t.revoked = revoked;
        n
    }
}

/// The serials the revocation list at `path` revokes.
///
/// # Errors
/// The list cannot be read or parsed.
fn revoked_serials(path: &Path) -> Result<BTreeSet<Vec<u8>>, PkiError> {
    let mut out = BTreeSet::new();
    for crl in fedhcc_core::pki::load_crls(path)? {
        let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
            .map_err(|e| PkiError::Invalid(format!("{}: not a revocation list: {e}", path.display())))?;
        out.extend(parsed.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()));
    }
    Ok(out)
}

/// The serial of a connection's client certificate (empty when none was presented).
fn client_serial(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok().map(|(_, x)| x.raw_serial().to_vec()))
        .unwrap_or_default()
}

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS handshakes in progress at once. A new connection beyond it drops the oldest handshake
/// still pending: a real client's handshake takes milliseconds, so idle connections opened to use
/// up the server (a thousand of them, say) are shed while real sites get through.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// The handshakes in progress, oldest first (ids only grow), each with the token that drops it.
#[derive(Clone, Default)]
struct Pending(Arc<Mutex<std::collections::BTreeMap<u64, CancellationToken>>>);

/// A handshake's place in [`Pending`], given up when the handshake ends either way.
struct PendingEntry {
    pending: Pending,
    id: u64,
}

impl Drop for PendingEntry {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
    }
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, CancellationToken>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers handshake `id`, dropping the oldest when [`MAX_PENDING_HANDSHAKES`] are pending;
    /// returns whether one was dropped.
    fn add(&self, id: u64) -> (CancellationToken, PendingEntry, bool) {
        let token = CancellationToken::new();
        let mut p = self.lock();
        let shed = p.len() >= MAX_PENDING_HANDSHAKES;
        if shed && let Some((_, oldest)) = p.pop_first() {
            oldest.cancel();
        }
        p.insert(id, token.clone());
        (token, PendingEntry { pending: self.clone(), id }, shed)
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Accepts TCP connections, completes the TLS handshake off the accept path, and sends the
/// established streams to tonic through `out`. Ends when `shutdown` is cancelled.
pub async fn accept_loop(
    listener: TcpListener,
    initial: rustls::ServerConfig,
    files: ServerTlsFiles,
    revocation_check: Duration,
    out: mpsc::Sender<Result<Revocable<TlsStream<TcpStream>>, std::io::Error>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    accept_loop_with(listener, initial, files, server_config, revocation_check, out, shutdown, tracker).await;
}

/// The revocation list as the accept loop holds it: its file's stamp, and the acceptor made with it.
struct Revocations {
    files: ServerTlsFiles,
    rebuild: fn(&ServerTlsFiles) -> Result<rustls::ServerConfig, PkiError>,
    stamp: Option<(SystemTime, u64)>,
    acceptor: TlsAcceptor,
    live: Live,
}

impl Revocations {
    /// When the list's file changed: a new acceptor, and every open connection it revokes cut.
    fn refresh(&mut self) {
        let now = stamp(&self.files.crl);
        if now == self.stamp {
            return;
        }
        match (self.rebuild)(&self.files).and_then(|cfg| Ok((cfg, revoked_serials(&self.files.crl)?))) {
            Ok((cfg, revoked)) => {
                self.acceptor = TlsAcceptor::from(Arc::new(cfg));
                self.stamp = now;
                let cut = self.live.cut(revoked);
                tracing::info!(crl = %self.files.crl.display(), open_connections_cut = cut, "revocation list reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "revocation list changed but cannot be read; keeping the previous one")
            }
        }
    }
}

/// [`accept_loop`] for another TLS configuration (the dashboard's): `rebuild` makes it again from
/// `files` when the revocation list changes.
#[allow(clippy::too_many_arguments)]
pub async fn accept_loop_with(
    listener: TcpListener,
    initial: rustls::ServerConfig,
    files: ServerTlsFiles,
    rebuild: fn(&ServerTlsFiles) -> Result<rustls::ServerConfig, PkiError>,
    revocation_check: Duration,
    out: mpsc::Sender<Result<Revocable<TlsStream<TcpStream>>, std::io::Error>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut rev = Revocations {
        stamp: stamp(&files.crl),
        files,
        rebuild,
        acceptor: TlsAcceptor::from(Arc::new(initial)),
        live: Live::default(),
    };
    let mut tick = tokio::time::interval(revocation_check.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_id = 0u64;
    let pending = Pending::default();
    let mut shed_total = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                rev.refresh();
                continue;
            }
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        rev.refresh();
        let acceptor = rev.acceptor.clone();
        let live = rev.live.clone();
        next_id += 1;
        let id = next_id;
        let out = out.clone();
        let token = shutdown.clone();
        let (dropped, slot, shed) = pending.add(id);
        if shed {
            shed_total += 1;
            if shed_total.is_power_of_two() {
                tracing::warn!(
                    shed_total,
                    limit = MAX_PENDING_HANDSHAKES,
                    "too many TLS handshakes in progress; the oldest pending ones are dropped"
                );
            }
        }
        tracker.spawn(async move {
            let _slot = slot;
            let handshake = tokio::select! {
                _ = token.cancelled() => return,
                _ = dropped.cancelled() => return,
                h = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => h,
            };
            match handshake {
                Ok(Ok(tls)) => {
                    let (cut, entry) = live.add(id, client_serial(&tls));
                    let stream = Revocable { inner: tls, cut: Box::pin(cut.cancelled_owned()), _entry: entry };
                    let _ = out.send(Ok(stream)).await;
                }
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
