//! Fan-out: everything between "this event goes to channel C" and a frame sitting in each
//! subscriber's outbound ring. All of it is sans-IO.
//!
//! - [`pool`]: the frame pool; a broadcast is framed once into a pooled buffer.
//! - [`ring`]: each connection's bounded ring and backpressure state machine.
//! - [`registry`]: which of a worker's connections subscribe to which channel.
//! - [`directory`]: the node-wide view: which workers hold subscribers of a channel, and how many.

pub mod directory;
pub mod pool;
pub mod registry;
pub mod ring;

/// A connection's key in its worker's slab. Only meaningful inside that worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// A worker's index, `0..workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub usize);
