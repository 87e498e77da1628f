//! Egress networking for `--net egress`: a veth pair and NAT, under a host-wide nftables
//! policy that always drops what a sandbox must never reach.
//!
//! **Addresses.** Every sandbox's `eth0` gets one address of [`SUBNET`] (`/32`), with a route
//! to the gateway [`GATEWAY`] on the link and the default route through it. The host side of
//! every pair, `cv<id>`, carries the same gateway address, and a `/32` route to the sandbox's
//! address. That route is also the address's claim: the kernel refuses a second route to the
//! same destination (`EEXIST`), so concurrent starts never share an address, and the claim
//! goes with the link.
//!
//! **Policy.** One table, `inet cove`, made once per boot and shared by all sandboxes (no
//! per-sandbox firewall work on the default path, which keeps the set-up to a few netlink
//! round trips):
//! - `forward`: packets from `cv*` go through `from_sandbox`; packets to `cv*` pass only as
//!   replies (nothing opens a connection into a sandbox, and no sandbox reaches another);
//! - `input`: a sandbox reaches nothing on the host (any of its addresses), DNS excepted;
//! - `from_sandbox`: DNS to the gateway (translated to the host's resolver) passes; then the
//!   [`ALWAYS_BLOCKED`] ranges and all IPv6 are dropped; then the sandbox's own lists, if it
//!   has any (a chain `sb_<id>` reached through the verdict map `sandbox_policy`);
//! - `deny`: counts the packet per sandbox (set `denied`, by interface name), logs it to the
//!   kernel log with the prefix `cove egress denied: ` (the line carries `IN=cv<id>`), at most
//!   [`LOG_PER_SECOND`] lines per second per sandbox, and drops it;
//! - NAT: DNS to the gateway is translated to the host's resolver; the subnet is masqueraded
//!   on its way out.
//!
//! Its lists are the only per-sandbox firewall state (one `nft` run at start and one at the
//! end); a sandbox without lists costs none. The pair dies with the sandbox's network
//! namespace; its counters expire ([`COUNTER_TTL`]); its lists' chain is removed by
//! [`Egress::finish`], or by [`reap`] after a crash. [`remove_host_setup`] undoes the rest
//! once no sandbox has egress.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use cove_types::SandboxId;
use cove_types::egress::{ALWAYS_BLOCKED, EgressPolicy, EgressRule};

use crate::netns::NetNs;
use crate::sys::netlink::Netlink;

/// The sandboxes' addresses.
pub const SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 88, 0, 0), 16);
/// Their gateway (the host's side of every pair), and their resolver.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The nftables table (family `inet`).
pub const TABLE: &str = "cove";
/// Seconds a sandbox's drop counter lives after its last drop. Counters are not removed at
/// teardown: an nftables transaction waits for an RCU grace period, measured at 5 to 11 ms
/// here, so they expire instead.
pub const COUNTER_TTL: u32 = 3600;
/// Log lines per second per sandbox, at most.
pub const LOG_PER_SECOND: u32 = 10;
/// The sandbox's side of its pair.
pub const SANDBOX_LINK: &str = "eth0";
/// Where the host-wide settings are locked and recorded.
const HOST_STATE: &str = "/run/cove/egress";

/// The host side of a sandbox's pair: `cv<id>` (14 characters; names are at most 15).
pub fn host_link(id: &SandboxId) -> String {
    format!("cv{id}")
}

fn policy_chain(id: &SandboxId) -> String {
    format!("sb_{id}")
}

/// Why egress could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("nft failed ({what}): {message}")]
    Nft { what: String, message: String },
    #[error("no address left in {}/{}", SUBNET.0, SUBNET.1)]
    NoAddress,
    #[error(
        "no DNS resolver for sandboxes: the host's /etc/resolv.conf names no IPv4 nameserver; \
         set COVE_EGRESS_DNS"
    )]
    NoResolver,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EgressError {
    let what = what.into();
    move |source| EgressError::Io { what, source }
}

