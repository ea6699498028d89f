//! What a server holds of its clients' data for them, counted in bytes: each connection's
//! messages that wait for the application (`inbound_bytes`), and in all, with the frames still
//! arriving (`max_buffered`). A connection whose share is spent stops reading its socket (TCP
//! then pushes back on the client) until the application has taken enough: the bound holds
//! before memory is taken, however many events or connections there are.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::sync::lock;

/// What a waiting message costs beyond its bytes (its event, its place in the queues), so that a
/// flood of empty messages is bounded too.
const MESSAGE_OVERHEAD: usize = 128;

/// A read buffer up to this size is part of a connection's fixed cost; only what a frame in
/// progress makes it grow beyond this counts towards `max_buffered`.
///
/// NOTE: well above the largest read (64 KiB) and the room a buffer reallocated for it may
/// have, so that a busy connection's buffer does not take and give back a share of the
/// server's budget (a semaphore's lock each way) on every read.
pub(crate) const FREE_READ_BUFFER: usize = 256 * 1024;

/// A pool of bytes. A request larger than the pool takes all of it (so a message larger than
/// `inbound_bytes` waits until the pool is whole, and then has it to itself).
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    room: Arc<Semaphore>,
    total: usize,
    growing: Arc<Growing>,
}

impl Budget {
    pub(crate) fn new(total: usize) -> Budget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            room: Arc::new(Semaphore::new(total)),
            total,
            growing: Arc::default(),
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

/// The read buffers that wait for room to grow (frames in progress), in the order they began
/// to wait.
///
/// NOTE: two large frames arriving at once can each hold part of the budget and wait for the
/// other's part; only ending one of them frees the other. The order decides which: when the
/// waits time out together, the oldest waiter is given one more turn and the others end, so
/// that at least one of the frames arrives rather than none.
#[derive(Debug, Default)]
struct Growing {
    next: AtomicU64,
    waiting: Mutex<BTreeSet<u64>>,
}

/// A read buffer's place in [`Growing`], left when dropped.
struct InLine {
    growing: Arc<Growing>,
    ticket: u64,
}

impl InLine {
    fn join(growing: &Arc<Growing>) -> InLine {
        let ticket = growing.next.fetch_add(1, Ordering::Relaxed);
        lock(&growing.waiting).insert(ticket);
        InLine {
            growing: Arc::clone(growing),
            ticket,
        }
    }

    fn is_first(&self) -> bool {
        lock(&self.growing.waiting).first() == Some(&self.ticket)
    }
}

impl Drop for InLine {
    fn drop(&mut self) {
        lock(&self.growing.waiting).remove(&self.ticket);
    }
}

/// A message's share of its connection's budget and of the server's, given back when it is
/// dropped: when the application has taken the message (a handler returned, a loop got it).
#[derive(Debug, Default)]
pub struct Charge {
    held: Option<(Arc<Shares>, u32, u32)>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some((shares, connection, server)) = self.held.take() {
            shares.give_back(connection as usize, server as usize);
        }
    }
}

/// What [`Inbound::buffer_room`] gives: room (`None` once the pool is closed), or how long it
/// waited in vain.
pub(crate) type BufferRoom = Result<Option<OwnedSemaphorePermit>, Duration>;

/// Waits for a message's [`Charge`].
pub(crate) type ChargeWait = Pin<Box<dyn Future<Output = Charge> + Send>>;

/// Server room a connection keeps at hand while messages of its own wait, so that a run of
/// messages is charged and given back with a few atomic operations each, not the server
/// semaphore's lock; beyond twice this the surplus goes back to the server at once, and all of
/// it once none of the connection's messages waits.
const CREDIT: usize = 64 * 1024;

/// Free bytes that one task takes and any thread gives back: a connection's own budget.
#[derive(Debug)]
pub(crate) struct Quota {
    free: AtomicUsize,
    total: usize,
    /// Set while the task waits for room; a give-back then wakes it.
    waiting: AtomicBool,
    freed: Notify,
}

impl Quota {
    pub(crate) fn new(total: usize) -> Quota {
        let total = total.clamp(1, u32::MAX as usize);
        Quota {
            free: AtomicUsize::new(total),
            total,
            waiting: AtomicBool::new(false),
            freed: Notify::new(),
        }
    }

