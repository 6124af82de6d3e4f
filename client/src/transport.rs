//! The client's side of the wire: mutual-TLS channel, chunked download and upload. With the
//! server's service layer, the only place prost types are used.
//!
//! The TLS connection is made here, not by tonic: tonic's client TLS offers TLS 1.2 as well and
//! has no setting to turn it off, so [`connect`] dials TCP, runs a TLS 1.3-only handshake
//! ([`fedhcc_core::pki::client_config`], which also refuses an expired certificate of ours or of
//! the study CA) and hands the finished stream to tonic.

use fedhcc_core::params::{ParameterSet, PayloadReader, sha256_hex};
use fedhcc_core::pki::{ClientTlsFiles, PkiError};
use fedhcc_proto as pb;
use fedhcc_proto::MAX_CHUNK_BYTES;
use fedhcc_proto::chunks::{ChunkError, ChunkReceiver};
use pb::admin_client::AdminClient;
use pb::federation_client::FederationClient;
use std::sync::Arc;
use std::time::Duration;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

/// A failure talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {source}")]
    Files { path: std::path::PathBuf, source: std::io::Error },
    #[error("server address '{0}' is not valid")]
    Address(String),
    #[error("cannot connect to the server: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the server refused: {} ({:?})", .0.message(), .0.code())]
    Status(#[from] tonic::Status),
    #[error("the model received is damaged: {0}")]
    Damaged(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] PkiError),
}

impl TransportError {
    /// Whether trying again later could help (network trouble, server restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            TransportError::Connect(_) => true,
            TransportError::Status(s) => matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Internal
                    // Joined too often: the server's rate limit; the backoff waits it out.
                    | tonic::Code::ResourceExhausted
            ),
            TransportError::Damaged(_) => true,
            _ => false,
        }
    }
}

/// Where and how to reach the server.
#[derive(Clone, Debug)]
pub struct ServerTarget {
    pub url: String,
    pub server_name: String,
    pub tls: ClientTlsFiles,
}

/// `host:port` of an `https://host[:port]` server address (port 443 when left out).
fn authority(url: &str) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("https") || uri.path().len() > 1 || uri.query().is_some() {
        return None;
    }
    let a = uri.authority()?;
    if a.as_str().contains('@') {
        return None;
    }
    Some(format!("{}:{}", a.host(), a.port_u16().unwrap_or(443)))
}

/// Opens a mutual-TLS (1.3 only) channel. Note that a refused certificate shows on the first call,
/// not here.
///
/// # Errors
/// Unreadable, invalid or expired certificate files, a bad address, or no connection.
pub async fn connect(target: &ServerTarget) -> Result<FederationClient<Channel>, TransportError> {
    Ok(FederationClient::new(channel(target).await?)
        .max_decoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES))
}

/// Opens a mutual-TLS channel to the study lead's admin RPCs (start, pause, resume, abort,
/// allow-list, export); the server accepts them from the admin certificate only.
///
/// # Errors
/// Unreadable certificate files, a bad address, or no connection.
pub async fn connect_admin(target: &ServerTarget) -> Result<AdminClient<Channel>, TransportError> {
    Ok(AdminClient::new(channel(target).await?)
        .max_decoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES))
}