/// The resolver sandboxes' DNS goes to: `COVE_EGRESS_DNS`, else the host's first IPv4
/// nameserver.
pub fn upstream_dns() -> Result<Ipv4Addr, EgressError> {
    if let Ok(v) = std::env::var("COVE_EGRESS_DNS") {
        return v.trim().parse().map_err(|_| EgressError::Io {
            what: format!("COVE_EGRESS_DNS={v:?}"),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not an IPv4 address"),
        });
    }
    let conf = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|v| v.trim().parse::<Ipv4Addr>().ok())
        .ok_or(EgressError::NoResolver)
}

fn nft(script: &str, what: &str) -> Result<String, EgressError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| EgressError::Nft {
            what: what.into(),
            message: if e.kind() == io::ErrorKind::NotFound {
                "nft is not installed (Debian: apt-get install nftables)".into()
            } else {
                e.to_string()
            },
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(io_err("wait for nft"))?;
    if !out.status.success() {
        return Err(EgressError::Nft {
            what: what.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft_json(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new("nft")
        .arg("-j")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn base_table() -> String {
    let blocked: Vec<String> = ALWAYS_BLOCKED
        .iter()
        .map(|(a, p, _)| format!("{a}/{p}"))
        .collect();
    let (net, bits) = SUBNET;
    format!(
        "table inet {TABLE} {{
  set denied {{ type ifname; flags dynamic,timeout; timeout {COUNTER_TTL}s; counter; size 65536; }}
  set deny_log {{ type ifname; flags dynamic,timeout; timeout 10s; size 65536; }}
  map sandbox_policy {{ type ifname : verdict; }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname \"cv*\" jump from_sandbox
    oifname \"cv*\" ct state established,related accept
    oifname \"cv*\" drop
  }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname \"cv*\" ct status dnat meta l4proto {{ tcp, udp }} th dport 53 accept
    iifname \"cv*\" ct state established,related accept
    iifname \"cv*\" goto deny
  }}
  chain from_sandbox {{
    ct status dnat meta l4proto {{ tcp, udp }} th dport 53 accept
    ip daddr {{ {} }} goto deny
    meta nfproto ipv6 goto deny
    iifname vmap @sandbox_policy
    accept
  }}
  chain deny {{
    update @denied {{ iifname }}
    add @deny_log {{ iifname limit rate over {LOG_PER_SECOND}/second }} drop
    log prefix \"cove egress denied: \" level info
    drop
  }}
  chain nat_prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
  chain nat_postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {net}/{bits} oifname != \"cv*\" masquerade
  }}
}}
",
        blocked.join(", ")
    )
}

fn dns_rule(dns: Ipv4Addr) -> String {
    format!(
        "flush chain inet {TABLE} nat_prerouting\n\
         add rule inet {TABLE} nat_prerouting iifname \"cv*\" ip daddr {GATEWAY} \
         meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {dns}\n"
    )
}

