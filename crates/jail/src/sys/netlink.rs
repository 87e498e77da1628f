//! A minimal rtnetlink client: the handful of messages egress networking needs (a veth pair
//! across two network namespaces, addresses, routes, links up and down), sent over a socket
//! that belongs to the network namespace it was opened in. Message layouts are those of
//! `linux/netlink.h`, `linux/rtnetlink.h`, `linux/if_link.h` and `linux/veth.h`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::check;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const NLA_F_NESTED: u16 = 0x8000;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 1;
const HEADER: usize = 16;

/// An rtnetlink socket of the network namespace it was opened in.
pub(crate) struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// Appends attribute `ty` holding `data`, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    pad(buf);
}

/// Appends a nested attribute `ty` whose content `f` writes.
fn nest(buf: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    pad(buf);
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// `struct ifinfomsg` (16 bytes).
fn ifinfomsg(index: i32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4]; // family AF_UNSPEC, pad, type
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&change.to_ne_bytes());
    b
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The attributes after a fixed-size header `skip` in a message body: (type, data).
fn attrs(body: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = skip;
    while at + 4 <= body.len() {
        let len = u16_at(body, at) as usize;
        if len < 4 || at + len > body.len() {
            break;
        }
        out.push((
            u16_at(body, at + 2) & !NLA_F_NESTED,
            &body[at + 4..at + len],
        ));
        at += len.div_ceil(4) * 4;
    }
    out
}

