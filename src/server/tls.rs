//! TLS on the main port: loading and checking the certificate and key, the per-connection
//! rustls session, and the two loops that move a TLS connection's bytes.
//!
//! rustls's `ServerConnection` is sans-IO, so it lives in the connection beside the ring and the
//! worker drives it from readiness like a plain socket: on readable, [`receive`] reads records
//! and decrypts them and the worker takes the plaintext from the session's reader; on write,
//! [`send`] moves the ring's shared frames through the session's writer (encryption is the one
//! per-recipient copy) and writes the records until WouldBlock. The session buffers at most
//! [`SESSION_BUFFER_LIMIT`] bytes of records, and frames move into it only when it is empty, so
//! the ring still bounds what a slow client holds and backpressure is still judged on the socket.
//!
//! Nothing here decides what a connection means: no HTTP, no WebSocket, no metrics.

use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use crate::fanout::ring::Outbound;

/// The certificate set a listener hands its new connections; shared, and replaced whole on
/// reload, so connections made before keep theirs.
pub type TlsConfig = Arc<ServerConfig>;

/// Bytes of encrypted records a session may hold for its socket. A frame leaves the ring for the
/// session only when the session holds none, so this is one write's worth, not a second queue.
const SESSION_BUFFER_LIMIT: usize = 64 * 1024;

/// The certificate chain and private key files (PEM) the main port serves TLS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why a certificate and key were refused, at start or on reload.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the TLS {what} {}: {source}", path.display())]
    Read {
        /// "certificate" or "key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no usable PEM item of its kind.
    #[error("the TLS {what} {} is not usable: {reason}", path.display())]
    Pem {
        /// "certificate" or "key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The certificate's validity period could not be read.
    #[error("the TLS certificate {} is not usable: its validity period cannot be read", path.display())]
    Validity {
        /// The file.
        path: PathBuf,
    },
    /// The certificate has expired.
    #[error("the TLS certificate {} expired on {not_after}", path.display())]
    Expired {
        /// The file.
        path: PathBuf,
        /// Its end of validity.
        not_after: String,
    },
    /// The certificate is not valid yet.
    #[error("the TLS certificate {} is not valid before {not_before}", path.display())]
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// Its start of validity.
        not_before: String,
    },
    /// The key is not the certificate's.
    #[error("the TLS key {} does not match the certificate {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the key or the settings.
    #[error("the TLS key {} was refused: {source}", path.display())]
    Refused {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
}

impl TlsFiles {
    /// Reads and checks the pair: both files readable PEM, the certificate valid at `now`, the
    /// key the certificate's. Returns the settings new connections are made with.
    pub fn load(&self, now: SystemTime) -> Result<TlsConfig, TlsError> {
        let cert_pem = read(&self.cert, "certificate")?;
        let key_pem = read(&self.key, "key")?;
        let pem_error = |what, path: &Path, reason: String| TlsError::Pem { what, path: path.to_path_buf(), reason };
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error("certificate", &self.cert, e.to_string()))?;
        let Some(leaf) = chain.first() else {
            return Err(pem_error("certificate", &self.cert, "no CERTIFICATE block in it".into()));
        };
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_error("key", &self.key, e.to_string()))?;
        check_validity(&self.cert, leaf, now)?;

        // The ring provider explicitly: the process never depends on a provider installed as the
        // process default by someone else.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Refused { path: self.key.clone(), source })?;
        let config = builder.with_no_client_auth().with_single_cert(chain, key).map_err(|source| match source {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch { cert: self.cert.clone(), key: self.key.clone() },
            source => TlsError::Refused { path: self.key.clone(), source },
        })?;
        Ok(Arc::new(config))
    }
}

/// A TLS listener's certificate: the files it comes from and the settings they held when last
/// loaded. Owned by the acceptor, which hands the current settings to each new connection.
pub(crate) struct Certificate {
    files: TlsFiles,
    current: TlsConfig,
}