/// Makes the host ready (once per boot, and again if the table was removed or the resolver
/// changed): IPv4 forwarding on, the table in place, DNS translated to `dns`. Cheap when
/// nothing is to be done: one netfilter netlink request and one small file read.
pub fn ensure_host(dns: Ipv4Addr) -> Result<(), EgressError> {
    let exists = |nl: &mut Netlink| nl.nft_inet_table_exists(TABLE);
    let recorded = Path::new(HOST_STATE).join("dns");
    let mut nl = Netlink::open_netfilter().map_err(io_err("open a netfilter socket"))?;
    let wanted = dns.to_string();
    let is_ready = |nl: &mut Netlink| -> Result<bool, EgressError> {
        Ok(exists(nl).map_err(io_err("look for the nftables table"))?
            && fs::read_to_string(&recorded).is_ok_and(|d| d.trim() == wanted))
    };
    if is_ready(&mut nl)? {
        return Ok(());
    }
    fs::create_dir_all(HOST_STATE).map_err(io_err(format!("create {HOST_STATE}")))?;
    let lock_path = Path::new(HOST_STATE).join("lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("open {}", lock_path.display())))?;
    lock.lock()
        .map_err(io_err(format!("lock {}", lock_path.display())))?;
    if is_ready(&mut nl)? {
        return Ok(());
    }
    // What forwarding was before Cove turned it on, for `remove_host_setup`.
    let before = Path::new(HOST_STATE).join("ip_forward.before");
    if !before.exists() {
        let was = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
        fs::write(&before, was.trim()).map_err(io_err(format!("write {}", before.display())))?;
    }
    fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(io_err("turn on IPv4 forwarding"))?;
    let mut script = String::new();
    if !exists(&mut nl).map_err(io_err("look for the nftables table"))? {
        script.push_str(&base_table());
    }
    script.push_str(&dns_rule(dns));
    nft(&script, "create the egress table")?;
    fs::write(&recorded, &wanted).map_err(io_err(format!("write {}", recorded.display())))?;
    Ok(())
}

fn rule_match(r: &EgressRule) -> String {
    let dst = if r.prefix == 32 {
        r.addr.to_string()
    } else {
        format!("{}/{}", r.addr, r.prefix)
    };
    match r.ports {
        None => format!("ip daddr {dst}"),
        Some((a, b)) if a == b => {
            format!("ip daddr {dst} meta l4proto {{ tcp, udp }} th dport {a}")
        }
        Some((a, b)) => format!("ip daddr {dst} meta l4proto {{ tcp, udp }} th dport {a}-{b}"),
    }
}

/// The nft script of a sandbox's lists.
fn policy_script(id: &SandboxId, policy: &EgressPolicy) -> String {
    let chain = policy_chain(id);
    let mut s = format!("add chain inet {TABLE} {chain}\n");
    for r in &policy.deny {
        s.push_str(&format!(
            "add rule inet {TABLE} {chain} {} goto deny\n",
            rule_match(r)
        ));
    }
    for r in &policy.allow {
        s.push_str(&format!(
            "add rule inet {TABLE} {chain} {} accept\n",
            rule_match(r)
        ));
    }
    if !policy.allow.is_empty() {
        s.push_str(&format!("add rule inet {TABLE} {chain} goto deny\n"));
    }
    s.push_str(&format!(
        "add element inet {TABLE} sandbox_policy {{ \"{}\" : goto {chain} }}\n",
        host_link(id)
    ));
    s
}

/// A sandbox's egress, set up; torn down by [`Egress::finish`], or when dropped.
#[derive(Debug)]
pub struct Egress {
    id: SandboxId,
    /// The sandbox's address.
    pub addr: Ipv4Addr,
    has_policy: bool,
    done: bool,
}

/// The first address tried for a sandbox: spread by its id, so that concurrent starts rarely
/// try the same one.
fn first_slot(id: &SandboxId) -> u32 {
    let h = id
        .as_str()
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    h % slots()
}

/// Usable host numbers of the subnet (without the network address and the gateway; the
/// broadcast address is fine on point-to-point /32s but kept out for clarity).
fn slots() -> u32 {
    (1u32 << (32 - SUBNET.1)) - 3
}

fn slot_addr(slot: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(SUBNET.0) + 2 + slot)
}

/// Gives sandbox `id` (whose network namespace is `sandbox`) its pair, address, routes and
/// lists. Call it from the thread that will create the sandbox, in any namespace: it works
/// from `home` (the host's) and leaves the thread there. On failure nothing is left behind.
pub fn setup(
    id: &SandboxId,
    policy: &EgressPolicy,
    sandbox: &NetNs,
    home: &NetNs,
) -> Result<Egress, EgressError> {
    sandbox
        .enter()
        .map_err(io_err("enter the sandbox's network namespace"))?;
    let inner = Netlink::open().map_err(io_err("open a netlink socket in the sandbox"));
    home.enter()
        .map_err(io_err("return to the host's network namespace"))?;
    let mut inner = inner?;
    let dns = upstream_dns()?;
    ensure_host(dns)?;
    let mut host = Netlink::open().map_err(io_err("open a netlink socket"))?;
    let link = host_link(id);
    host.add_veth(&link, SANDBOX_LINK, sandbox.as_raw_fd())
        .map_err(io_err(format!("create the veth pair {link}")))?;
    let mut egress = Egress {
        id: *id,
        addr: GATEWAY,
        has_policy: false,
        done: false,
    };
    // On failure, dropping `egress` removes what was made.
    configure(&mut egress, &mut host, &mut inner, policy, dns).map(|()| egress)
}

