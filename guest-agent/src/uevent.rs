//! The kernel's device events (uevents), to wait for a device without
//! polling on a timer.
//!
//! Under TCG with instruction counting the guest's clock can run ahead of
//! the host's while the guest computes (formatting the scratch disk), and a
//! guest that then sleeps on a timer is not woken until the host's clock has
//! caught up: a 20 ms poll for a hot-added disk took up to 1.5 s of host
//! time. A uevent arrives with the device's interrupt instead, whatever the
//! clocks say.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;

/// The kernel's uevent multicast group.
const KERNEL_GROUP: u32 = 1;

/// A subscription to the kernel's uevents.
pub struct Uevents {
    fd: AsyncFd<OwnedFd>,
}

impl Uevents {
    /// Subscribes; events from then on are seen by [`Uevents::next`].
    pub fn subscribe() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
        // SAFETY: `fd` is the socket just opened, owned by the `AsyncFd`
        // from here on, which neither closes nor replaces it while it holds
        // it: its raw fd stays the same open socket for the AsyncFd's life.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(Uevents { fd })
    }

    /// Waits at most `wait` for one or more events and consumes them all;
    /// false if none came. What the events say does not matter to the
    /// callers: they look again at what they wait for.
    pub async fn next(&mut self, wait: Duration) -> bool {
        let Ok(ready) = tokio::time::timeout(wait, self.fd.readable()).await else {
            return false;
        };
        let Ok(mut guard) = ready else {
            return false;
        };
        let mut buf = [0u8; 8192];
        // Read until drained (or broken, which the callers' own deadlines
        // and periodic second looks cover). An overrun (ENOBUFS) lost
        // events, which only means looking again, as for any event; what is
        // queued after it still counts.
        while let Ok(_) | Err(Errno::ENOBUFS) = recv(
            guard.get_inner().as_raw_fd(),
            &mut buf,
            MsgFlags::MSG_DONTWAIT,
        ) {}
        guard.clear_ready();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic `change` event (writing to a device's `uevent` file,
    /// as root) reaches a subscriber.
    #[tokio::test]
    async fn a_device_event_wakes_the_subscriber() {
        let mut events = Uevents::subscribe().expect("subscribing to uevents");
        std::fs::write("/sys/devices/virtual/mem/null/uevent", "change")
            .expect("synthesising a uevent for /dev/null (needs root)");
        assert!(
            events.next(Duration::from_secs(10)).await,
            "no uevent within 10 s of a synthetic one"
        );
    }
}
