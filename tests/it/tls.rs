//! TLS on the api listener: modern handshakes with HTTP/2 by ALPN, old protocol
//! versions refused, and certificates replaced by SIGHUP without dropping connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::support::{DEADLINE, Keel, base_config, parse_reply, scratch};

/// A CA and a leaf for `localhost` signed by it, as PEM files in `dir`.
struct Pki {
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
}

fn issue(dir: &Path, common_name: &str) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{common_name} CA"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    std::fs::write(dir.join("api.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("api.key"), leaf_key.serialize_pem()).unwrap();
    Pki {
        ca: ca.der().clone(),
        leaf: leaf.der().clone(),
    }
}

fn tls_config(dir: &Path) -> String {
    format!(
        "{}[listeners.api.tls]\ncert = {:?}\nkey = {:?}\n",
        base_config(dir),
        dir.join("api.crt").display().to_string(),
        dir.join("api.key").display().to_string()
    )
}

fn client(
    ca: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> StreamOwned<ClientConnection, TcpStream> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let connection =
        ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut stream = StreamOwned::new(connection, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("TLS handshake");
    }
    stream
}

fn healthz_over(stream: &mut StreamOwned<ClientConnection, TcpStream>, close: bool) -> u16 {
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n\r\n"
    )
    .unwrap();
    // Read exactly one response: the head, then Content-Length bytes.
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|value| value.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    raw.extend(body);
    parse_reply(&raw).status
}

#[test]
fn tls_13_and_12_handshakes_work_and_alpn_offers_http2() {
    let dir = scratch();
    let pki = issue(dir.path(), "first");
    let (_keel, addr) = Keel::start(dir.path(), &tls_config(dir.path()));

    let modern = connect(
        addr,
        client(&pki.ca, &[&rustls::version::TLS13], &[b"h2", b"http/1.1"]),
    );
    assert_eq!(
        modern.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(modern.conn.alpn_protocol(), Some(&b"h2"[..]));
    drop(modern.sock.shutdown(std::net::Shutdown::Both));

    let mut tls12 = connect(
        addr,
        client(&pki.ca, &[&rustls::version::TLS12], &[b"http/1.1"]),
    );
    assert_eq!(
        tls12.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(tls12.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(healthz_over(&mut tls12, true), 200);
}

#[test]
fn a_tls_11_client_is_refused() {
    let dir = scratch();
    issue(dir.path(), "first");
    let (_keel, addr) = Keel::start(dir.path(), &tls_config(dir.path()));

    // A ClientHello offering only TLS 1.1 (legacy_version 0x0302, no supported_versions
    // extension) with TLS 1.1-era cipher suites.
    let mut hello_body = vec![0x03, 0x02];
    hello_body.extend([0x42; 32]); // random
    hello_body.push(0); // no session id
    hello_body.extend([0x00, 0x08, 0xc0, 0x13, 0xc0, 0x14, 0x00, 0x2f, 0x00, 0x35]);
    hello_body.extend([0x01, 0x00]); // null compression only
    let mut handshake = vec![0x01, 0x00, 0x00, hello_body.len() as u8];
    handshake.extend(&hello_body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend(&handshake);

    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    tcp.write_all(&record).unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    assert!(answer.len() >= 7, "expected an alert, got {answer:?}");
    assert_eq!(
        answer[0], 0x15,
        "an alert record, not a ServerHello: {answer:?}"
    );
    assert_eq!(answer[5], 2, "a fatal alert: {answer:?}");
    // rustls answers handshake_failure (40); protocol_version (70) would be as correct.
    assert!(
        matches!(answer[6], 40 | 70),
        "handshake_failure or protocol_version: {answer:?}"
    );
}

#[test]
fn sighup_swaps_the_certificate_without_dropping_connections() {
    let dir = scratch();
    let first = issue(dir.path(), "first");
    let (keel, addr) = Keel::start(dir.path(), &tls_config(dir.path()));

    let mut before = connect(
        addr,
        client(&first.ca, &[&rustls::version::TLS13], &[b"http/1.1"]),
    );
    assert_eq!(before.conn.peer_certificates().unwrap()[0], first.leaf);
    assert_eq!(healthz_over(&mut before, false), 200);

    let second = issue(dir.path(), "second");
    keel.signal("HUP");
    keel.wait_for_log("certificate reloaded");

    let mut after = connect(
        addr,
        client(&second.ca, &[&rustls::version::TLS13], &[b"http/1.1"]),
    );
    assert_eq!(after.conn.peer_certificates().unwrap()[0], second.leaf);
    assert_eq!(healthz_over(&mut after, true), 200);
    // The connection made before the reload still works.
    assert_eq!(healthz_over(&mut before, true), 200);
}

#[test]
fn an_unusable_certificate_is_a_clear_start_up_error() {
    let dir = scratch();
    issue(dir.path(), "first");
    // A key that belongs to another certificate.
    let other = scratch();
    issue(other.path(), "other");
    std::fs::copy(other.path().join("api.key"), dir.path().join("api.key")).unwrap();
    let mut keel = Keel::spawn(dir.path(), &tls_config(dir.path()));
    let status = keel.wait_exit(DEADLINE).expect("exits");
    assert_eq!(status.code(), Some(2));
    let log = keel.log_text();
    assert!(
        log.contains("listeners.api.tls") && log.contains("does not belong to certificate"),
        "{log}"
    );

    std::fs::write(dir.path().join("api.crt"), "not a certificate").unwrap();
    let mut keel = Keel::spawn(dir.path(), &tls_config(dir.path()));
    assert_eq!(
        keel.wait_exit(DEADLINE).and_then(|status| status.code()),
        Some(2)
    );
    assert!(
        keel.log_text().contains("no PEM certificate"),
        "{}",
        keel.log_text()
    );
}

#[test]
fn a_login_over_tls_sets_a_secure_cookie() {
    let dir = scratch();
    let pki = issue(dir.path(), "login");
    let config = format!("{}[auth]\nenabled = true\n", tls_config(dir.path()));
    let (_keel, addr) = Keel::start(dir.path(), &config);
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let body = format!(r#"{{"token":"{}"}}"#, token.trim());
    let mut stream = connect(addr, client(&pki.ca, rustls::ALL_VERSIONS, &[b"http/1.1"]));
    write!(
        stream,
        "POST /v1/auth/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    // A peer that closes without close_notify is fine here: the whole answer arrived.
    let _ = stream.read_to_end(&mut raw);
    let reply = parse_reply(&raw);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let cookie = reply.header("set-cookie").unwrap();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    assert!(!reply.body.contains(token.trim()));
}