impl Netlink {
    /// An rtnetlink socket of the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Netlink> {
        Netlink::open_protocol(libc::NETLINK_ROUTE)
    }

    /// An nfnetlink (netfilter) socket of the calling thread's network namespace.
    pub(crate) fn open_netfilter() -> io::Result<Netlink> {
        Netlink::open_protocol(libc::NETLINK_NETFILTER)
    }

    fn open_protocol(protocol: libc::c_int) -> io::Result<Netlink> {
        // SAFETY: plain integer arguments; returns a new descriptor.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        })?;
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink { fd, seq: 0 })
    }

    /// Appends one message to `out`; returns its sequence number.
    fn message(&mut self, out: &mut Vec<u8>, ty: u16, flags: u16, body: &[u8]) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        out.extend_from_slice(&((HEADER + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        out.extend_from_slice(&self.seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(body);
        pad(out);
        self.seq
    }

    fn send(&mut self, ty: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        let mut msg = Vec::with_capacity(HEADER + body.len());
        let seq = self.message(&mut msg, ty, flags, body);
        self.send_bytes(&msg)?;
        Ok(seq)
    }

    fn send_bytes(&mut self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: `msg` is a valid buffer of its length; the kernel is the destination
        // (an unbound netlink socket sends to the kernel).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the replies to request `seq`, calling `each` with every message's type and body,
    /// until its acknowledgement (or the end of a dump). A negative acknowledgement is the
    /// error it carries.
    fn replies(&mut self, seq: u32, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: `buf` is a valid writable buffer of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let data = &buf[..n as usize];
            let mut at = 0;
            while at + HEADER <= data.len() {
                let len = u32_at(data, at) as usize;
                if len < HEADER || at + len > data.len() {
                    return Err(io::Error::other("a malformed netlink reply"));
                }
                let (ty, mseq) = (u16_at(data, at + 4), u32_at(data, at + 8));
                let body = &data[at + HEADER..at + len];
                at += len.div_ceil(4) * 4;
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    NLMSG_DONE => return Ok(()),
                    _ => each(ty, body),
                }
            }
        }
    }

    fn request(&mut self, ty: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        let seq = self.send(ty, flags | NLM_F_ACK, body)?;
        self.replies(seq, |_, _| {})
    }

    /// A veth pair: `name` here, `peer` in the network namespace of `peer_ns`.
    pub(crate) fn add_veth(&mut self, name: &str, peer: &str, peer_ns: RawFd) -> io::Result<()> {
        let mut b = ifinfomsg(0, 0, 0);
        attr(&mut b, IFLA_IFNAME, &cstr(name));
        nest(&mut b, IFLA_LINKINFO, |b| {
            attr(b, IFLA_INFO_KIND, b"veth");
            nest(b, IFLA_INFO_DATA, |b| {
                nest(b, VETH_INFO_PEER, |b| {
                    b.extend_from_slice(&ifinfomsg(0, 0, 0));
                    attr(b, IFLA_IFNAME, &cstr(peer));
                    attr(b, IFLA_NET_NS_FD, &(peer_ns as u32).to_ne_bytes());
                });
            });
        });
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &b)
    }

    /// The index of link `name`.
    pub(crate) fn index(&mut self, name: &str) -> io::Result<i32> {
        let mut b = ifinfomsg(0, 0, 0);
        attr(&mut b, IFLA_IFNAME, &cstr(name));
        let seq = self.send(RTM_GETLINK, NLM_F_ACK, &b)?;
        let mut index = None;
        self.replies(seq, |ty, body| {
            if ty == RTM_NEWLINK && body.len() >= 16 {
                index = Some(u32_at(body, 4) as i32);
            }
        })?;
        index.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    /// Sets link `index` up.
    pub(crate) fn set_up(&mut self, index: i32) -> io::Result<()> {
        self.request(RTM_NEWLINK, 0, &ifinfomsg(index, IFF_UP, IFF_UP))
    }

    /// Deletes link `name` (and a veth's peer with it).
    pub(crate) fn delete_link(&mut self, name: &str) -> io::Result<()> {
        let mut b = ifinfomsg(0, 0, 0);
        attr(&mut b, IFLA_IFNAME, &cstr(name));
        self.request(RTM_DELLINK, 0, &b)
    }

    /// Every link's name.
    pub(crate) fn link_names(&mut self) -> io::Result<Vec<String>> {
        let seq = self.send(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0))?;
        let mut names = Vec::new();
        self.replies(seq, |ty, body| {
            if ty != RTM_NEWLINK {
                return;
            }
            for (t, data) in attrs(body, 16) {
                if t == IFLA_IFNAME {
                    let s = data.split(|b| *b == 0).next().unwrap_or_default();
                    names.push(String::from_utf8_lossy(s).into_owned());
                }
            }
        })?;
        Ok(names)
    }

    /// Whether nftables table `name` of the `inet` family exists (on an nfnetlink socket).
    pub(crate) fn nft_inet_table_exists(&mut self, name: &str) -> io::Result<bool> {
        const NFT_MSG_GETTABLE: u16 = (10 << 8) | 1;
        const NFTA_TABLE_NAME: u16 = 1;
        let mut b = vec![NFPROTO_INET, 0, 0, 0];
        attr(&mut b, NFTA_TABLE_NAME, &cstr(name));
        match self.request(NFT_MSG_GETTABLE, 0, &b) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The packet counter of element `ifname` of an `inet` set keyed by interface name
    /// (one element asked for, not the set dumped); `None` when it has no such element.
    pub(crate) fn nft_ifname_counter(
        &mut self,
        table: &str,
        set: &str,
        ifname: &str,
    ) -> io::Result<Option<u64>> {
        let seq = self.send(
            NFT_MSG_GETSETELEM,
            NLM_F_ACK,
            &ifname_element(table, set, ifname),
        )?;
        let mut found = None;
        let asked = self.replies(seq, |ty, body| {
            if ty != NFT_MSG_NEWSETELEM {
                return;
            }
            for (_, list) in attrs(body, 4)
                .into_iter()
                .filter(|(t, _)| *t == NFTA_SET_ELEM_LIST_ELEMENTS)
            {
                for (_, elem) in attrs(list, 0)
                    .into_iter()
                    .filter(|(t, _)| *t == NFTA_LIST_ELEM)
                {
                    found = set_element(elem).map(|(_, n)| n).or(found);
                }
            }
        });
        match asked {
            Ok(()) => Ok(found),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the element `ifname` of an `inet` set keyed by interface name, in a
    /// transaction of its own (which waits for an RCU grace period: milliseconds). `ENOENT`
    /// when there is none.
    pub(crate) fn nft_delete_ifname(
        &mut self,
        table: &str,
        set: &str,
        ifname: &str,
    ) -> io::Result<()> {
        let b = ifname_element(table, set, ifname);
        // A batch: begin, the change, end; begin names the subsystem in its res_id.
        let batch = [0u8, 0, 0, 10];
        let mut msg = Vec::new();
        self.message(&mut msg, NFNL_MSG_BATCH_BEGIN, 0, &batch);
        let seq = self.message(&mut msg, NFT_MSG_DELSETELEM, NLM_F_ACK, &b);
        self.message(&mut msg, NFNL_MSG_BATCH_END, 0, &batch);
        self.send_bytes(&msg)?;
        self.replies(seq, |_, _| {})
    }

    /// Adds `addr/prefix` to link `index`.
    pub(crate) fn add_addr4(&mut self, index: i32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut b = vec![libc::AF_INET as u8, prefix, 0, RT_SCOPE_UNIVERSE];
        b.extend_from_slice(&(index as u32).to_ne_bytes());
        attr(&mut b, IFA_LOCAL, &addr.octets());
        attr(&mut b, IFA_ADDRESS, &addr.octets());
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &b)
    }

    /// Adds a route to `dst/prefix` out of link `index`, through `gateway` or on the link. It
    /// fails with `EEXIST` if that destination has a route already.
    pub(crate) fn add_route4(
        &mut self,
        dst: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        index: i32,
    ) -> io::Result<()> {
        let scope = if gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        };
        let mut b = vec![
            libc::AF_INET as u8,
            prefix,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_STATIC,
            scope,
            RTN_UNICAST,
        ];
        b.extend_from_slice(&0u32.to_ne_bytes());
        if prefix > 0 {
            attr(&mut b, RTA_DST, &dst.octets());
        }
        if let Some(g) = gateway {
            attr(&mut b, RTA_GATEWAY, &g.octets());
        }
        attr(&mut b, RTA_OIF, &(index as u32).to_ne_bytes());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &b)
    }
}

