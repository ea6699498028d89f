//! Shared by the benchmark's binaries: the framed protocol's few constants, and CPU time from
//! `/proc` (the figure that ranks servers on a machine whose load generator takes a core).

use std::time::Duration;

pub const MAGIC: [u8; 4] = [0x89, b'S', b'C', b'M'];
pub const DATA: u8 = 0x01;
pub const REQUEST: u8 = 0x02;
pub const REPLY: u8 = 0x03;

/// A socketcomm hello announcing version 1 and a 16 MiB frame limit.
pub fn hello() -> [u8; 12] {
    let mut hello = [0u8; 12];
    hello[..4].copy_from_slice(&MAGIC);
    hello[4] = 1;
    hello[5] = 1;
    hello[8..].copy_from_slice(&(16u32 << 20).to_be_bytes());
    hello
}

/// User plus system CPU time of a process (`self` or a PID), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields counted here come after its closing paren.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Duration::from_secs_f64((utime + stime) as f64 / ticks))
}
