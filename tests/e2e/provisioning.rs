//! Keys that never leave a site (issue #15, point 1): the study lead makes the CA and the server's
//! certificate; each site makes its own key and sends only a signing request (`fedhcc certs
//! request`), which the lead signs (`fedhcc certs sign`). A federated run with those certificates
//! completes, and the lead's folder never holds a site's key.

use crate::harness::*;
use fedhcc_core::pki::ClientTlsFiles;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Every private key file under `dir`.
fn keys_in(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".key.pem"))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn sites_that_request_their_certificates_train_and_the_lead_never_holds_their_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let certs_s = certs.to_str().unwrap();
    let (ok, _, err) =
        fedhcc(&["certs", "init", "--dir", certs_s, "--study", STUDY, "--server-name", "localhost", "--admin", "lead"]);
    assert!(ok, "{err}");

    let sign = |csr: &Path, out: &Path| {
        fedhcc(&["certs", "sign", "--dir", certs_s, "--csr", csr.to_str().unwrap(), "--out", out.to_str().unwrap()])
    };
    let mut tls = Vec::new();
    for site in ["a", "b"] {
        // At the site.
        let site_dir = tmp.path().join(format!("hospital-{site}"));
        let (ok, out, err) = fedhcc(&["certs", "request", "--site", site, "--out", site_dir.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert!(out.contains("stays here"), "{out}");
        let key = site_dir.join(format!("{site}.key.pem"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "owner-only key");
        }
        // Only the request travels to the lead, who signs it.
        let csr = tmp.path().join(format!("{site}.csr.pem"));
        std::fs::copy(site_dir.join(format!("{site}.csr.pem")), &csr).unwrap();
        let cert = tmp.path().join(format!("site-{site}.pem"));
        let (ok, out, err) = sign(&csr, &cert);
        assert!(ok, "{err}");
        assert!(out.contains(&format!("site certificate for '{site}'")), "{out}");
        // A second request for the same site is refused while the first certificate is valid.
        let (ok, _, err) = sign(&csr, &tmp.path().join("again.pem"));
        assert!(!ok && err.contains("already has a valid certificate"), "{err}");
        tls.push((site, ClientTlsFiles { ca: certs.join("ca.pem"), cert, key, crl: None }));
    }
    assert_eq!(keys_in(&certs), ["admin-lead.key.pem", "ca.key.pem", "server.key.pem"], "no site key at the lead");

    let mut server = start_server(tmp.path(), &["a", "b"], study(2, 2, 60), model(100)).await;
    let token = CancellationToken::new();
    let clients: Vec<_> = tls
        .into_iter()
        .map(|(site, files)| {
            let opts = fedhcc_client::ClientOptions { target: server.target(files), ..client_options(&server, site) };
            tokio::spawn(fedhcc_client::run(opts, shifting(1.0, 10, Duration::ZERO), token.clone()))
        })
        .collect();
    let out = server.join().await;
    assert!(out.finished && out.rounds_completed == 2, "{out:?}");
    for c in clients {
        assert!(c.await.unwrap().unwrap().finished);
    }
}

#[test]
fn a_tampered_or_misnamed_request_is_not_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    fedhcc_core::pki::init(&certs, STUDY, "localhost", &[], Some("lead"), 30).unwrap();
    let (_, csr) = fedhcc_core::pki::request(&tmp.path().join("site"), fedhcc_core::pki::Role::Site, "a").unwrap();
    let pem = std::fs::read_to_string(&csr).unwrap();
    let validity = fedhcc_core::pki::Validity::days(30);

    // One byte of the signed content changed: the signature no longer holds.
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    use base64::Engine as _;
    let mut der = base64::engine::general_purpose::STANDARD.decode(body).unwrap();
    let at = der.windows(1).position(|w| w == b"a").expect("the name in the request");
    der[at] = b'b';
    let tampered = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(&der)
    );
    let e = fedhcc_core::pki::sign(&certs, &tampered, validity).unwrap_err().to_string();
    assert!(e.contains("not a certificate signing request"), "{e}");
    assert!(fedhcc_core::pki::sign(&certs, "not a request", validity).is_err());

    // A server certificate is never made from a request, nor a name outside the naming rule.
    assert!(fedhcc_core::pki::request(&tmp.path().join("x"), fedhcc_core::pki::Role::Server, "s").is_err());
    assert!(fedhcc_core::pki::request(&tmp.path().join("x"), fedhcc_core::pki::Role::Site, "Bad Name").is_err());
    // A key is never overwritten.
    let again = fedhcc_core::pki::request(&tmp.path().join("site"), fedhcc_core::pki::Role::Site, "a").unwrap_err();
    assert!(again.to_string().contains("refusing to overwrite"), "{again}");

    // The genuine request is signed, as a site certificate of this study.
    let (rec, cert) = fedhcc_core::pki::sign(&certs, &pem, validity).unwrap();
    assert_eq!((rec.role, rec.name.as_str()), (fedhcc_core::pki::Role::Site, "a"));
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let id = fedhcc_core::pki::peer_identity(&der).unwrap();
    assert_eq!((id.name.as_str(), id.role, id.study.as_str()), ("a", fedhcc_core::pki::Role::Site, STUDY));
}
