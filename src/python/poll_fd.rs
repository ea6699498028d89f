//! Finds the descriptor a current-thread tokio runtime waits on (its epoll instance), so that
//! an asyncio loop can watch it with `add_reader` and drive the runtime itself when it is
//! readable (`driven.rs`): the connections of an `aio.Server` are then read, handled and
//! answered on the loop's own thread.
//!
//! tokio does not expose the descriptor, so it is found from the outside: a probe socket is
//! registered with the runtime, and the epoll instance of this process whose registrations
//! (listed in `/proc/self/fdinfo`) include that very socket, by its inode, is the runtime's.
//! Linux only; elsewhere, or when `/proc` is not mounted, there is none, and the loop is woken
//! through a socket pair instead (`wakeup.rs`).

use std::os::fd::RawFd;

use tokio::runtime::Runtime;

/// The runtime's epoll descriptor, when it can be found.
#[cfg(target_os = "linux")]
pub(crate) fn find(runtime: &Runtime) -> Option<RawFd> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    let (probe, _peer) = std::os::unix::net::UnixStream::pair().ok()?;
    probe.set_nonblocking(true).ok()?;
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", probe.as_raw_fd()))
        .ok()?
        .ino();
    let _entered = runtime.enter();
    // Registered with the runtime's driver for as long as it lives, that is, this function.
    let registered = tokio::net::UnixStream::from_std(probe).ok()?;
    // NOTE: tokio's driver keeps two descriptors of its epoll instance (mio's registry is a
    // duplicate), and either serves: the first one found is taken.
    let mut found = None;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]");
        if !is_epoll {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            continue;
        };
        if watches_inode(&info, inode) {
            found = Some(fd);
            break;
        }
    }
    drop(registered);
    found
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn find(_runtime: &Runtime) -> Option<RawFd> {
    None
}

/// Whether an epoll instance's `fdinfo` lists a registration of the file with `inode`: lines
/// such as `tfd:        7 events:       19 data: 1 pos:0 ino:2c3f sdev:8` (inode in hex).
fn watches_inode(fdinfo: &str, inode: u64) -> bool {
    fdinfo
        .lines()
        .filter(|line| line.starts_with("tfd:"))
        .filter_map(|line| line.split_whitespace().find_map(|f| f.strip_prefix("ino:")))
        .any(|hex| u64::from_str_radix(hex, 16) == Ok(inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_inodes_of_an_epoll_instances_registrations() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        7 events: 8000201d data:                0  pos:0 ino:2c3f sdev:8\n\
                    tfd:       12 events:       19 data: ffffffffffffffff  pos:0 ino:9a sdev:9\n";
        assert!(watches_inode(info, 0x2c3f));
        assert!(watches_inode(info, 0x9a));
        // The epoll instance's own inode (the `ino:` line without `tfd:`) is not a registration.
        assert!(!watches_inode(info, 0x1057));
        assert!(!watches_inode(info, 7));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn finds_the_descriptor_of_a_runtimes_epoll_instance() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fd = find(&runtime).expect("a current-thread runtime waits on an epoll instance");
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(target.as_os_str(), "anon_inode:[eventpoll]");
        // Another runtime has another instance.
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert_ne!(find(&other), Some(fd));
    }
}
