//! The TLS accept loop. tonic's own TLS has no hook for revocation lists, so the server terminates
//! TLS itself with tokio-rustls (TLS 1.3 only, client certificate from the study CA required,
//! revocation list checked) and hands finished connections to tonic. The revocation list is read
//! again whenever its file changes, so a revoked site is refused on its next connection.

use fedhcc_core::pki::{PkiError, ServerTlsFiles, server_config};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    out: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    accept_loop_with(listener, initial, files, server_config, out, shutdown, tracker).await;
}

/// [`accept_loop`] for another TLS configuration (the dashboard's): `rebuild` makes it again from
/// `files` when the revocation list changes.
pub async fn accept_loop_with(
    listener: TcpListener,
    initial: rustls::ServerConfig,
    files: ServerTlsFiles,
    rebuild: fn(&ServerTlsFiles) -> Result<rustls::ServerConfig, PkiError>,
    out: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut acceptor = TlsAcceptor::from(Arc::new(initial));
    let mut crl_stamp = stamp(&files.crl);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
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
        let now = stamp(&files.crl);
        if now != crl_stamp {
            match rebuild(&files) {
                Ok(cfg) => {
                    acceptor = TlsAcceptor::from(Arc::new(cfg));
                    crl_stamp = now;
                    tracing::info!(crl = %files.crl.display(), "revocation list reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "revocation list changed but cannot be read; keeping the previous one")
                }
            }
        }
        let acceptor = acceptor.clone();
        let out = out.clone();
        let token = shutdown.clone();
        tracker.spawn(async move {
            let handshake = tokio::select! {
                _ = token.cancelled() => return,
                h = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => h,
            };
            match handshake {
                Ok(Ok(tls)) => {
                    let _ = out.send(Ok(tls)).await;
                }
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