    /// What `bytes` cost: at most the whole quota (a larger request waits until the quota is
    /// whole, and then has it to itself).
    fn cost(&self, bytes: usize) -> usize {
        bytes.min(self.total)
    }

    // NOTE: `free` and `waiting` are written and read in sequentially consistent order, so
    // that a give-back and a task starting to wait cannot both miss the other.
    fn try_take(&self, cost: usize) -> bool {
        self.free
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |free| {
                free.checked_sub(cost)
            })
            .is_ok()
    }

    /// Waits for `cost`.
    async fn take(&self, cost: usize) {
        while !self.try_take(cost) {
            self.waiting.store(true, Ordering::SeqCst);
            // A give-back between here and the wait leaves a permit: it is not missed.
            let freed = self.freed.notified();
            if self.try_take(cost) {
                break;
            }
            freed.await;
        }
        self.waiting.store(false, Ordering::SeqCst);
    }

    /// Gives `cost` back; returns whether the quota is whole again.
    fn give(&self, cost: usize) -> bool {
        let whole = self.free.fetch_add(cost, Ordering::SeqCst) + cost == self.total;
        if self.waiting.load(Ordering::SeqCst) {
            self.freed.notify_one();
        }
        whole
    }

    /// Whether a message of `len` bytes would wait for room now.
    pub(crate) fn is_full_for(&self, len: usize) -> bool {
        self.free.load(Ordering::SeqCst) < self.cost(len + MESSAGE_OVERHEAD)
    }

    /// Whether the task is waiting for room.
    pub(crate) fn is_waited_on(&self) -> bool {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Holds a message of `len` bytes' share of `quota` until the [`Held`] is dropped, waiting
    /// for it if need be.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled wait holds nothing.
    pub(crate) async fn hold(quota: &Arc<Quota>, len: usize) -> Held {
        let cost = quota.cost(len + MESSAGE_OVERHEAD);
        quota.take(cost).await;
        Held {
            quota: Arc::clone(quota),
            cost,
        }
    }
}

/// Bytes of a [`Quota`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    quota: Arc<Quota>,
    cost: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.quota.give(self.cost);
    }
}

/// What one connection's messages hold, shared with them (they are given back on whichever
/// thread the application drops them).
#[derive(Debug)]
struct Shares {
    /// The connection's own budget (`inbound_bytes`).
    own: Quota,
    /// Room taken from the server's budget and not charged to a message (see [`CREDIT`]).
    credit: AtomicUsize,
    server: Budget,
}

impl Shares {
    fn new(total: usize, server: &Budget) -> Arc<Shares> {
        Arc::new(Shares {
            own: Quota::new(total),
            credit: AtomicUsize::new(0),
            server: server.clone(),
        })
    }

    /// `cost` of the server's budget from the credit, else from the server: `false` when
    /// neither has that much now.
    fn try_server(&self, cost: usize) -> bool {
        if self
            .credit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |credit| {
                credit.checked_sub(cost)
            })
            .is_ok()
        {
            return true;
        }
        // Some credit for the messages that follow too, if the server has it to spare.
        for wanted in [cost + CREDIT, cost] {
            let wanted = wanted.min(self.server.total);
            if let Ok(permit) = self.server.room.try_acquire_many(wanted as u32) {
                permit.forget();
                self.credit.fetch_add(wanted - cost, Ordering::AcqRel);
                return true;
            }
        }
        false
    }

    /// Waits for `cost` of the server's budget (see [`Shares::try_server`]).
    async fn server_room(&self, cost: usize) {
        if self.try_server(cost) {
            return;
        }
        let credit = self.credit.swap(0, Ordering::AcqRel);
        if credit >= cost {
            self.credit.fetch_add(credit - cost, Ordering::AcqRel);
        } else if let Some(permit) = self.server.take(cost - credit).await {
            permit.forget();
        }
    }

    fn give_back(&self, connection: usize, server: usize) {
        let credit = self.credit.fetch_add(server, Ordering::AcqRel) + server;
        if self.own.give(connection) {
            // No message of this connection waits any more: its credit is the server's again,
            // so that connections with nothing waiting hold none of the server's budget.
            self.return_credit(self.credit.swap(0, Ordering::AcqRel));
        } else if credit > 2 * CREDIT
            && self
                .credit
                .compare_exchange(credit, CREDIT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.return_credit(credit - CREDIT);
        }
    }

    fn return_credit(&self, credit: usize) {
        if credit > 0 {
            self.server.room.add_permits(credit);
        }
    }
}