impl Certificate {
    /// Loads the pair; refused as [`TlsFiles::load`] refuses it.
    pub(crate) fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let current = files.load(SystemTime::now())?;
        Ok(Certificate { files, current })
    }

    /// Loads the files again for the connections to come. A pair that is refused leaves the
    /// current one in place: a renewal gone wrong must not take the port down.
    pub(crate) fn reload(&mut self) -> Result<(), TlsError> {
        self.current = self.files.load(SystemTime::now())?;
        Ok(())
    }

    /// The settings for a new connection.
    pub(crate) fn current(&self) -> &TlsConfig {
        &self.current
    }

    /// The certificate file.
    pub(crate) fn cert_path(&self) -> &Path {
        &self.files.cert
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn check_validity(path: &Path, leaf: &CertificateDer<'_>, now: SystemTime) -> Result<(), TlsError> {
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf).map_err(|_| TlsError::Validity { path: path.to_path_buf() })?;
    let validity = certificate.validity();
    // Before 1970 is a clock that cannot be trusted with anything; let the certificate pass.
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if now > validity.not_after.timestamp() {
        return Err(TlsError::Expired { path: path.to_path_buf(), not_after: validity.not_after.to_string() });
    }
    if now < validity.not_before.timestamp() {
        return Err(TlsError::NotYetValid { path: path.to_path_buf(), not_before: validity.not_before.to_string() });
    }
    Ok(())
}

/// A new session for an accepted connection.
pub(crate) fn session(config: &TlsConfig) -> Result<Box<ServerConnection>, rustls::Error> {
    let mut session = ServerConnection::new(config.clone())?;
    session.set_buffer_limit(Some(SESSION_BUFFER_LIMIT));
    Ok(Box::new(session))
}

/// What one [`receive`] did.
#[derive(Debug)]
pub(crate) enum Received {
    /// Records were read and processed; their plaintext, if any, waits in the session's reader.
    Records {
        /// Encrypted bytes read off the socket.
        bytes: usize,
        /// This read finished the handshake.
        handshake_done: bool,
    },
    /// Nothing more to read now.
    WouldBlock,
    /// The peer closed the TCP connection.
    Closed,
    /// The socket failed.
    Failed(io::Error),
    /// The peer sent something that is not TLS (plaintext HTTP, garbage) or broke the protocol.
    /// The session has queued an alert; it is worth one write before the socket goes.
    Refused(rustls::Error),
}

/// Reads one batch of records off the socket and processes them.
pub(crate) fn receive(socket: &mut TcpStream, session: &mut ServerConnection) -> Received {
    let bytes = loop {
        match session.read_tls(socket) {
            Ok(0) => return Received::Closed,
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Received::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Received::Failed(e),
        }
    };
    let handshaking = session.is_handshaking();
    match session.process_new_packets() {
        Ok(_) => Received::Records { bytes, handshake_done: handshaking && !session.is_handshaking() },
        Err(e) => Received::Refused(e),
    }
}

/// What one [`send`] did.
#[derive(Debug)]
pub(crate) enum Flushed {
    /// Everything the ring and the session held is on the socket.
    Done {
        /// Encrypted bytes written.
        bytes: usize,
        /// Frames that left the ring.
        frames: usize,
    },
    /// The socket would block with records still held by the session or frames by the ring.
    Blocked {
        /// Encrypted bytes written.
        bytes: usize,
        /// Frames that left the ring.
        frames: usize,
    },
    /// The socket failed (or took nothing).
    Failed(io::Error),
}

/// Writes the session's pending records, then the ring's frames through the session, until
/// both are empty or the socket would block. With `close_notify`, a drained ring is followed by
/// the session's close alert (the connection's last frame is out).
pub(crate) fn send(socket: &mut TcpStream, session: &mut ServerConnection, outbound: &mut Outbound, close_notify: bool) -> Flushed {
    let (mut bytes, mut frames) = (0, 0);
    loop {
        while session.wants_write() {
            match session.write_tls(socket) {
                Ok(0) => return Flushed::Failed(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Blocked { bytes, frames },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Flushed::Failed(e),
            }
        }
        if outbound.is_empty() {
            if close_notify && outbound.is_closing() && !session.wants_write() {
                // Sent once: a session that has sent its alert refuses to send it again.
                session.send_close_notify();
                if session.wants_write() {
                    continue;
                }
            }
            return Flushed::Done { bytes, frames };
        }
        // The session's records are all on the socket: encrypt the next batch of frames. The
        // session takes at most its buffer limit; the rest stays in the ring.
        let mut slices = [IoSlice::new(&[]); super::worker::MAX_IOVECS];
        let filled = outbound.write_slices(&mut slices);
        match io::Write::write_vectored(&mut session.writer(), &slices[..filled]) {
            Ok(0) => return Flushed::Failed(io::ErrorKind::WriteZero.into()),
            Ok(taken) => frames += outbound.advance(taken),
            Err(e) => return Flushed::Failed(e),
        }
    }
}
