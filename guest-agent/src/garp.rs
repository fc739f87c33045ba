//! Gratuitous ARP for the pod's IPv4 addresses once each NIC has carrier.
//!
//! A pod IP is reused after its previous pod went; peers that talked to
//! that pod keep its MAC in their neighbour tables until the entry expires
//! (about half a minute in the tests, for runc pods as for veil pods).
//! `arp_notify` would announce the address when the link comes up, but
//! virtio-net (Linux 6.11 on) raises carrier only after the open, so the
//! kernel's announcement meets a link without carrier and is dropped. The
//! agent therefore announces each address itself, through a packet socket,
//! once `/sys/class/net/<nic>/carrier` reads 1.

use std::{net::Ipv4Addr, os::fd::AsRawFd, time::Duration};

/// How long a NIC may take to get carrier before the announcement is
/// given up (logged).
const CARRIER_WAIT: Duration = Duration::from_secs(3);
/// Announcements per address, this far apart (one may be lost while the
/// host side's qdisc settles).
const REPEATS: u32 = 2;
const REPEAT_GAP: Duration = Duration::from_millis(300);

/// The 28-byte ARP request announcing `ip` at `mac` (sender and target
/// protocol address both `ip`, RFC 5227's ARP announcement).
pub fn announcement(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    // Target hardware address stays zero.
    p[24..28].copy_from_slice(&ip.octets());
    p
}

fn has_carrier(nic: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{nic}/carrier"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

fn send(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> std::io::Result<()> {
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the result is checked and
    // owned by the OwnedFd below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let packet = announcement(mac, ip);
    // SAFETY: the buffer and the address are valid for the lengths given,
    // for the duration of the call.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Announces `addresses` on NIC `name` (index `ifindex`, MAC `mac`) once it
/// has carrier, in the background: the pod's start does not wait for it.
pub fn announce(name: String, ifindex: u32, mac: [u8; 6], addresses: Vec<Ipv4Addr>) {
    if addresses.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + CARRIER_WAIT;
        while !has_carrier(&name) {
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(nic = %name, "no carrier within {CARRIER_WAIT:?}: addresses not announced");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for k in 0..REPEATS {
            if k > 0 {
                tokio::time::sleep(REPEAT_GAP).await;
            }
            for ip in &addresses {
                if let Err(e) = send(ifindex, mac, *ip) {
                    tracing::warn!(nic = %name, %ip, error = %e, "gratuitous ARP not sent");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_names_the_address_as_sender_and_target() {
        let mac = [0x02, 0, 0, 0, 0, 0x01];
        let p = announcement(mac, Ipv4Addr::new(10, 88, 0, 7));
        assert_eq!(&p[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &mac);
        assert_eq!(&p[14..18], &[10, 88, 0, 7]);
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &[10, 88, 0, 7]);
    }
}
