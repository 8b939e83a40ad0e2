//! The frame pool: a ByteBuffer-style pooled allocator for outbound frames.
//!
//! A frame is built once into a buffer checked out of the pool, frozen into a reference-counted
//! [`Bytes`] handle, and that one handle is cloned into every recipient's ring. When the last
//! clone drops (the last recipient has written it) the buffer goes back to the pool.
//!
//! The free list is a bounded lock-free queue shared by every worker, so a checkout or a return
//! is a compare-and-swap, never a lock or a syscall. The pool does no I/O and holds no frame in
//! flight; it only recycles their storage. Buffers that grew past `max_retained_capacity` are
//! freed instead of returned, so one huge frame cannot pin memory forever.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};

/// Capacity of a freshly allocated buffer: most Pusher events are well under 1 KiB.
pub const DEFAULT_BUFFER_CAPACITY: usize = 1024;

/// A shared pool of frame buffers. Cloning the handle is cheap and shares the pool.
#[derive(Clone)]
pub struct FramePool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    free_tx: Sender<Vec<u8>>,
    free_rx: Receiver<Vec<u8>>,
    buffer_capacity: usize,
    max_retained_capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counters of a pool, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Checkouts served by a recycled buffer.
    pub hits: u64,
    /// Checkouts that had to allocate a new buffer.
    pub misses: u64,
    /// Buffers idle in the pool right now.
    pub idle: u64,
}

impl PoolStats {
    /// Share of checkouts served by a recycled buffer, in percent (100 before any checkout).
    pub fn hit_rate(&self) -> f64 {
        crate::metrics::success_rate(self.hits, self.misses)
    }
}

impl FramePool {
    /// A pool that keeps at most `max_idle` idle buffers, allocates new ones with
    /// `buffer_capacity` bytes, and frees (rather than keeps) any that grew past
    /// `max_retained_capacity`.
    pub fn new(max_idle: usize, buffer_capacity: usize, max_retained_capacity: usize) -> Self {
        let (free_tx, free_rx) = crossbeam_channel::bounded(max_idle.max(1));
        FramePool {
            inner: Arc::new(PoolInner {
                free_tx,
                free_rx,
                buffer_capacity,
                max_retained_capacity: max_retained_capacity.max(buffer_capacity),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            }),
        }
    }

    /// Takes an empty buffer out of the pool, allocating one only when the pool is empty.
    pub fn checkout(&self) -> FrameBuf {
        let buf = match self.inner.free_rx.try_recv() {
            Ok(buf) => {
                self.inner.hits.fetch_add(1, Ordering::Relaxed);
                buf
            }
            Err(_) => {
                self.inner.misses.fetch_add(1, Ordering::Relaxed);
                Vec::with_capacity(self.inner.buffer_capacity)
            }
        };
        FrameBuf { buf, pool: self.clone() }
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            idle: self.inner.free_rx.len() as u64,
        }
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() > self.inner.max_retained_capacity {
            return; // Dropped: an outsized buffer is not worth keeping.
        }
        buf.clear();
        match self.inner.free_tx.try_send(buf) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

impl Default for FramePool {
    fn default() -> Self {
        // Frames in flight at once are few (a broadcast is one buffer however many rings hold
        // it), so 1,024 idle buffers serve any steady load; keeping only buffers up to 16 KiB
        // (a full 10 KiB event and its envelope) bounds what the pool itself holds to 16 MiB,
        // while outsized frames (a large presence member list) go back to the allocator.
        FramePool::new(1024, DEFAULT_BUFFER_CAPACITY, 16 * 1024)
    }
}

/// A buffer checked out of a [`FramePool`]; it returns there when dropped.
pub struct FrameBuf {
    buf: Vec<u8>,
    pool: FramePool,
}

impl FrameBuf {
    /// The bytes, for writing a frame into.
    pub fn as_mut_vec(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Turns the buffer into a shareable handle. Clones of the handle share these bytes; the
    /// buffer returns to the pool when the last clone drops.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for FrameBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for FrameBuf {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_when_the_last_handle_drops() {
        let pool = FramePool::new(8, 64, 1024);
        let mut buf = pool.checkout();
        buf.as_mut_vec().extend_from_slice(b"hello");
        let frame = buf.freeze();
        let copies: Vec<Bytes> = (0..3).map(|_| frame.clone()).collect();
        drop(frame);
        assert_eq!(pool.stats().idle, 0, "still referenced by three rings");
        drop(copies);
        assert_eq!(pool.stats(), PoolStats { hits: 0, misses: 1, idle: 1 });

        let again = pool.checkout();
        assert!(again.as_ref().is_empty(), "a recycled buffer comes back empty");
        assert_eq!(pool.stats().hits, 1);
        assert_eq!(pool.stats().hit_rate(), 50.0);
    }

    #[test]
    fn outsized_buffers_are_not_retained() {
        let pool = FramePool::new(8, 64, 1024);
        let mut buf = pool.checkout();
        buf.as_mut_vec().resize(4096, 0);
        drop(buf);
        assert_eq!(pool.stats().idle, 0);
    }

    #[test]
    fn the_pool_never_holds_more_than_its_bound() {
        let pool = FramePool::new(2, 64, 1024);
        let bufs: Vec<FrameBuf> = (0..5).map(|_| pool.checkout()).collect();
        drop(bufs);
        assert_eq!(pool.stats().idle, 2);
    }
}
