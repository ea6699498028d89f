//! What a server holds of its clients' data for them, counted in bytes: each connection's
//! messages that wait for the application (`inbound_bytes`), and in all, with the frames still
//! arriving (`max_buffered`). A connection whose share is spent stops reading its socket (TCP
//! then pushes back on the client) until the application has taken enough: the bound holds
//! before memory is taken, however many events or connections there are.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a waiting message costs beyond its bytes (its event, its place in the queues), so that a
/// flood of empty messages is bounded too.
const MESSAGE_OVERHEAD: usize = 128;

/// A read buffer up to this size is part of a connection's fixed cost; only what a frame in
/// progress makes it grow beyond this counts towards `max_buffered`.
pub(crate) const FREE_READ_BUFFER: usize = 64 * 1024;

/// A pool of bytes. A request larger than the pool takes all of it (so a message larger than
/// `inbound_bytes` waits until the pool is whole, and then has it to itself).
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    room: Arc<Semaphore>,
    total: usize,
}

impl Budget {
    pub(crate) fn new(total: usize) -> Budget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            room: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    fn cost(&self, bytes: usize) -> u32 {
        bytes.min(self.total).min(u32::MAX as usize) as u32
    }

    fn try_take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.room)
            .try_acquire_many_owned(self.cost(bytes))
            .ok()
    }

    /// Waits for `bytes` (`None` once the pool is closed, which it never is today).
    fn take(&self, bytes: usize) -> impl Future<Output = Option<OwnedSemaphorePermit>> + use<> {
        let (room, cost) = (Arc::clone(&self.room), self.cost(bytes));
        async move { room.acquire_many_owned(cost).await.ok() }
    }
}

/// A message's share of its connection's budget and of the server's, given back when it is
/// dropped: when the application has taken the message (a handler returned, a loop got it).
#[derive(Debug, Default)]
pub struct Charge {
    _held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Charge {
    fn new(
        connection: OwnedSemaphorePermit,
        mut server: OwnedSemaphorePermit,
        from_buffer: Option<OwnedSemaphorePermit>,
    ) -> Charge {
        if let Some(part) = from_buffer {
            server.merge(part);
        }
        Charge {
            _held: Some((connection, server)),
        }
    }
}

/// Waits for a message's [`Charge`].
pub(crate) type ChargeWait = Pin<Box<dyn Future<Output = Charge> + Send>>;

/// One connection's inbound accounting: its messages waiting for the application, and its read
/// buffer's growth, against the server's total.
#[derive(Debug)]
pub(crate) struct Inbound {
    connection: Budget,
    server: Budget,
    /// The read buffer's share of `server`: its capacity beyond [`FREE_READ_BUFFER`].
    buffer: Option<OwnedSemaphorePermit>,
}

impl Inbound {
    pub(crate) fn new(connection: usize, server: &Budget) -> Inbound {
        Inbound {
            connection: Budget::new(connection),
            server: server.clone(),
            buffer: None,
        }
    }

    /// A message of `len` bytes' share: at once if both budgets have room now, or a future
    /// that waits for it (owning what it needs, so that it can be kept across turns of the
    /// connection's loop and keep its place in line).
    ///
    /// NOTE: the message's bytes came out of the read buffer, so its share of the server's
    /// budget is taken from the buffer's first: a connection never waits for room that it
    /// holds itself.
    pub(crate) fn charge(&mut self, len: usize) -> Result<Charge, ChargeWait> {
        let cost = len + MESSAGE_OVERHEAD;
        let server_cost = self.server.cost(cost);
        let mut from_buffer = self
            .buffer
            .as_mut()
            .and_then(|held| held.split(server_cost.min(held.num_permits() as u32) as usize));
        let rest = server_cost as usize - from_buffer.as_ref().map_or(0, |p| p.num_permits());
        if let Some(connection) = self.connection.try_take(cost) {
            if let Some(server) = self.server.try_take(rest) {
                return Ok(Charge::new(connection, server, from_buffer.take()));
            }
        }
        let connection = self.connection.take(cost);
        let server = self.server.take(rest);
        Err(Box::pin(async move {
            match (connection.await, server.await) {
                (Some(connection), Some(server)) => Charge::new(connection, server, from_buffer),
                // Budgets are never closed; were one, nothing would be counted any more.
                _ => Charge::default(),
            }
        }))
    }

    /// Brings the read buffer's share in line with its `capacity`: gives back what it no longer
    /// needs, takes more if the server has it now. `Err(bytes)`: the buffer needs that many
    /// more than the server has; read no more until [`Inbound::buffer_room`] gives them.
    ///
    /// NOTE: a buffer's share is at most the whole budget, so a frame larger than
    /// `max_buffered` is received once it has all of it (and has it to itself).
    pub(crate) fn fit_buffer(&mut self, capacity: usize) -> Result<(), usize> {
        let held = self.shrink_buffer(capacity);
        let wanted = Self::buffer_share(capacity, &self.server);
        if wanted <= held {
            return Ok(());
        }
        match self.server.try_take(wanted - held) {
            Some(more) => {
                self.add_to_buffer(more);
                Ok(())
            }
            None => Err(wanted - held),
        }
    }

