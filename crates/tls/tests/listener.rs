//! The HTTPS listener over real sockets: handshakes against the cluster
//! CA, a clear answer to plain HTTP, and no head-of-line blocking by
//! clients that never finish a handshake.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_tls::{Serving, ServingError, pki};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn serve(dir: &Path) -> std::net::SocketAddr {
    pki::init_ca(dir).unwrap();
    let issued = pki::issue(dir, "server", &["127.0.0.1".into()]).unwrap();
    let config = nexus_tls::server_config(&issued.cert, &issued.key).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" }));
    tokio::spawn(nexus_tls::serve(tcp, Serving::Tls(config), app, std::future::pending()));
    addr
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(nexus_tls::server::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// GET /hello over TLS trusting `ca`; the response text, or the error.
async fn get_hello(addr: std::net::SocketAddr, ca: &Path) -> Result<String, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_config(ca)).connect(name, tcp).await?;
    tls.write_all(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn a_client_trusting_the_cluster_ca_gets_through_and_one_trusting_another_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(&dir.path().join("pki")).await;
    let answer = get_hello(addr, &dir.path().join("pki/ca.crt")).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");

    pki::init_ca(&dir.path().join("other")).unwrap();
    let err = get_hello(addr, &dir.path().join("other/ca.crt")).await.unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_400_that_says_to_use_https() {
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(&dir.path().join("pki")).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    let body: serde_json::Value = serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["status"], 400);
    assert_eq!(body["error"], "BadRequest");
    assert!(body["suggestion"].as_str().unwrap().contains("https://"), "{body}");
}

#[tokio::test]
async fn clients_that_never_finish_a_handshake_do_not_hold_up_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(&dir.path().join("pki")).await;
    // Fifty connections that say nothing, and one that sends half a record.
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = Instant::now();
    let answer = get_hello(addr, &dir.path().join("pki/ca.crt")).await.unwrap();
    let took = started.elapsed();
    println!("a request behind 51 stalled handshakes took {took:?}");
    assert!(answer.ends_with("hello"));
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn the_flags_choose_tls_plain_or_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init_ca(&pki_dir).unwrap();
    let issued = pki::issue(&pki_dir, "apiserver", &["127.0.0.1".into()]).unwrap();
    let (cert, key) = (issued.cert.as_path(), issued.key.as_path());
    assert!(matches!(nexus_tls::serving(Some(cert), Some(key), false, None), Ok(Serving::Tls(_))));
    assert!(matches!(nexus_tls::serving(None, None, true, None), Ok(Serving::Plain)));
    let default = Some((issued.cert.clone(), issued.key.clone()));
    assert!(matches!(nexus_tls::serving(None, None, false, default), Ok(Serving::Tls(_))), "found by default");
    let missing = Some((dir.path().join("no.crt"), dir.path().join("no.key")));
    let err = nexus_tls::serving(None, None, false, missing).unwrap_err();
    assert!(matches!(err, ServingError::NoCertificate) && err.to_string().contains("init-pki"), "{err}");
    assert!(matches!(nexus_tls::serving(Some(cert), None, false, None), Err(ServingError::Half { .. })));
    assert!(matches!(nexus_tls::serving(Some(cert), Some(key), true, None), Err(ServingError::Both)));
    // A key file that holds a certificate: named in the error.
    let err = nexus_tls::serving(Some(cert), Some(cert), false, None).unwrap_err();
    assert!(err.to_string().contains("apiserver.crt"), "{err}");
}
