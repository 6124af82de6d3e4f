//! Who may talk to the server: certificates from another CA, revoked, expired, unknown sites, no
//! certificate, plaintext, and the admin role. Every case is a real TLS 1.3 connection on loopback;
//! a refused handshake shows on the first call (not on `connect`).

use crate::harness::*;
use fedhcc_core::pki::{self, ClientTlsFiles, Role, Validity};
use fedhcc_proto as pb;
use std::time::Duration;

async fn join(server: &TestServer, tls: ClientTlsFiles) -> Result<pb::JoinReply, String> {
    let target = server.target(tls);
    let mut c = match fedhcc_client::transport::connect(&target).await {
        Ok(c) => c,
        Err(e) => return Err(e.to_string()),
    };
    c.join(pb::JoinRequest { study_id: STUDY.into(), ..Default::default() })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// Whether a connection through `endpoint` fails, at connect or on its first call.
async fn refused(endpoint: tonic::transport::Endpoint) -> bool {
    match endpoint.connect().await {
        Err(_) => true,
        Ok(ch) => pb::federation_client::FederationClient::new(ch).join(pb::JoinRequest::default()).await.is_err(),
    }
}

async fn setup(sites: &[&str], allowed: &[&str]) -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), sites);
    let server = start_server(tmp.path(), allowed, study(1, 2, 30), model(10)).await;
    (tmp, server)
}

#[tokio::test]
async fn accepts_a_site_of_the_study_ca() {
    let (_t, server) = setup(&["a", "b"], &["a", "b"]).await;
    let r = join(&server, server.site_tls("a")).await.expect("join");
    assert_eq!((r.study_id.as_str(), r.run_id.as_str(), r.total_rounds), (STUDY, "run-1", 1));
    server.stop().await;
}

#[tokio::test]
async fn rejects_client_cert_from_another_ca() {
    let (t, server) = setup(&["a"], &["a"]).await;
    let other = t.path().join("other");
    pki::init(&other, STUDY, "localhost", &["a".into()], None, 2).unwrap();
    let oc = pki::CertDir::new(&other);
    // Trusts the real server CA, presents a certificate signed by another CA with the same name.
    let tls = ClientTlsFiles { ca: server.certs().ca(), cert: oc.site("a"), key: oc.site_key("a"), crl: None };
    let err = join(&server, tls).await.unwrap_err();
    assert!(!err.is_empty(), "refused: {err}");
    assert!(join(&server, server.site_tls("a")).await.is_ok(), "the real site still works");
    server.stop().await;
}

#[tokio::test]
async fn rejects_revoked_site_on_next_connection() {
    let (_t, server) = setup(&["a", "b"], &["a", "b"]).await;
    join(&server, server.site_tls("b")).await.expect("before revocation");
    pki::revoke(&server.certs().dir, Role::Site, "b").unwrap();
    let err = join(&server, server.site_tls("b")).await.unwrap_err();
    assert!(!err.is_empty());
    join(&server, server.site_tls("a")).await.expect("other sites unaffected");
    server.stop().await;
}

