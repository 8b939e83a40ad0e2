//! TLS for the loopback tests: certificate authorities and server certificates made with the
//! `openssl` command in a temporary directory (no key is ever committed), and blocking rustls
//! clients trusting one of those authorities. Without `openssl` the TLS tests are skipped with a
//! note, unless `FLUX_REQUIRE_OPENSSL` is set (as `.ci/run` sets it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::Value;
use tungstenite::WebSocket;

/// A TLS stream to the gateway.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A temporary directory of certificates, removed when dropped.
pub struct Pki {
    pub dir: PathBuf,
}

/// One authority's files.
pub struct Authority {
    pub cert: PathBuf,
    key: PathBuf,
}

/// A server certificate and its key, signed by an authority.
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A fresh directory, or `None` (the test is skipped) when `openssl` is not installed.
    pub fn new(name: &str) -> Option<Pki> {
        let installed = Command::new("openssl").arg("version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
        if !installed {
            assert!(std::env::var_os("FLUX_REQUIRE_OPENSSL").is_none(), "openssl is required (apt-get install openssl)");
            eprintln!("skipped: the openssl command is not installed (apt-get install openssl)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("flux-tls-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        Some(Pki { dir })
    }

    /// A self-signed certificate authority.
    pub fn authority(&self, name: &str) -> Authority {
        let (cert, key) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")));
        openssl(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", &format!("/CN={name}")])
            .args([a("-keyout"), key.as_os_str(), a("-out"), cert.as_os_str()])
            .run();
        Authority { cert, key }
    }

    /// A certificate for `localhost` and 127.0.0.1 signed by `ca`, valid from now for two days.
    pub fn server_cert(&self, ca: &Authority, name: &str) -> ServerCert {
        let (cert, key, csr, ext) = self.server_files(name);
        openssl(&["x509", "-req", "-days", "2", "-CAcreateserial"])
            .args([a("-in"), csr.as_os_str(), a("-CA"), ca.cert.as_os_str(), a("-CAkey"), ca.key.as_os_str()])
            .args([a("-extfile"), ext.as_os_str(), a("-out"), cert.as_os_str()])
            .run();
        ServerCert { cert, key }
    }

    /// A certificate signed by `ca` whose validity ended in 2021.
    pub fn expired_cert(&self, ca: &Authority, name: &str) -> ServerCert {
        let (cert, key, csr, _) = self.server_files(name);
        // `openssl ca` is the one command of OpenSSL 3.0 that sets dates in the past.
        let db = self.dir.join(format!("{name}-ca"));
        std::fs::create_dir_all(&db).expect("ca directory");
        std::fs::write(db.join("index.txt"), "").expect("ca index");
        std::fs::write(db.join("serial"), "01\n").expect("ca serial");
        let config = self.dir.join(format!("{name}-ca.cnf"));
        let settings = format!(
            "[ca]\ndefault_ca = d\n[d]\ndatabase = {db}/index.txt\nnew_certs_dir = {db}\nserial = {db}/serial\n\
             default_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n",
            db = db.display()
        );
        std::fs::write(&config, settings).expect("ca config");
        openssl(&["ca", "-batch", "-startdate", "20200101000000Z", "-enddate", "20210101000000Z"])
            .args([a("-config"), config.as_os_str(), a("-cert"), ca.cert.as_os_str(), a("-keyfile"), ca.key.as_os_str()])
            .args([a("-in"), csr.as_os_str(), a("-out"), cert.as_os_str()])
            .run();
        ServerCert { cert, key }
    }

    /// A new key and its signing request for `localhost`, and the extensions file for it.
    fn server_files(&self, name: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let file = |ext: &str| self.dir.join(format!("{name}.{ext}"));
        let (cert, key, csr, ext) = (file("pem"), file("key"), file("csr"), file("ext"));
        std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("extensions file");
        openssl(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost"])
            .args([a("-keyout"), key.as_os_str(), a("-out"), csr.as_os_str()])
            .run();
        (cert, key, csr, ext)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn a(arg: &str) -> &std::ffi::OsStr {
    arg.as_ref()
}

struct Openssl(Command);

fn openssl(args: &[&str]) -> Openssl {
    let mut command = Command::new("openssl");
    command.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    Openssl(command)
}

impl Openssl {
    fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.0.args(args);
        self
    }

    fn run(mut self) {
        let output = self.0.output().expect("openssl runs");
        assert!(output.status.success(), "openssl failed: {}", String::from_utf8_lossy(&output.stderr));
    }
}

/// Client settings that trust only the authority in `ca_pem`.
pub fn client_config(ca_pem: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA accepted");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Connects and completes the TLS handshake, or says why it failed.
pub fn try_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> std::io::Result<TlsStream> {
    let socket = TcpStream::connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(10)))?;
    let session = ClientConnection::new(config.clone(), ServerName::try_from("localhost").expect("name")).map_err(std::io::Error::other)?;
    let mut stream = StreamOwned::new(session, socket);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// Connects over TLS, panicking if the handshake fails.
pub fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> TlsStream {
    try_connect(addr, config).expect("TLS handshake")
}

/// A Pusher client over wss.
pub struct WssClient {
    pub ws: WebSocket<TlsStream>,
}

impl WssClient {
    /// Connects with the default app key and waits for `pusher:connection_established`.
    pub fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> WssClient {
        let stream = connect(addr, config);
        let (ws, _) = tungstenite::client(format!("wss://localhost:{}/app/app-key?protocol=7", addr.port()), stream).expect("upgrade");
        let mut client = WssClient { ws };
        assert_eq!(client.next_event()["event"], "pusher:connection_established");
        client
    }

    /// Subscribes and waits for the confirmation.
    pub fn subscribe(&mut self, channel: &str) {
        let subscribe = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}});
        self.ws.send(tungstenite::Message::text(subscribe.to_string())).expect("send");
        let reply = self.next_event();
        assert_eq!(reply["event"], "pusher_internal:subscription_succeeded", "{reply}");
    }

    /// The next text message; panics on a close or a timeout.
    pub fn next_event(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read a message") {
                tungstenite::Message::Text(text) => return serde_json::from_str(&text).expect("server sends JSON"),
                tungstenite::Message::Close(frame) => panic!("closed by the server: {frame:?}"),
                _ => {}
            }
        }
    }

    /// Reads until the server's close frame and returns its code.
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(e) => panic!("expected a close frame, got {e}"),
            }
        }
    }
}