fn configure(
    egress: &mut Egress,
    host: &mut Netlink,
    inner: &mut Netlink,
    policy: &EgressPolicy,
    dns: Ipv4Addr,
) -> Result<(), EgressError> {
    let id = egress.id;
    let link = host_link(&id);
    let index = host
        .index(&link)
        .map_err(io_err(format!("find link {link}")))?;
    host.add_addr4(index, GATEWAY, 32)
        .map_err(io_err(format!("address {link}")))?;
    host.set_up(index)
        .map_err(io_err(format!("set {link} up")))?;
    if dns.is_loopback() {
        // The host's resolver listens on loopback: DNS translated to it must be routable from
        // this link (everything else to loopback stays dropped by the `input` chain).
        let path = format!("/proc/sys/net/ipv4/conf/{link}/route_localnet");
        fs::write(&path, "1").map_err(io_err(format!("write {path}")))?;
    }
    let start = first_slot(&id);
    let mut claimed = None;
    for i in 0..slots() {
        let addr = slot_addr((start + i) % slots());
        match host.add_route4(addr, 32, None, index) {
            Ok(()) => {
                claimed = Some(addr);
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(io_err(format!("route to the sandbox via {link}"))(e)),
        }
    }
    egress.addr = claimed.ok_or(EgressError::NoAddress)?;
    if !policy.is_empty() {
        egress.has_policy = true;
        nft(
            &policy_script(&id, policy),
            "apply the sandbox's egress lists",
        )?;
    }
    let eth = inner
        .index(SANDBOX_LINK)
        .map_err(io_err("find the sandbox's eth0"))?;
    inner
        .add_addr4(eth, egress.addr, 32)
        .map_err(io_err("address the sandbox's eth0"))?;
    inner
        .set_up(eth)
        .map_err(io_err("set the sandbox's eth0 up"))?;
    inner
        .add_route4(GATEWAY, 32, None, eth)
        .map_err(io_err("route the sandbox to its gateway"))?;
    inner
        .add_route4(Ipv4Addr::UNSPECIFIED, 0, Some(GATEWAY), eth)
        .map_err(io_err("give the sandbox a default route"))?;
    Ok(())
}

/// The interface names in set `set` of a `nft -j list table` answer.
fn elements(table: &serde_json::Value, set: &str) -> Vec<String> {
    table["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["set"]["name"] == set)
        .filter_map(|o| o["set"]["elem"].as_array())
        .flatten()
        // A plain element is its value; one with a counter or an expiry is an object.
        .filter_map(|e| e.as_str().or_else(|| e["elem"]["val"].as_str()))
        .map(str::to_string)
        .collect()
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Egress {
    /// Leaves everything in place, for [`finish_of`] to remove when the detached sandbox ends.
    pub fn forget(mut self) {
        self.done = true;
    }

    /// Removes the pair, the sandbox's lists and its counter; returns how many of its packets
    /// the policy dropped (once; `None` after). Errors are ignored: what is left, [`reap`]
    /// finds.
    pub fn finish(&mut self) -> Option<u64> {
        if std::mem::replace(&mut self.done, true) {
            return None;
        }
        finish_of(&self.id, self.has_policy)
    }
}

/// [`Egress::finish`] for the sandbox `id` (with lists: `has_policy`), from any process.
pub fn finish_of(id: &SandboxId, has_policy: bool) -> Option<u64> {
    // The pair goes with the sandbox's network namespace, which the kernel tears down on
    // its own once the sandbox's last process is gone. Deleting it here instead made the
    // supervisor wait about 20 ms (the kernel's unregistering waits for RCU grace periods).
    let link = host_link(id);
    // Straight over netfilter's netlink: an `nft` run costs about 5 ms here.
    let mut denied = None;
    if let Ok(mut nf) = Netlink::open_netfilter() {
        denied = nf
            .nft_ifname_counter(TABLE, "denied", &link)
            .ok()
            .map(|n| n.unwrap_or(0));
    }
    if has_policy {
        let _ = nft(
            &format!(
                "delete element inet {TABLE} sandbox_policy {{ \"{link}\" }}\n\
                 delete chain inet {TABLE} {}\n",
                policy_chain(id)
            ),
            "remove the sandbox's egress lists",
        );
    }
    denied
}

/// A running sandbox's egress traffic: (bytes it received, bytes it sent, its packets that the
/// policy dropped), or `None` without egress. Read from its host-side link's counters and the
/// `denied` set (one netlink request).
pub fn usage(id: &SandboxId) -> Option<(u64, u64, u64)> {
    let link = host_link(id);
    let stat = |name: &str| -> Option<u64> {
        fs::read_to_string(format!("/sys/class/net/{link}/statistics/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    // The host side sends what the sandbox receives, and the other way round.
    let (received, sent) = (stat("tx_bytes")?, stat("rx_bytes")?);
    let denied = Netlink::open_netfilter()
        .and_then(|mut nf| nf.nft_ifname_counter(TABLE, "denied", &link))
        .ok()
        .flatten()
        .unwrap_or(0);
    Some((received, sent, denied))
}

/// Removes sandbox `id`'s drop counter and log limiter from their sets. Each removal is an
/// nftables transaction (5 to 11 ms here), so this is for a long-lived caller after the
/// sandbox's end, off anyone's path (the server's agent); otherwise they expire.
pub fn forget_counters(id: &SandboxId) {
    let link = host_link(id);
    if let Ok(mut nf) = Netlink::open_netfilter() {
        for set in ["denied", "deny_log"] {
            // Not there (nothing was dropped lately) is fine.
            let _ = nf.nft_delete_ifname(TABLE, set, &link);
        }
    }
}

/// Undoes [`ensure_host`] when no sandbox has egress (no `cv*` link is left): removes the
/// table, puts IPv4 forwarding back as it was, and removes the host state. Returns what it
/// removed; nothing while a sandbox still uses egress.
pub fn remove_host_setup() -> Vec<String> {
    let mut removed = Vec::new();
    let in_use = Netlink::open()
        .and_then(|mut nl| nl.link_names())
        .map(|names| {
            names.iter().any(|n| {
                n.strip_prefix("cv")
                    .is_some_and(|id| id.parse::<SandboxId>().is_ok())
            })
        })
        .unwrap_or(true);
    if in_use {
        return removed;
    }
    let exists = Netlink::open_netfilter()
        .and_then(|mut nf| nf.nft_inet_table_exists(TABLE))
        .unwrap_or(false);
    if exists
        && nft(
            &format!("delete table inet {TABLE}\n"),
            "remove the egress table",
        )
        .is_ok()
    {
        removed.push(format!("nftables table inet {TABLE}"));
    }
    let dir = Path::new(HOST_STATE);
    if let Ok(was) = fs::read_to_string(dir.join("ip_forward.before"))
        && fs::write("/proc/sys/net/ipv4/ip_forward", was.trim()).is_ok()
    {
        removed.push(format!("IPv4 forwarding set back to {}", was.trim()));
    }
    if fs::remove_dir_all(dir).is_ok() {
        removed.push(format!("egress state {HOST_STATE}"));
    }
    removed
}

/// Removes the egress objects of sandboxes that `is_live` says are gone: `cv<id>` links,
/// `sb_<id>` chains with their map entries, and `denied` counters. One line per object.
pub fn reap(is_live: impl Fn(&SandboxId) -> bool) -> (Vec<String>, Vec<String>) {
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    let dead = |name: &str, prefix: &str| -> Option<SandboxId> {
        let id: SandboxId = name.strip_prefix(prefix)?.parse().ok()?;
        (!is_live(&id)).then_some(id)
    };
    if let Ok(mut nl) = Netlink::open() {
        for name in nl.link_names().unwrap_or_default() {
            if dead(&name, "cv").is_some() {
                match nl.delete_link(&name) {
                    Ok(()) => removed.push(format!("veth {name}")),
                    Err(e) => failed.push(format!("veth {name}: {e}")),
                }
            }
        }
    }
    let Some(table) = nft_json(&["list", "table", "inet", TABLE]) else {
        return (removed, failed);
    };
    let mut script = String::new();
    let mut what = Vec::new();
    for o in table["nftables"].as_array().into_iter().flatten() {
        if let Some(name) = o["chain"]["name"].as_str()
            && let Some(id) = dead(name, "sb_")
        {
            let link = host_link(&id);
            script.push_str(&format!(
                "delete element inet {TABLE} sandbox_policy {{ \"{link}\" }}\n\
                 delete chain inet {TABLE} {name}\n"
            ));
            what.push(format!("nftables chain {name}"));
        }
    }
    for set in ["denied", "deny_log"] {
        for link in elements(&table, set) {
            if dead(&link, "cv").is_some() {
                script.push_str(&format!(
                    "delete element inet {TABLE} {set} {{ \"{link}\" }}\n"
                ));
                what.push(format!("nftables {set} entry of {link}"));
            }
        }
    }
    if !script.is_empty() {
        match nft(&script, "remove stale egress state") {
            Ok(_) => removed.extend(what),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (removed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cover_the_subnet_without_network_or_gateway() {
        assert_eq!(slot_addr(0), Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(slot_addr(slots() - 1), Ipv4Addr::new(10, 88, 255, 254));
        let id: SandboxId = "0123456789ab".parse().unwrap();
        assert!(first_slot(&id) < slots());
        assert_eq!(host_link(&id).len(), 14);
    }

    #[test]
    fn lists_become_one_chain_deny_first() {
        let id: SandboxId = "0123456789ab".parse().unwrap();
        let p = EgressPolicy {
            allow: vec![
                "203.0.113.0/24:443".parse().unwrap(),
                "198.51.100.7".parse().unwrap(),
            ],
            deny: vec!["203.0.113.9:8000-8100".parse().unwrap()],
        };
        let s = policy_script(&id, &p);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "add chain inet cove sb_0123456789ab");
        assert!(lines[1].ends_with(
            "ip daddr 203.0.113.9 meta l4proto { tcp, udp } th dport 8000-8100 goto deny"
        ));
        assert!(
            lines[2]
                .ends_with("ip daddr 203.0.113.0/24 meta l4proto { tcp, udp } th dport 443 accept")
        );
        assert!(lines[3].ends_with("ip daddr 198.51.100.7 accept"));
        assert!(lines[4].ends_with("sb_0123456789ab goto deny"));
        assert!(lines[5].contains("\"cv0123456789ab\" : goto sb_0123456789ab"));
        // A deny list alone ends without a final drop.
        let d = EgressPolicy {
            allow: vec![],
            deny: vec!["203.0.113.9".parse().unwrap()],
        };
        assert!(!policy_script(&id, &d).contains("sb_0123456789ab goto deny"));
    }

    #[test]
    fn the_base_table_blocks_every_always_blocked_range() {
        let t = base_table();
        for (a, p, _) in ALWAYS_BLOCKED {
            assert!(t.contains(&format!("{a}/{p}")), "{a}/{p}");
        }
        assert!(t.contains("10.88.0.0/16"));
    }
}
