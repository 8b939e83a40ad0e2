//! TLS for the load tool (`--tls`, `--ca`): the client settings, a non-blocking TLS stream for
//! the shards' mio loops, and a blocking one for the publisher and the prober.
//!
//! The server name checked against the certificate is the node's IP address (the test
//! certificates carry `IP:127.0.0.1`), or `--tls-name` when given. rustls, with the ring
//! provider as the gateway has it, so the tool adds no crate to the tree.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// How the tool's connections speak TLS.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    /// The name the certificate must carry; `None`: the node's IP address.
    name: Option<ServerName<'static>>,
}

impl TlsClient {
    /// Client settings trusting the authorities in the PEM file `ca`.
    pub fn new(ca: &Path, name: Option<&str>) -> Result<TlsClient, String> {
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("cannot read the CA file {}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("the CA file {} is not usable: {e}", ca.display()))?;
            roots.add(cert).map_err(|e| format!("a certificate in {} is refused: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("the CA file {} holds no certificate", ca.display()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = name.map(|n| ServerName::try_from(n.to_string()).map_err(|e| format!("--tls-name {n}: {e}"))).transpose()?;
        Ok(TlsClient { config: Arc::new(config), name })
    }

    fn session(&self, server: SocketAddr) -> io::Result<ClientConnection> {
        let name = self.name.clone().unwrap_or_else(|| ServerName::IpAddress(server.ip().into()));
        ClientConnection::new(self.config.clone(), name).map_err(io::Error::other)
    }

    /// A blocking TLS stream over a connected socket; the handshake happens on first use.
    pub fn blocking(
        &self,
        socket: std::net::TcpStream,
        server: SocketAddr,
    ) -> io::Result<StreamOwned<ClientConnection, std::net::TcpStream>> {
        Ok(StreamOwned::new(self.session(server)?, socket))
    }
}

/// A shard client's socket: plain, or TLS over it. Reads and writes plaintext; the TLS records
/// move underneath, each call going as far as the socket allows without blocking.
pub struct Stream {
    socket: TcpStream,
    tls: Option<Box<ClientConnection>>,
}

impl Stream {
    /// Wraps a connecting socket; with `tls`, the ClientHello waits to go with the first write.
    pub fn new(socket: TcpStream, tls: Option<&TlsClient>, server: SocketAddr) -> io::Result<Stream> {
        let tls = tls.map(|tls| tls.session(server).map(Box::new)).transpose()?;
        Ok(Stream { socket, tls })
    }

    /// The socket's pending error (a failed connect).
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.socket.take_error()
    }

    /// The server's address, once connected.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.socket.peer_addr()
    }

    /// TLS records are waiting for the socket to take them.
    pub fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.wants_write())
    }

    /// Writes the pending TLS records until the socket would block.
    fn write_records(socket: &mut TcpStream, tls: &mut ClientConnection) -> io::Result<()> {
        while tls.wants_write() {
            match tls.write_tls(socket) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.socket.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            if tls.read_tls(&mut self.socket)? == 0 {
                return Ok(0);
            }
            tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // Handshake messages (and plaintext held until the handshake ended) go out now.
            Self::write_records(&mut self.socket, tls)?;
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.socket.write(buf);
        };
        let taken = tls.writer().write(buf)?;
        Self::write_records(&mut self.socket, tls)?;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.tls.as_deref_mut() {
            Some(tls) => Self::write_records(&mut self.socket, tls),
            None => Ok(()),
        }
    }
}

impl Source for Stream {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        self.socket.register(registry, token, interests)
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        self.socket.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.socket.deregister(registry)
    }
}

/// A keep-alive HTTP/1.1 connection over TLS for the publisher's signed POSTs (ureq here is
/// built without TLS, so that no TLS client reaches the gateway's build through it).
pub struct HttpsConnection {
    server: SocketAddr,
    tls: TlsClient,
    stream: Option<StreamOwned<ClientConnection, std::net::TcpStream>>,
    timeout: std::time::Duration,
}

impl HttpsConnection {
    /// A connection to `server`, opened at the first request.
    pub fn new(server: SocketAddr, tls: TlsClient, timeout: std::time::Duration) -> Self {
        HttpsConnection { server, tls, stream: None, timeout }
    }

    /// POSTs `body` to `path_and_query`; returns the status and the body. A broken connection
    /// is dropped and the next call opens another.
    pub fn post(&mut self, path_and_query: &str, body: &str) -> Result<(u16, String), String> {
        let result = self.try_post(path_and_query, body);
        if result.is_err() {
            self.stream = None;
        }
        result.map_err(|e| e.to_string())
    }

    fn try_post(&mut self, path_and_query: &str, body: &str) -> io::Result<(u16, String)> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let socket = std::net::TcpStream::connect_timeout(&self.server, self.timeout)?;
                socket.set_nodelay(true)?;
                socket.set_read_timeout(Some(self.timeout))?;
                socket.set_write_timeout(Some(self.timeout))?;
                self.stream.insert(self.tls.blocking(socket, self.server)?)
            }
        };
        // One write: a head and a body in two records would wait on Nagle and delayed ACKs.
        let request = format!(
            "POST {path_and_query} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.server,
            body.len()
        );
        stream.write_all(request.as_bytes())?;
        stream.flush()?;
        read_response(stream)
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body (what the gateway sends).
fn read_response(stream: &mut impl Read) -> io::Result<(u16, String)> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte)?;
        head.push(byte[0]);
        if head.len() > 16 * 1024 {
            return Err(invalid("response head too long"));
        }
    }
    let head = std::str::from_utf8(&head).map_err(|_| invalid("response head is not text"))?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| invalid("no status"))?;
    let length = head
        .lines()
        .find_map(|line| line.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("content-length")))
        .map(|(_, value)| value.trim().parse::<usize>().map_err(|_| invalid("bad content-length")))
        .transpose()?
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_read_to_the_end_of_its_body_and_no_further() {
        let mut input: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 ...";
        assert_eq!(read_response(&mut input).expect("a response"), (200, "{}".into()));
        assert_eq!(input, b"HTTP/1.1 ...", "the next response is left for the next call");
        let mut truncated: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}";
        assert!(read_response(&mut truncated).is_err());
    }
}
