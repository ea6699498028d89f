//! How much a connection reads at a time: 8 KiB at first and on a quiet connection, doubling
//! while each read fills all the room it had (large messages, a burst) up to 64 KiB, so that a
//! 64 KiB message costs one read and not eight, as in the minimal tokio server; halved again
//! while reads come back small.

use bytes::BytesMut;

/// Room kept free in the read buffer before each read, at first and on a quiet connection.
pub(super) const READ_CHUNK: usize = 8 * 1024;

/// The most room kept free before a read.
const MAX_READ: usize = 64 * 1024;

#[derive(Debug)]
pub(super) struct ReadSize {
    size: usize,
}

impl ReadSize {
    pub(super) fn new() -> ReadSize {
        ReadSize { size: READ_CHUNK }
    }

    /// The room to keep free before a read.
    pub(super) fn get(&self) -> usize {
        self.size
    }

    /// Makes room in `buf` for the next read if little is left; returns the room the read
    /// will have.
    ///
    /// NOTE: a buffer with no capacity at all is left alone (an idle connection's, or a raw
    /// echo's, handed back emptied by the writer): it is given `size` once data is ready
    /// (`read_lazily`), and that is the room its read has. Counting it as no room kept the
    /// reads of a raw echo at 8 KiB for ever, two reads and two writes per 16 KiB message.
    pub(super) fn make_room(&self, buf: &mut BytesMut) -> usize {
        let capacity = buf.capacity();
        if capacity == 0 {
            return self.size;
        }
        if capacity - buf.len() < self.size / 2 {
            buf.reserve(self.size);
        }
        buf.capacity() - buf.len()
    }

    /// Learns from a read of `read` bytes into `room`.
    pub(super) fn adapt(&mut self, read: usize, room: usize) {
        if read >= room && room > 0 {
            self.size = (self.size * 2).min(MAX_READ);
        } else if read < self.size / 8 {
            self.size = (self.size / 2).max(READ_CHUNK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads into buffers handed back empty with no capacity, as a raw echo's are.
    #[test]
    fn reads_that_fill_an_emptied_buffer_grow_to_the_largest() {
        let mut size = ReadSize::new();
        for _ in 0..10 {
            let room = size.make_room(&mut BytesMut::new());
            size.adapt(room, room);
        }
        assert_eq!(size.get(), MAX_READ);
    }

    #[test]
    fn reads_that_fill_their_room_grow_and_small_ones_shrink() {
        let mut size = ReadSize::new();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        for _ in 0..10 {
            let room = size.make_room(&mut buf);
            assert!(room >= size.get() / 2, "room for a read: {room}");
            size.adapt(room, room);
            buf.clear();
        }
        assert_eq!(size.get(), MAX_READ);
        let half_full = size.make_room(&mut buf);
        size.adapt(half_full / 2, half_full);
        assert_eq!(
            size.get(),
            MAX_READ,
            "a read of half its room keeps the size"
        );
        for _ in 0..10 {
            let room = size.make_room(&mut buf);
            size.adapt(100, room);
        }
        assert_eq!(size.get(), READ_CHUNK, "small reads bring it back");
    }
}
