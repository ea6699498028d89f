//! Rooms: named groups of a server's connections, which a publish reaches all at once.
//!
//! A connection joins rooms by name (`lobby`, `chat.lobby`) or by pattern (`chat.*`, `chat.>`;
//! see [`crate::topic`]); a message published to a name reaches every connection that joined a
//! room matching it, once, however many of its rooms match. A connection leaves every room when
//! it ends.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use super::{ConnId, Connection};
use crate::error::Result;
use crate::sync::lock;
use crate::topic::{self, check_name, check_pattern};

/// A server's rooms.
#[derive(Default)]
pub(super) struct Rooms(Mutex<Table>);

#[derive(Default)]
struct Table {
    /// The members of each room, by its name or pattern.
    members: HashMap<Arc<str>, BTreeMap<ConnId, Connection>>,
    /// The rooms among `members` whose name is a pattern, which a publish must match one by one.
    patterns: BTreeSet<Arc<str>>,
    /// The rooms each connection is in.
    joined: HashMap<ConnId, BTreeSet<Arc<str>>>,
}

impl Rooms {
    /// Puts `conn` in `room` (a name or a pattern); `false` when it was in it already.
    ///
    /// # Errors
    /// [`crate::Error::Topic`] for a name that breaks the rules, and the connection's
    /// [`crate::Error::Closed`] once it has ended or is closing.
    pub(super) fn join(&self, conn: &Connection, room: &str) -> Result<bool> {
        check_pattern(room)?;
        let mut table = lock(&self.0);
        // NOTE: checked under the lock that `leave_all` takes after the connection is marked
        // closed, so a connection is never left in a room once it has ended.
        if conn.outbox.state().close_info().is_some() {
            return Err(conn.outbox.state().closed_error());
        }
        let joined = table.joined.entry(conn.id).or_default();
        if joined.contains(room) {
            return Ok(false);
        }
        let room: Arc<str> = Arc::from(room);
        joined.insert(Arc::clone(&room));
        if topic::is_pattern(&room) {
            table.patterns.insert(Arc::clone(&room));
        }
        table
            .members
            .entry(room)
            .or_default()
            .insert(conn.id, conn.clone());
        Ok(true)
    }

    /// Takes connection `id` out of `room`; `false` when it was not in it.
    pub(super) fn leave(&self, id: ConnId, room: &str) -> bool {
        let mut table = lock(&self.0);
        let Some(joined) = table.joined.get_mut(&id) else {
            return false;
        };
        let Some(room) = joined.take(room) else {
            return false;
        };
        if joined.is_empty() {
            table.joined.remove(&id);
        }
        table.remove_member(&room, id);
        true
    }

    /// Takes connection `id` out of every room it is in.
    pub(super) fn leave_all(&self, id: ConnId) {
        let mut table = lock(&self.0);
        for room in table.joined.remove(&id).unwrap_or_default() {
            table.remove_member(&room, id);
        }
    }

    /// The rooms connection `id` is in, sorted.
    pub(super) fn rooms_of(&self, id: ConnId) -> Vec<String> {
        lock(&self.0)
            .joined
            .get(&id)
            .map(|rooms| rooms.iter().map(|room| room.to_string()).collect())
            .unwrap_or_default()
    }

    /// The connections a publish to `name` reaches, but those in `exclude`, by id.
    ///
    /// # Errors
    /// [`crate::Error::Topic`] when `name` is not a name to publish to (a pattern, say).
    pub(super) fn reached_by(&self, name: &str, exclude: &[ConnId]) -> Result<Vec<Connection>> {
        check_name(name)?;
        let table = lock(&self.0);
        let mut reached: BTreeMap<ConnId, Connection> = BTreeMap::new();
        let matching = table
            .patterns
            .iter()
            .filter(|pattern| topic::matches(pattern, name))
            .map(|pattern| &**pattern)
            .chain(std::iter::once(name));
        for room in matching {
            for (id, conn) in table.members.get(room).into_iter().flatten() {
                if !exclude.contains(id) {
                    reached.entry(*id).or_insert_with(|| conn.clone());
                }
            }
        }
        Ok(reached.into_values().collect())
    }

    /// How many rooms have members.
    pub(super) fn count(&self) -> usize {
        lock(&self.0).members.len()
    }
}

impl Table {
    fn remove_member(&mut self, room: &Arc<str>, id: ConnId) {
        let Some(members) = self.members.get_mut(room) else {
            return;
        };
        members.remove(&id);
        if members.is_empty() {
            self.members.remove(room);
            self.patterns.remove(room);
        }
    }
}
