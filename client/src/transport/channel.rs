//! The mutual-TLS (1.3 only) channel to the server: our own handshake under tonic, because tonic's
//! client TLS offers TLS 1.2 as well and has no setting to turn it off.

use super::{ServerTarget, TransportError};

use fedhcc_proto::admin_client::AdminClient;
use fedhcc_proto::federation_client::FederationClient;
use std::sync::Arc;
use std::time::Duration;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

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
