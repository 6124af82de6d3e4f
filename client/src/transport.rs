//! The client's side of the wire: mutual-TLS channel, chunked download and upload. With the
//! server's service layer, the only place prost types are used.

use fedhcc_core::params::{ParameterSet, PayloadReader, sha256_hex};
use fedhcc_core::pki::ClientTlsFiles;
use fedhcc_proto as pb;
use fedhcc_proto::MAX_CHUNK_BYTES;
use pb::federation_client::FederationClient;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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

fn read(path: &std::path::Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::Files { path: path.to_path_buf(), source })
}

/// Opens a mutual-TLS channel. Note that a refused certificate shows on the first call, not here.
///
/// # Errors
/// Unreadable certificate files, a bad address, or no connection.
pub async fn connect(target: &ServerTarget) -> Result<FederationClient<Channel>, TransportError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&target.tls.ca)?))
        .identity(Identity::from_pem(read(&target.tls.cert)?, read(&target.tls.key)?))
        .domain_name(target.server_name.clone());
    let endpoint = Endpoint::from_shared(target.url.clone())
        .map_err(|_| TransportError::Address(target.url.clone()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await?;
    Ok(FederationClient::new(channel)
        .max_decoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fedhcc_proto::MAX_MESSAGE_BYTES))
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
    let mut received = 0usize;
    let mut hasher = Sha256::new();
    while let Some(part) = stream.message().await? {
        let Some(pb::model_part::Part::Chunk(c)) = part.part else {
            return Err(TransportError::Damaged("a second header inside the download".into()));
        };
        if c.len() > MAX_CHUNK_BYTES || received + c.len() > total {
            return Err(TransportError::Damaged("the download is longer than announced".into()));
        }
        received += c.len();
        hasher.update(&c);
        reader
            .push(&c, |off, vals| {
                debug_assert_eq!(off, values.len());
                values.extend_from_slice(vals);
            })
            .map_err(|e| TransportError::Damaged(e.to_string()))?;
    }
    if received != total {
        return Err(TransportError::Damaged(format!("received {received} of {total} bytes")));
    }
    let got = hex::encode(hasher.finalize());
    if got != header.sha256 {
        return Err(TransportError::Damaged(format!("SHA-256 {got} differs from the announced {}", header.sha256)));
    }
    reader.finish().map_err(|e| TransportError::Damaged(e.to_string()))?;
    let layout = reader.layout().cloned().ok_or_else(|| TransportError::Damaged("no model header".into()))?;
    let params = ParameterSet::new(layout, values).map_err(|e| TransportError::Damaged(e.to_string()))?;
    if params.fingerprint().to_hex() != header.model_fingerprint {
        return Err(TransportError::Damaged("the model's layout differs from its header".into()));
    }
    Ok((params, total as u64))
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