/// The mutual-TLS (1.3 only) channel under [`connect`] and [`connect_admin`].
///
/// # Errors
/// Unreadable, invalid or expired certificate files, a bad address, or no connection.
async fn channel(target: &ServerTarget) -> Result<Channel, TransportError> {
    let tls = tokio_rustls::TlsConnector::from(Arc::new(fedhcc_core::pki::client_config(&target.tls)?));
    let name = rustls::pki_types::ServerName::try_from(target.server_name.clone())
        .map_err(|_| TransportError::Address(format!("server_name '{}'", target.server_name)))?;
    let addr = authority(&target.url).ok_or_else(|| {
        TransportError::Address(format!("{} (expected https://host:port, without a path)", target.url))
    })?;
    // tonic sees a plain stream: the TLS connection is ours (the scheme only fills `:scheme`).
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| TransportError::Address(target.url.clone()))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let dial = tower::service_fn(move |_: Uri| {
        let (tls, name, addr) = (tls.clone(), name.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector(dial).await?)
}

/// Downloads the global model of a task and checks its length, SHA-256 and layout fingerprint.
///
/// # Errors
/// A refused request, a broken stream, or a model that does not match its header.
pub async fn download(
    client: &mut FederationClient<Channel>,
    task: pb::TaskRef,
    expect_sha: &str,
) -> Result<(ParameterSet, u64), TransportError> {
    download_digest(client, task, expect_sha).await.map(|(p, n, _)| (p, n))
}

/// [`download`], also returning the SHA-256 of the payload received (for the audit log).
///
/// # Errors
/// As [`download`].
pub async fn download_digest(
    client: &mut FederationClient<Channel>,
    task: pb::TaskRef,
    expect_sha: &str,
) -> Result<(ParameterSet, u64, [u8; 32]), TransportError> {
    let mut stream = client.download_model(task).await?.into_inner();
    let header = match stream.message().await? {
        Some(pb::ModelPart { part: Some(pb::model_part::Part::Header(h)) }) => h,
        _ => return Err(TransportError::Damaged("the download did not start with a header".into())),
    };
    if !expect_sha.is_empty() && header.sha256 != expect_sha {
        return Err(TransportError::Damaged(format!(
            "the server offers model {} but the task named {expect_sha}",
            header.sha256
        )));
    }
    let total = usize::try_from(header.total_bytes).map_err(|_| TransportError::Damaged("model too large".into()))?;
    if total > fedhcc_core::params::MAX_PARAMS * 4 + fedhcc_core::params::MAX_HEADER_LEN {
        return Err(TransportError::Damaged(format!(
            "the model declares {total} bytes, more than this client accepts"
        )));
    }
    // Decoded as it arrives, straight into the model's values: one model-sized allocation.
    let mut reader = PayloadReader::new();
    let mut values: Vec<f32> = Vec::with_capacity(total / 4);
    let mut receiver = ChunkReceiver::new(header.total_bytes, None);
    let damaged = |e: ChunkError| TransportError::Damaged(format!("the model download was refused: {e}"));
    while let Some(part) = stream.message().await? {
        let Some(pb::model_part::Part::Chunk(c)) = part.part else {
            return Err(TransportError::Damaged("a second header inside the download".into()));
        };
        receiver.accept(&c).map_err(damaged)?;
        reader
            .push(&c, |off, vals| {
                debug_assert_eq!(off, values.len());
                values.extend_from_slice(vals);
            })
            .map_err(|e| TransportError::Damaged(e.to_string()))?;
    }
    let digest = receiver.finish(&header.sha256).map_err(damaged)?;
    reader.finish().map_err(|e| TransportError::Damaged(e.to_string()))?;
    let layout = reader.layout().cloned().ok_or_else(|| TransportError::Damaged("no model header".into()))?;
    let params = ParameterSet::new(layout, values).map_err(|e| TransportError::Damaged(e.to_string()))?;
    if params.fingerprint().to_hex() != header.model_fingerprint {
        return Err(TransportError::Damaged("the model's layout differs from its header".into()));
    }
    Ok((params, total as u64, digest))
}

/// Uploads an update (a delta) as a header and chunks of at most 1 MiB.
///
/// # Errors
/// A refused or broken upload.
pub async fn upload(
    client: &mut FederationClient<Channel>,
    task: pb::TaskRef,
    delta: &ParameterSet,
    num_samples: u64,
    metrics: Vec<(String, f64)>,
) -> Result<u64, TransportError> {
    let payload = bytes::Bytes::from(delta.encode());
    let header = pb::UpdateHeader {
        task: Some(task),
        model_fingerprint: delta.fingerprint().to_hex(),
        num_samples,
        total_bytes: payload.len() as u64,
        sha256: sha256_hex(&payload),
        chunks: payload.len().div_ceil(MAX_CHUNK_BYTES) as u32,
        metrics: metrics.into_iter().map(|(name, value)| pb::Metric { name, value }).collect(),
        encoding: String::new(),
        roster_digest: Default::default(),
        encoded_weight: 0,
    };
    let n = payload.len() as u64;
    let first = pb::UploadPart { part: Some(pb::upload_part::Part::Header(header)) };
    let chunks = (0..payload.len().div_ceil(MAX_CHUNK_BYTES)).map(move |i| {
        let end = ((i + 1) * MAX_CHUNK_BYTES).min(payload.len());
        pb::UploadPart { part: Some(pb::upload_part::Part::Chunk(payload.slice(i * MAX_CHUNK_BYTES..end))) }
    });
    let stream = tokio_stream::iter(std::iter::once(first).chain(chunks));
    client.upload_update(stream).await?;
    Ok(n)
}

/// Secure aggregation: waits for the task's roster (the server answers once the key exchange has
/// closed).
///
/// # Errors
/// A refused request (the task closed, or the roster was fixed without this site) or a broken
/// connection.
pub async fn await_roster(
    client: &mut FederationClient<Channel>,
    task: pb::TaskRef,
) -> Result<pb::KeyRoster, TransportError> {
    Ok(client.await_roster(task).await?.into_inner())
}

/// Uploads a masked update (`header.encoding` = `secagg-u64`, its SHA-256 and chunk count already
/// set for `payload`) in chunks of at most 1 MiB.
///
/// # Errors
/// A refused or broken upload.
pub async fn upload_masked(
    client: &mut FederationClient<Channel>,
    header: pb::UpdateHeader,
    payload: bytes::Bytes,
) -> Result<u64, TransportError> {
    let n = payload.len() as u64;
    let first = pb::UploadPart { part: Some(pb::upload_part::Part::Header(header)) };
    let chunks = (0..payload.len().div_ceil(MAX_CHUNK_BYTES)).map(move |i| {
        let end = ((i + 1) * MAX_CHUNK_BYTES).min(payload.len());
        pb::UploadPart { part: Some(pb::upload_part::Part::Chunk(payload.slice(i * MAX_CHUNK_BYTES..end))) }
    });
    client.upload_update(tokio_stream::iter(std::iter::once(first).chain(chunks))).await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_must_be_https_host_and_port() {
        assert_eq!(authority("https://study.example.org:50051").as_deref(), Some("study.example.org:50051"));
        assert_eq!(authority("https://127.0.0.1:7").as_deref(), Some("127.0.0.1:7"));
        assert_eq!(authority("https://[::1]:9/").as_deref(), Some("[::1]:9"));
        assert_eq!(authority("https://study.example.org").as_deref(), Some("study.example.org:443"));
        for bad in ["http://x:1", "https://x:1/path", "https://user@x:1", "https://x:1?q=1", "x:1", "", "https://"] {
            assert_eq!(authority(bad), None, "{bad}");
        }
    }
}