impl Drop for Shares {
    fn drop(&mut self) {
        self.server.room.add_permits(*self.credit.get_mut());
    }
}

/// One connection's inbound accounting: its messages waiting for the application, and its read
/// buffer's growth, against the server's total.
#[derive(Debug)]
pub(crate) struct Inbound {
    /// Made with the first message, so that a connection that sends none holds none.
    shares: Option<Arc<Shares>>,
    /// The connection's own budget (`inbound_bytes`).
    total: usize,
    server: Budget,
    /// The read buffer's share of the server's budget: its capacity beyond
    /// [`FREE_READ_BUFFER`].
    buffer: Option<OwnedSemaphorePermit>,
}

impl Inbound {
    pub(crate) fn new(connection: usize, server: &Budget) -> Inbound {
        Inbound {
            shares: None,
            total: connection,
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
        let shares = &*self
            .shares
            .get_or_insert_with(|| Shares::new(self.total, &self.server));
        let cost = shares.own.cost(len + MESSAGE_OVERHEAD);
        let server_cost = shares.server.cost(len + MESSAGE_OVERHEAD) as usize;
        if let Some(held) = self.buffer.as_mut() {
            if let Some(part) = held.split(server_cost.min(held.num_permits())) {
                shares
                    .credit
                    .fetch_add(part.num_permits(), Ordering::AcqRel);
                part.forget();
            }
        }
        if shares.own.try_take(cost) {
            if shares.try_server(server_cost) {
                return Ok(Self::charged(shares, cost, server_cost));
            }
            // Only the connection's part is undone: a whole give-back would return the credit
            // just taken from the read buffer to the server, and this message would then wait
            // for it.
            shares.own.give(cost);
        }
        let shares = Arc::clone(shares);
        Err(Box::pin(async move {
            shares.own.take(cost).await;
            shares.server_room(server_cost).await;
            Self::charged(&shares, cost, server_cost)
        }))
    }

    fn charged(shares: &Arc<Shares>, connection: usize, server: usize) -> Charge {
        Charge {
            held: Some((Arc::clone(shares), connection as u32, server as u32)),
        }
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

    /// Waits for `bytes` of the server's budget for the read buffer (see [`Inbound::fit_buffer`])
    /// for `limit`, or twice as long for the buffer that has waited longest of all (see
    /// [`Growing`]). `Err(waited)` when none came in time.
    pub(crate) fn buffer_room(
        &self,
        bytes: usize,
        limit: Duration,
    ) -> impl Future<Output = BufferRoom> + Send + use<> {
        let (room, growing) = (self.server.take(bytes), Arc::clone(&self.server.growing));
        async move {
            let in_line = InLine::join(&growing);
            // Pinned outside the timeouts, so that a second turn keeps its place in the
            // semaphore's queue and what it was given so far.
            let mut room = pin!(room);
            if let Ok(permit) = tokio::time::timeout(limit, &mut room).await {
                return Ok(permit);
            }
            if !in_line.is_first() {
                return Err(limit);
            }
            tokio::time::timeout(limit, room)
                .await
                .map_err(|_| 2 * limit)
        }
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

    /// A server's budget of `server` bytes and one connection's accounting against it.
    fn connection_of(server: usize) -> (Budget, Inbound) {
        let server = Budget::new(server);
        let inbound = Inbound::new(1 << 20, &server);
        (server, inbound)
    }

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
        let (server, mut inbound) = connection_of(100_000);
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
        let (server, mut inbound) = connection_of(100_000);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 100_000), Ok(()));
        assert_eq!(server.room.available_permits(), 0);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 10_000_000), Ok(()));
        assert_eq!(inbound.shrink_buffer(FREE_READ_BUFFER + 30_000), 30_000);
        assert_eq!(server.room.available_permits(), 70_000);
    }

    #[test]
    fn a_message_takes_its_share_from_the_read_buffer_first() {
        let (server, mut inbound) = connection_of(100_000);
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

    #[test]
    fn credit_goes_back_to_the_server_once_nothing_waits() {
        let (server, mut inbound) = connection_of(1 << 20);
        let held: Vec<Charge> = (0..100)
            .map(|_| inbound.charge(100).ok().expect("room"))
            .collect();
        let charged = 100 * (100 + MESSAGE_OVERHEAD);
        let available = server.room.available_permits();
        assert!(available <= (1 << 20) - charged, "each message is charged");
        assert!(
            available >= (1 << 20) - charged - 2 * CREDIT,
            "little credit kept at hand"
        );
        drop(held);
        assert_eq!(
            server.room.available_permits(),
            1 << 20,
            "all of it given back"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_message_waits_for_its_connection_budget_and_is_woken_by_a_give_back() {
        let server = Budget::new(1 << 20);
        let mut inbound = Inbound::new(1000, &server);
        let first = inbound.charge(800).ok().expect("room");
        let Err(waiting) = inbound.charge(800) else {
            panic!("the connection's budget is spent")
        };
        let waiter = tokio::spawn(waiting);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        // Given back on another thread, as the application does.
        std::thread::spawn(move || drop(first)).join().unwrap();
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(second.held.is_some());
    }

    #[tokio::test]
    async fn a_message_that_waits_keeps_what_its_read_buffer_held() {
        let (server, mut inbound) = connection_of(100_000);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 50_000), Ok(()));
        let other = Inbound::new(1 << 20, &server)
            .charge(50_000 - MESSAGE_OVERHEAD)
            .ok()
            .expect("the other half");
        let Err(waiting) = inbound.charge(80_000) else {
            panic!("80,000 bytes do not fit in the 50,000 this connection holds")
        };
        assert_eq!(
            server.room.available_permits(),
            0,
            "what the buffer held stays with the waiting message"
        );
        drop(other);
        let charge = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("room once the other message is taken");
        drop(charge);
        drop(inbound);
        assert_eq!(server.room.available_permits(), 100_000);
    }

    /// Two read buffers each holding half the budget and waiting for more: the one that began
    /// to wait first is given a second turn, the other gives up, and its room then goes to the
    /// first.
    #[tokio::test(start_paused = true)]
    async fn of_two_buffers_waiting_for_each_other_the_first_gets_the_room() {
        const LIMIT: Duration = Duration::from_secs(10);
        let (server, mut first) = connection_of(100_000);
        let mut second = Inbound::new(1 << 20, &server);
        assert_eq!(first.fit_buffer(FREE_READ_BUFFER + 50_000), Ok(()));
        assert_eq!(second.fit_buffer(FREE_READ_BUFFER + 50_000), Ok(()));
        assert_eq!(first.fit_buffer(FREE_READ_BUFFER + 80_000), Err(30_000));
        let first_waits = tokio::spawn(first.buffer_room(30_000, LIMIT));
        tokio::task::yield_now().await;
        assert_eq!(second.fit_buffer(FREE_READ_BUFFER + 80_000), Err(30_000));
        let second_waits = tokio::spawn(second.buffer_room(30_000, LIMIT));
        let gave_up = second_waits.await.unwrap();
        assert_eq!(gave_up.err(), Some(LIMIT), "the later one gives up");
        assert!(!first_waits.is_finished(), "the first one waits on");
        drop(second);
        let room = first_waits.await.unwrap().expect("the room given back");
        first.add_to_buffer(room.expect("an open pool"));
        assert_eq!(server.room.available_permits(), 20_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_buffer_that_waits_alone_gives_up_after_two_turns() {
        let (_server, mut inbound) = connection_of(100_000);
        assert_eq!(inbound.fit_buffer(FREE_READ_BUFFER + 100_000), Ok(()));
        let room = inbound.buffer_room(1, Duration::from_secs(10)).await;
        assert_eq!(room.err(), Some(Duration::from_secs(20)));
    }
}
