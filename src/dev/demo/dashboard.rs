//! The demo's dashboard: every federated run the demo starts serves the study lead's dashboard on a
//! free loopback port, with a fresh token next to the run's admin configuration, and the demo prints
//! the address to open (token included) once the page answers.

use super::{free_port, wait_for_port};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

/// The token file's name, in the run's configuration folder (beside `admin.toml`).
pub const TOKEN_FILE: &str = "dashboard.token";

/// Adds a `[dashboard]` table to `cfg/server.toml`: `127.0.0.1` on a free port other than
/// `grpc_port`, the token in `cfg/dashboard.token` (made now: 32 random bytes, hex, owner-only,
/// replacing any earlier one).
///
/// # Errors
/// No free port, or the token or the server configuration cannot be written.
pub fn enable(cfg: &Path, grpc_port: u16) -> Result<()> {
    let port = loop {
        let p = free_port()?;
        if p != grpc_port {
            break p;
        }
    };
    // A fresh token: 32 bytes from the thread's CSPRNG (seeded by the operating system), hex.
    let token: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    let token_file = cfg.join(TOKEN_FILE);
    fedhcc_core::pki::write_atomic(&token_file, format!("{token}\n").as_bytes(), true)
        .with_context(|| format!("writing the dashboard token {}", token_file.display()))?;
    let server = cfg.join("server.toml");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&server)
        .with_context(|| format!("adding the dashboard to {}", server.display()))?;
    write!(
        f,
        "\n# The study lead's dashboard (https, loopback only); the token is in {TOKEN_FILE} beside this file.\n\
         [dashboard]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{TOKEN_FILE}\"\n"
    )
    .with_context(|| format!("adding the dashboard to {}", server.display()))?;
    Ok(())
}

/// The address that opens the dashboard of the server configured by `server_cfg`, token included
/// (`https://127.0.0.1:PORT/?token=…`; the page moves it into a cookie), and its port; `None`
/// when the configuration has no `[dashboard]` table.
///
/// # Errors
/// The configuration or the token file cannot be read.
pub fn url(server_cfg: &Path) -> Result<Option<(String, u16)>> {
    let (cfg, _) = fedhcc_core::config::load_server(server_cfg)?;
    let Some(d) = &cfg.dashboard else { return Ok(None) };
    let addr: std::net::SocketAddr =
        d.listen.parse().with_context(|| format!("{}: dashboard.listen = {}", server_cfg.display(), d.listen))?;
    let token = fedhcc_server::dashboard::load_or_create_token(&d.token_path(&cfg.state_dir))?;
    Ok(Some((format!("https://{addr}/?token={}", query_escape(&token)), addr.port())))
}

/// Waits until the dashboard of `server_cfg` answers, then prints the line with its address; nothing
/// without a `[dashboard]` table.
///
/// # Errors
/// The configuration cannot be read, or the server stops or does not open the port in time.
pub fn announce(server_cfg: &Path, server: &mut Child) -> Result<()> {
    let Some((url, port)) = url(server_cfg)? else { return Ok(()) };
    wait_for_port(port, server, Duration::from_secs(60)).context("waiting for the dashboard")?;
    println!(
        "      dashboard, live while the run lasts: {url} (the certificate is from the demo's own CA, certs/ca.pem: \
         let the browser proceed)"
    );
    Ok(())
}

/// `token` as a query-string value: everything but letters, digits and `-_.~` percent-encoded (a
/// token may hold `+`, `/` and `=`).
fn query_escape(token: &str) -> String {
    token
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_server_config_gets_a_loopback_dashboard_and_the_url_carries_its_token() {
        let tmp = tempfile::tempdir().unwrap();
        let sites = vec!["center_a".to_string(), "center_b".to_string()];
        let study =
            "study_id = \"hcc-demo\"\nrun_id = \"run-1\"\n[federation]\nrounds = 2\n[model]\nkind = \"clinical\"\n";
        let cfg =
            super::super::write_loopback_configs(tmp.path(), "configs", 50051, &sites, study, "server-state").unwrap();
        let server_cfg = cfg.join("server.toml");
        assert_eq!(url(&server_cfg).unwrap(), None, "no [dashboard] table yet");
        enable(&cfg, 50051).unwrap();
        let token = std::fs::read_to_string(cfg.join(TOKEN_FILE)).unwrap().trim().to_string();
        assert_eq!(token.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(cfg.join(TOKEN_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the token is the study lead's");
        }
        let (parsed, _) = fedhcc_core::config::load_server(&server_cfg).unwrap();
        let d = parsed.dashboard.expect("a [dashboard] table");
        assert!(d.listen.starts_with("127.0.0.1:") && d.listen != "127.0.0.1:50051", "{}", d.listen);
        assert_eq!(d.token_path(&parsed.state_dir), cfg.join(TOKEN_FILE));
        let (u, port) = url(&server_cfg).unwrap().unwrap();
        assert_eq!(u, format!("https://{}/?token={token}", d.listen));
        assert_eq!(format!("127.0.0.1:{port}"), d.listen);
        assert_eq!(query_escape("ab+c/d=e_f-g.h~"), "ab%2Bc%2Fd%3De_f-g.h~");
    }
}
