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

use std::fmt;
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
        not_after: DerTime,
    },
    /// The certificate is not valid yet.
    #[error("the TLS certificate {} is not valid before {not_before}", path.display())]
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// Its start of validity.
        not_before: DerTime,
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
    let (not_before, not_after) = validity(leaf).ok_or_else(|| TlsError::Validity { path: path.to_path_buf() })?;
    // Before 1970 is a clock that cannot be trusted with anything; let the certificate pass.
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if now > not_after.unix() {
        return Err(TlsError::Expired { path: path.to_path_buf(), not_after });
    }
    if now < not_before.unix() {
        return Err(TlsError::NotYetValid { path: path.to_path_buf(), not_before });
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

/// A certificate time (UTCTime or GeneralizedTime), always UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DerTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl DerTime {
    /// Seconds since the Unix epoch.
    fn unix(&self) -> i64 {
        // Days from the civil date (Howard Hinnant's algorithm), March-based years.
        let (y, m) = if self.month <= 2 { (self.year - 1, self.month + 9) } else { (self.year, self.month - 3) };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * i64::from(m) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400 + i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second)
    }
}

impl fmt::Display for DerTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DerTime { year, month, day, hour, minute, second } = self;
        write!(f, "{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC")
    }
}

/// The validity period (not before, not after) of a DER certificate. rustls checks a peer's
/// certificate dates, never its own, so the few DER steps to the `validity` field are read here
/// rather than pulling in an X.509 parser for one field.
fn validity(cert: &[u8]) -> Option<(DerTime, DerTime)> {
    let (0x30, certificate, _) = der(cert)? else { return None };
    let (0x30, tbs, _) = der(certificate)? else { return None };
    let (tag, _, after) = der(tbs)?;
    // The version is an optional explicit [0]; then serial, signature algorithm, issuer.
    let mut rest = if tag == 0xa0 { after } else { tbs };
    for _ in 0..3 {
        rest = der(rest)?.2;
    }
    let (0x30, validity, _) = der(rest)? else { return None };
    let (before_tag, before, rest) = der(validity)?;
    let (after_tag, after, _) = der(rest)?;
    Some((time(before_tag, before)?, time(after_tag, after)?))
}

/// One DER element: its tag, its contents and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return None;
        }
        let len = rest[..octets].iter().fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[octets..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A UTCTime (tag 0x17, `YYMMDDHHMMSSZ`) or GeneralizedTime (0x18, `YYYYMMDDHHMMSSZ`).
fn time(tag: u8, bytes: &[u8]) -> Option<DerTime> {
    let digits = bytes.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number = |range: std::ops::Range<usize>| digits.get(range).map(|d| d.iter().fold(0u32, |n, &c| n * 10 + u32::from(c - b'0')));
    let (year, rest) = match (tag, digits.len()) {
        // RFC 5280: two-digit years 50-99 are 19xx, 00-49 are 20xx.
        (0x17, 12) => {
            let yy = i64::from(number(0..2)?);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (0x18, 14) => (i64::from(number(0..4)?), 4),
        _ => return None,
    };
    let time = DerTime {
        year,
        month: number(rest..rest + 2)?,
        day: number(rest + 2..rest + 4)?,
        hour: number(rest + 4..rest + 6)?,
        minute: number(rest + 6..rest + 8)?,
        second: number(rest + 8..rest + 10)?,
    };
    ((1..=12).contains(&time.month) && (1..=31).contains(&time.day) && time.hour < 24 && time.minute < 60 && time.second < 61)
        .then_some(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_times_convert_to_the_unix_clock() {
        let utc = time(0x17, b"700101000000Z").expect("UTCTime");
        assert_eq!(utc.unix(), 0);
        let generalized = time(0x18, b"20380119031407Z").expect("GeneralizedTime");
        assert_eq!(generalized.unix(), i64::from(i32::MAX));
        assert_eq!(time(0x17, b"491231235959Z").expect("a 20xx year").year, 2049);
        assert_eq!(generalized.to_string(), "2038-01-19 03:14:07 UTC");
        assert_eq!(time(0x17, b"701301000000Z"), None, "month 13");
        assert_eq!(time(0x17, b"7001010000Z"), None, "too short");
        assert_eq!(time(0x18, b"700101000000Z"), None, "a UTCTime's length under the GeneralizedTime tag");
    }

    #[test]
    fn der_lengths_are_checked_against_the_input() {
        assert_eq!(der(&[0x30, 0x02, 1, 2, 9]), Some((0x30, &[1u8, 2][..], &[9u8][..])));
        assert_eq!(der(&[0x30, 0x81, 0x02, 1, 2]), Some((0x30, &[1u8, 2][..], &[][..])));
        assert_eq!(der(&[0x30, 0x03, 1, 2]), None, "shorter than it says");
        assert_eq!(der(&[0x30, 0x80]), None, "indefinite length is not DER");
        assert_eq!(validity(&[0x30, 0x00]), None);
    }
}
