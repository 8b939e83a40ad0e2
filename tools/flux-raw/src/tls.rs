//! `--tls-cert`/`--tls-key`: flux-raw's sockets over TLS, so the raw limit can be measured with
//! the cost of encryption in it too. The certificate is loaded and checked by the gateway's own
//! [`TlsFiles`](flux::server::TlsFiles); the sessions are rustls's, driven here without the
//! gateway's bounds: like the plain backlog, this is a benchmark reference, not a server.

use std::io::{self, IoSlice, Read, Write};

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::ServerConnection;

use flux::server::TlsConfig;

/// A client's socket, plain or with its TLS session. Reads and writes plaintext; each call moves
/// the TLS records as far as the socket takes them without blocking, and records it does not
/// take wait in the session for the next call (the loop calls [`Write::flush`] on writable).
pub struct Stream {
    socket: TcpStream,
    tls: Option<Box<ServerConnection>>,
}

impl Stream {
    /// An accepted socket, with a session when the port speaks TLS.
    pub fn new(socket: TcpStream, tls: Option<&TlsConfig>) -> io::Result<Stream> {
        let tls = tls.map(|config| ServerConnection::new(config.clone()).map(Box::new).map_err(io::Error::other)).transpose()?;
        Ok(Stream { socket, tls })
    }

    /// See [`mio::net::TcpStream::set_nodelay`].
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.socket.set_nodelay(nodelay)
    }

    /// The session holds records the socket has not taken yet.
    pub fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.wants_write())
    }

    /// Writes the session's records until the socket would block: Ok(true) when none are left.
    fn write_records(socket: &mut TcpStream, tls: &mut ServerConnection) -> io::Result<bool> {
        while tls.wants_write() {
            match tls.write_tls(socket) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
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
            // The handshake's answers.
            Self::write_records(&mut self.socket, tls)?;
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Refuses (WouldBlock) while the session still holds records the socket did not take, so
    /// the caller's backlog, not the session, holds what waits.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.socket.write_vectored(bufs);
        };
        if !Self::write_records(&mut self.socket, tls)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let taken = tls.writer().write_vectored(bufs)?;
        Self::write_records(&mut self.socket, tls)?;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.tls.as_deref_mut() {
            Some(tls) => match Self::write_records(&mut self.socket, tls)? {
                true => Ok(()),
                false => Err(io::ErrorKind::WouldBlock.into()),
            },
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
