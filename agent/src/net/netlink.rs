//! Just enough rtnetlink (`NETLINK_ROUTE`) to wire a container: a bridge, a
//! veth pair with one end in the container's namespace, addresses, links up,
//! a default route. Each request is one datagram acknowledged by the kernel,
//! so setting up a container costs a few system calls, not a process per
//! step (`ip` would be five).
//!
//! A netlink socket talks to the namespace its opening thread was in: the
//! caller opens one before and one after moving into a container's namespace.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const NLA_F_NESTED: u16 = 1 << 15;

const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

const IFF_UP: u32 = libc::IFF_UP as u32;

/// One request being built: header, fixed part, attributes (each padded to 4 bytes).
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend(0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend(kind.to_ne_bytes());
        buf.extend((flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend(0u32.to_ne_bytes()); // sequence, set by `finish`
        buf.extend(0u32.to_ne_bytes()); // port id: the kernel's
        Self { buf }
    }

    /// `struct ifinfomsg`.
    fn ifinfo(mut self, index: u32, flags: u32, change: u32) -> Self {
        self.ifinfo_raw(index, flags, change);
        self
    }

    fn ifinfo_raw(&mut self, index: u32, flags: u32, change: u32) {
        self.buf.extend([libc::AF_UNSPEC as u8, 0]);
        self.buf.extend(0u16.to_ne_bytes());
        self.buf.extend(index.to_ne_bytes());
        self.buf.extend(flags.to_ne_bytes());
        self.buf.extend(change.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend((len as u16).to_ne_bytes());
        self.buf.extend(kind.to_ne_bytes());
        self.buf.extend(data);
        self.pad();
        self
    }

    fn attr_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    fn attr_u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// Opens a nested attribute; `end` closes it.
    fn begin(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend(0u16.to_ne_bytes());
        self.buf.extend((kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// A `NETLINK_ROUTE` socket of the calling thread's network namespace.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Socket {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd =
            check(unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) })?;
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl (port 0: the kernel picks) is valid.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_nl of `len` bytes.
        check(unsafe { libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) })?;
        Ok(Self { fd, seq: 0 })
    }

    /// Sends `msg` and waits for the kernel's acknowledgement.
    fn request(&mut self, msg: Msg) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: sending an initialised buffer of its own length.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: receiving into a buffer of its own length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap_or_default());
                let their_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
                if len < 16 || len > rest.len() {
                    return Err(io::Error::other("netlink: a truncated answer"));
                }
                if kind == NLMSG_ERROR && their_seq == seq && len >= 20 {
                    let code = i32::from_ne_bytes(rest[16..20].try_into().unwrap_or_default());
                    return if code == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-code)) };
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }

    /// Creates a bridge, up. `AlreadyExists` when there is one of that name.
    pub fn create_bridge(&mut self, name: &str) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL).ifinfo(0, IFF_UP, IFF_UP);
        m.attr_str(IFLA_IFNAME, name);
        let info = m.begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "bridge");
        m.end(info);
        self.request(m)
    }

    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        self.request(Msg::new(RTM_NEWLINK, 0).ifinfo(index, IFF_UP, IFF_UP))
    }

    /// Adds `ip/prefix` to a link (kept if it is there already).
    pub fn add_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
        m.buf.extend([libc::AF_INET as u8, prefix, 0, RT_SCOPE_UNIVERSE]);
        m.buf.extend(index.to_ne_bytes());
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let broadcast = Ipv4Addr::from(u32::from(ip) | !mask);
        m.attr(IFA_LOCAL, &ip.octets()).attr(IFA_ADDRESS, &ip.octets()).attr(IFA_BROADCAST, &broadcast.octets());
        self.request(m)
    }

    /// Removes `ip/prefix` from a link.
    pub fn delete_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = Msg::new(RTM_DELADDR, 0);
        m.buf.extend([libc::AF_INET as u8, prefix, 0, RT_SCOPE_UNIVERSE]);
        m.buf.extend(index.to_ne_bytes());
        m.attr(IFA_LOCAL, &ip.octets()).attr(IFA_ADDRESS, &ip.octets());
        self.request(m)
    }

    /// Creates a veth pair, both ends up: `host` here, attached to the
    /// bridge `master`; `peer` in the namespace `peer_netns`, with the MAC
    /// address `peer_mac`.
    pub fn create_veth(
        &mut self,
        host: &str,
        master: u32,
        peer: &str,
        peer_netns: RawFd,
        peer_mac: [u8; 6],
    ) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL).ifinfo(0, IFF_UP, IFF_UP);
        m.attr_str(IFLA_IFNAME, host).attr_u32(IFLA_MASTER, master);
        let info = m.begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        let data = m.begin(IFLA_INFO_DATA);
        let peer_info = m.begin(VETH_INFO_PEER);
        m.ifinfo_raw(0, 0, 0);
        m.attr_str(IFLA_IFNAME, peer).attr_u32(IFLA_NET_NS_FD, peer_netns as u32).attr(IFLA_ADDRESS, &peer_mac);
        m.end(peer_info);
        m.end(data);
        m.end(info);
        self.request(m)
    }

    /// The default route, through `gateway`.
    pub fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE);
        m.buf.extend([libc::AF_INET as u8, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST]);
        m.buf.extend(0u32.to_ne_bytes());
        m.attr(RTA_GATEWAY, &gateway.octets());
        self.request(m)
    }

    /// Deletes a link (a veth's peer goes with it).
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        self.request(Msg::new(RTM_DELLINK, 0).ifinfo(index, 0, 0))
    }
}

/// The index of the link `name` in the calling thread's namespace.
pub fn index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_laid_out_as_the_kernel_reads_them() {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE).ifinfo(7, IFF_UP, IFF_UP);
        m.attr_str(IFLA_IFNAME, "bt0");
        let info = m.begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        m.end(info);
        let b = m.finish(9);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 9);
        assert_eq!(b.len() % 4, 0);
        // ifinfomsg: the index at offset 4 of it.
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), 7);
        // IFLA_IFNAME "bt0\0": 8 bytes with its header, no padding.
        assert_eq!(&b[32..40], &[8, 0, 3, 0, b'b', b't', b'0', 0]);
        // The nested LINKINFO holds KIND "veth\0" (9 bytes, padded to 12): 4 + 12.
        assert_eq!(u16::from_ne_bytes(b[40..42].try_into().unwrap()), 16);
        assert_eq!(u16::from_ne_bytes(b[42..44].try_into().unwrap()), IFLA_LINKINFO | NLA_F_NESTED);
    }
}