const NFPROTO_INET: u8 = 1;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_DELSETELEM: u16 = (10 << 8) | 14;
const NFT_MSG_NEWSETELEM: u16 = (10 << 8) | 12;
const NFT_MSG_GETSETELEM: u16 = (10 << 8) | 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// The body naming element `ifname` (zero-padded to `IFNAMSIZ`) of set `set` of `inet` table
/// `table`.
fn ifname_element(table: &str, set: &str, ifname: &str) -> Vec<u8> {
    let mut key = [0u8; 16];
    let n = ifname.len().min(15);
    key[..n].copy_from_slice(&ifname.as_bytes()[..n]);
    let mut b = vec![NFPROTO_INET, 0, 0, 0];
    attr(&mut b, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
    attr(&mut b, NFTA_SET_ELEM_LIST_SET, &cstr(set));
    nest(&mut b, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
        nest(b, NFTA_LIST_ELEM, |b| {
            nest(b, NFTA_SET_ELEM_KEY, |b| attr(b, NFTA_DATA_VALUE, &key));
        });
    });
    b
}

/// One set element (`NFTA_LIST_ELEM` content) keyed by interface name: its name and the
/// packets of its counter (0 without one).
fn set_element(elem: &[u8]) -> Option<(String, u64)> {
    let mut name = None;
    let mut packets = 0;
    let counter = |expr: &[u8]| -> Option<u64> {
        let parts = attrs(expr, 0);
        let is_counter = parts
            .iter()
            .any(|(t, d)| *t == NFTA_EXPR_NAME && d.starts_with(b"counter\0"));
        let data = parts.iter().find(|(t, _)| *t == NFTA_EXPR_DATA)?.1;
        let p = attrs(data, 0)
            .into_iter()
            .find(|(t, _)| *t == NFTA_COUNTER_PACKETS)?
            .1;
        (is_counter && p.len() == 8).then(|| u64::from_be_bytes(p.try_into().unwrap_or([0; 8])))
    };
    for (t, data) in attrs(elem, 0) {
        match t {
            NFTA_SET_ELEM_KEY => {
                let value = attrs(data, 0)
                    .into_iter()
                    .find(|(t, _)| *t == NFTA_DATA_VALUE)?
                    .1;
                let s = value.split(|b| *b == 0).next().unwrap_or_default();
                name = Some(String::from_utf8_lossy(s).into_owned());
            }
            NFTA_SET_ELEM_EXPR => packets = counter(data).unwrap_or(packets),
            NFTA_SET_ELEM_EXPRESSIONS => {
                for (_, e) in attrs(data, 0) {
                    packets = counter(e).unwrap_or(packets);
                }
            }
            _ => {}
        }
    }
    Some((name?, packets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counted_set_element_as_the_kernel_sends_it() {
        // NFTA_SET_ELEM_LIST_ELEMENTS of a NEWSETELEM reply (kernel 6.18): one element, key
        // "cv27df104728c4", a counter of 0x1d bytes and 1 packet.
        let list: &[u8] = b"\x48\x00\x01\x00\x18\x00\x01\x00\x14\x00\x01\x00cv27df104728c4\x00\x00\
            \x2c\x00\x07\x00\x0c\x00\x01\x00counter\x00\x1c\x00\x02\x00\x0c\x00\x01\x00\
            \x00\x00\x00\x00\x00\x00\x00\x1d\x0c\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x01";
        let elems = attrs(list, 0);
        assert_eq!(elems.len(), 1);
        assert_eq!(elems[0].0, NFTA_LIST_ELEM);
        assert_eq!(
            set_element(elems[0].1),
            Some(("cv27df104728c4".to_string(), 1))
        );
    }

    #[test]
    fn attributes_are_padded_and_nested_lengths_cover_their_content() {
        let mut b = Vec::new();
        attr(&mut b, 3, b"cv1\0x");
        assert_eq!(b.len(), 12);
        assert_eq!(u16_at(&b, 0), 9);
        let mut n = Vec::new();
        nest(&mut n, 18, |n| attr(n, 1, b"veth"));
        assert_eq!(u16_at(&n, 0), 12);
        assert_eq!(u16_at(&n, 2), 18 | NLA_F_NESTED);
        let parsed = attrs(&n, 0);
        assert_eq!(parsed, vec![(18, &n[4..12])]);
        assert_eq!(attrs(&n[4..], 0), vec![(1, &b"veth"[..])]);
    }
}