    /// Gives back what the read buffer's share holds beyond what a buffer of `capacity` needs
    /// (a message taken out of it has a share of its own); returns what it still holds.
    pub(crate) fn shrink_buffer(&mut self, capacity: usize) -> usize {
        let wanted = Self::buffer_share(capacity, &self.server);
        let Some(held) = self.buffer.as_mut() else {
            return 0;
        };
        if held.num_permits() > wanted {
            drop(held.split(held.num_permits() - wanted));
        }
        held.num_permits()
    }

    fn buffer_share(capacity: usize, server: &Budget) -> usize {
        capacity.saturating_sub(FREE_READ_BUFFER).min(server.total)
    }

    /// Waits for `bytes` of the server's budget for the read buffer (see [`Inbound::fit_buffer`]).
    pub(crate) fn buffer_room(
        &self,
        bytes: usize,
    ) -> impl Future<Output = Option<OwnedSemaphorePermit>> + Send + use<> {
        self.server.take(bytes)
    }

    pub(crate) fn add_to_buffer(&mut self, more: OwnedSemaphorePermit) {
        match self.buffer.as_mut() {
            Some(held) => held.merge(more),
            None => self.buffer = Some(more),
        }
    }
}

/// The default `max_buffered`: a quarter of the memory this process may use (the machine's, or
/// its control group's limit if lower), at least 64 MiB.
pub fn default_max_buffered() -> usize {
    const MIN: usize = 64 << 20;
    memory_limit().map_or(1 << 30, |bytes| (bytes / 4).max(MIN))
}

#[cfg(target_os = "linux")]
fn memory_limit() -> Option<usize> {
    let info = rustix::system::sysinfo();
    let ram = (info.totalram as usize).saturating_mul(info.mem_unit as usize);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|limit| limit.trim().parse::<usize>().ok());
    Some(cgroup.map_or(ram, |limit| limit.min(ram))).filter(|&bytes| bytes > 0)
}

#[cfg(not(target_os = "linux"))]
fn memory_limit() -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_larger_than_the_budget_takes_all_of_it() {
        let server = Budget::new(1 << 30);
        let mut inbound = Inbound::new(1000, &server);
        let big = inbound
            .charge(5000)
            .ok()
            .expect("an empty budget takes any message");
        assert!(inbound.charge(0).is_err(), "the budget is spent");
        drop(big);
        assert!(inbound.charge(0).is_ok(), "given back when dropped");
    }

    #[test]
    fn the_server_budget_is_shared() {
        let server = Budget::new(1000);
        let (mut a, mut b) = (
            Inbound::new(1 << 20, &server),
            Inbound::new(1 << 20, &server),
        );
        let held = a.charge(700).ok().expect("room");
        assert!(
            b.charge(700).is_err(),
            "the server's budget bounds both connections"
        );
        drop(held);
        assert!(b.charge(700).is_ok());
    }

    #[test]
    fn a_read_buffer_counts_beyond_its_free_size() {
        let server = Budget::new(100_000);
        let mut inbound = Inbound::new(1 << 20, &server);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER), Ok(()));
        assert_eq!(server.room.available_permits(), 100_000);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 60_000), Ok(()));
        assert_eq!(server.room.available_permits(), 40_000);
        let other = Inbound::new(1 << 20, &server)
            .charge(30_000 - MESSAGE_OVERHEAD)
            .ok();
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 90_000), Err(30_000));
        drop(other);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 10_000), Ok(()));
        assert_eq!(server.room.available_permits(), 90_000);
        assert_eq!(inbound.fit_buffer(0), Ok(()));
        assert_eq!(server.room.available_permits(), 100_000);
    }

    #[test]
    fn a_read_buffer_larger_than_the_budget_holds_all_of_it_and_no_more() {
        let server = Budget::new(100_000);
        let mut inbound = Inbound::new(1 << 20, &server);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 100_000), Ok(()));
        assert_eq!(server.room.available_permits(), 0);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 10_000_000), Ok(()));
        assert_eq!(inbound.shrink_buffer(FREE_READ_BUFFER + 30_000), 30_000);
        assert_eq!(server.room.available_permits(), 70_000);
    }

    #[test]
    fn a_message_takes_its_share_from_the_read_buffer_first() {
        let server = Budget::new(100_000);
        let mut inbound = Inbound::new(1 << 20, &server);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 100_000), Ok(()));
        let message = inbound
            .charge(50_000)
            .ok()
            .expect("the buffer's share pays for it");
        assert_eq!(inbound.shrink_buffer(FREE_READ_BUFFER), 0);
        assert_eq!(
            server.room.available_permits(),
            100_000 - 50_000 - MESSAGE_OVERHEAD
        );
        drop(message);
        assert_eq!(server.room.available_permits(), 100_000);
    }
}