/// A keep-alive HTTPS connection for signed REST calls.
pub struct Https {
    stream: TlsStream,
}

impl Https {
    pub fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> Https {
        Https { stream: connect(addr, config) }
    }

    /// A signed REST call; returns the status and the body.
    pub fn rest(&mut self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let query = flux::pusher::signature::sign_query(&super::app(), method, path, body.as_bytes(), &[], super::unix_now());
        let head = format!(
            "{method} {path}?{query} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // One write: a head and a body in two records would wait on Nagle and delayed ACKs.
        self.stream.write_all(format!("{head}{body}").as_bytes()).expect("request");
        self.stream.flush().expect("flush");
        read_response(&mut self.stream)
    }

    /// Publishes `data` as `event` on `channel`.
    pub fn publish(&mut self, channel: &str, event: &str, data: &str) -> (u16, Value) {
        let body = serde_json::json!({"name": event, "channels": [channel], "data": data});
        self.rest("POST", "/apps/app-id/events", &body.to_string())
    }
}

/// Reads one HTTP response with a Content-Length body.
fn read_response(stream: &mut impl Read) -> (u16, Value) {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("ASCII head");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let length = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
        .and_then(Result::ok)
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("response body");
    let body = String::from_utf8(body).expect("UTF-8 body");
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}