#[tokio::test]
async fn rejects_expired_client_cert() {
    let (_t, server) = setup(&["a"], &["a", "late"]).await;
    let now = time::OffsetDateTime::now_utc();
    let v = Validity { not_before: now - time::Duration::days(10), not_after: now - time::Duration::days(1) };
    pki::issue(&server.certs().dir, Role::Site, "late", v).unwrap();
    let err = join(&server, server.site_tls("late")).await.unwrap_err();
    assert!(!err.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn rejects_site_not_on_the_allow_list() {
    let (_t, server) = setup(&["a", "intruder"], &["a"]).await;
    let err = join(&server, server.site_tls("intruder")).await.unwrap_err();
    assert!(err.contains("PermissionDenied") && err.contains("allow-list"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn rejects_a_client_without_certificate() {
    let (_t, server) = setup(&["a"], &["a"]).await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(server.certs().ca()).unwrap()))
        .domain_name("localhost");
    assert!(refused(tonic::transport::Endpoint::from_shared(server.url()).unwrap().tls_config(tls).unwrap()).await);
    server.stop().await;
}

#[tokio::test]
async fn rejects_plaintext_connections() {
    let (_t, server) = setup(&["a"], &["a"]).await;
    let url = format!("http://{}", server.addr);
    let ch =
        tonic::transport::Endpoint::from_shared(url).unwrap().connect_timeout(Duration::from_secs(5)).connect().await;
    let refused = match ch {
        Err(_) => true,
        Ok(ch) => pb::federation_client::FederationClient::new(ch).join(pb::JoinRequest::default()).await.is_err(),
    };
    assert!(refused);
    server.stop().await;
}

#[tokio::test]
async fn status_needs_the_admin_role() {
    let (_t, server) = setup(&["a"], &["a"]).await;
    let err = server.client_as("a").await.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("admin"), "{}", err.message());
    let s = server.status().await;
    assert_eq!((s.phase.as_str(), s.current_round, s.total_rounds), ("waiting_for_sites", 1, 1));
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_site_s_open_connection_is_cut_within_the_revocation_check() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path(), &["a", "b"]);
    let config = fedhcc_core::config::ServerConfig { revocation_check_s: 1, ..server_config(tmp.path(), &["a", "b"]) };
    let server = start_server_with(tmp.path(), config, study(1, 2, 30), model(10)).await;
    // Site b is connected and waiting for tasks, on one long-lived connection.
    let (mut a, mut b) = (server.client_as("a").await, server.client_as("b").await);
    let (mut ta, mut tb) = (open_tasks(&mut a).await, open_tasks(&mut b).await);
    next_train(&mut tb).await;
    pki::revoke(&server.certs().dir, Role::Site, "b").unwrap();
    let revoked = std::time::Instant::now();
    // Its stream ends (an error or the end), well within twice the check interval; heartbeats do
    // not keep it alive.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tb.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "b's connection is still open 5 s after its revocation");
    assert!(revoked.elapsed() < Duration::from_secs(3), "cut after {:?}", revoked.elapsed());
    // b cannot come back; a's connection is untouched.
    assert!(join(&server, server.site_tls("b")).await.is_err());
    let status = server.status().await;
    assert!(status.sites.iter().any(|s| s.site_id == "a" && s.connected), "{status:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ta.message()).await.map_or(true, |m| m.is_ok()),
        "a's stream is still open"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_site_holding_the_crl_refuses_a_revoked_server_certificate() {
    let (_t, server) = setup(&["a", "b"], &["a", "b"]).await;
    let with_crl = ClientTlsFiles { crl: Some(server.certs().crl()), ..server.site_tls("a") };
    join(&server, with_crl.clone()).await.expect("the server's certificate is valid");
    // The study lead revokes the server's certificate (its key was stolen, say) and ships the list.
    pki::revoke(&server.certs().dir, Role::Server, "localhost").unwrap();
    let err = join(&server, with_crl).await.unwrap_err();
    assert!(err.to_lowercase().contains("revoked"), "the operator is told why: {err}");
    // A site without the list checks the CA alone (which is why sites are sent the list).
    join(&server, server.site_tls("a")).await.expect("without the list");
    // A new server certificate (same name only), and the server restarted with it: accepted again.
    let dir = server.dir.clone();
    assert!(pki::issue(&server.certs().dir, Role::Server, "elsewhere", Validity::days(30)).is_err());
    pki::issue(&server.certs().dir, Role::Server, "localhost", Validity::days(30)).unwrap();
    server.stop().await;
    let server = start_server(&dir, &["a", "b"], study(1, 2, 30), model(10)).await;
    let with_crl = ClientTlsFiles { crl: Some(server.certs().crl()), ..server.site_tls("a") };
    join(&server, with_crl).await.expect("the new server certificate");
    server.stop().await;
}
