//! Bridge networking (`network: bridge`), done by the agent itself — no
//! daemon, no CNI plugin processes: a bridge per device, a network namespace
//! and a veth pair per container (rtnetlink, `netlink`), an address from the
//! device's subnet (`ipam`, kept on flash so it survives an agent restart),
//! NAT and published ports in the agent's own nftables tables (`rules`,
//! loaded whole by one `nft -f -`), names in a hosts file kept current, and
//! bandwidth limits with `tc` (tbf) where a workload asks for them.
//!
//! A container's namespace is a bind mount under `run_dir/net/<id>/netns`
//! (tmpfs: a reboot takes it with the container), so it outlives the agent
//! and the shim: a restarted agent re-adopts a container with its address,
//! and a restarted container of the same instance keeps it.

pub mod ipam;
pub mod netlink;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use baton_protocol::spec::{Bandwidth, ContainerSpec, NetworkMode, Publish};
use baton_protocol::{Endpoint, ServiceEndpoints, ServicePort};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use ipam::Subnet;

pub const DEFAULT_BRIDGE: &str = "baton0";
pub const DEFAULT_SUBNET: &str = "10.47.0.0/24";

/// The device's bridge network, from the agent's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The bridge's name; also the name of the agent's nftables tables, so
    /// two agents on one host (with two bridges) keep apart.
    pub bridge: String,
    pub subnet: Subnet,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self { bridge: DEFAULT_BRIDGE.into(), subnet: DEFAULT_SUBNET.parse().expect("the default subnet parses") }
    }
}

/// What the runtime needs to start a bridged container.
#[derive(Debug, Clone)]
pub struct Wired {
    pub address: Ipv4Addr,
    /// The namespace to join (OCI `linux.namespaces[network].path`).
    pub netns: PathBuf,
    /// Bind-mounted read-only at /etc/hosts and /etc/resolv.conf.
    pub hosts: PathBuf,
    pub resolv: PathBuf,
}

/// Kept beside each bridged container (tmpfs): what the rules and hosts
/// files need of it, read back by a restarted agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    workload: String,
    hostname: String,
    address: Ipv4Addr,
    publish: Vec<Publish>,
    allow_from: Option<Vec<String>>,
    bandwidth: Bandwidth,
}

/// A service some workload on this device uses, as the desired document
/// gives it, with the address it is reached at here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Service {
    name: String,
    vip: Ipv4Addr,
    consumers: Vec<String>,
    ports: Vec<ServicePort>,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Default)]
struct State {
    leases: ipam::Leases,
    records: BTreeMap<String, Record>,
    services: Vec<Service>,
    bridge_ready: bool,
    /// Service addresses put on the bridge.
    vips: BTreeSet<Ipv4Addr>,
    /// Sockets bound to each container's published ports, held while it
    /// runs: a process of the device that starts listening later is told
    /// the port is in use, instead of losing its connections to the forward.
    held: BTreeMap<String, Vec<std::os::fd::OwnedFd>>,
    /// The ruleset last loaded (reloaded only when it changes).
    loaded: Option<String>,
}

/// Leases of service addresses are held under this prefix (never a container id).
const SERVICE_LEASE: &str = "svc:";

#[derive(Debug)]
pub struct Network {
    cfg: NetConfig,
    /// This device's id: its own endpoints of a service are reached at the
    /// container's address, not through the device's published port.
    device: String,
    leases_path: PathBuf,
    run: PathBuf,
    resolv: String,
    state: Mutex<State>,
}

/// The workload a container id (`NAME-INSTANCE`) belongs to.
pub fn workload_of(id: &str) -> &str {
    crate::supervisor::parse_container_id(id).map_or(id, |(name, _)| name)
}

impl Network {
    /// The network of an agent with this data and run dir; leases that do
    /// not parse or lie outside the subnet (it was changed) are dropped.
    pub fn open(cfg: NetConfig, device: &str, data_dir: &Path, run_dir: &Path) -> Self {
        let leases_path = data_dir.join("net").join("leases");
        let text = std::fs::read_to_string(&leases_path).unwrap_or_default();
        let (leases, dropped) = ipam::Leases::parse(&text, &cfg.subnet);
        if !dropped.is_empty() {
            warn!(subnet = %cfg.subnet, ?dropped, "address leases dropped");
        }
        let resolv = resolv_conf();
        let state = Mutex::new(State { leases, ..Default::default() });
        Self { cfg, device: device.to_string(), leases_path, run: run_dir.join("net"), resolv, state }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.run.join(id)
    }

    /// The host end of `id`'s veth pair: `bt` and a hash of bridge and id
    /// (interface names have 15 bytes; container ids are longer).
    fn host_if(&self, id: &str) -> String {
        let mut h: u32 = 0x811c_9dc5;
        for b in self.cfg.bridge.bytes().chain([0]).chain(id.bytes()) {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        format!("bt{h:08x}")
    }

    /// After a restart: addresses of containers that are gone (a kill
    /// between lease and start, a removal cut short) are torn down and
    /// freed; the rules of those still there are loaded again.
    pub fn recover(&self, containers: &[String]) {
        let ids: Vec<String> = self.lock().leases.iter().map(|(_, id)| id.to_string()).collect();
        for id in ids {
            if id.starts_with(SERVICE_LEASE) {
                continue; // the next desired document says whether it is still used
            }
            if !containers.contains(&id) {
                info!(container = %id, "freeing the address of a container that is gone");
                self.detach(&id);
                continue;
            }
            let record = std::fs::read(self.dir(&id).join("record.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            if let Some(r) = record {
                let mut st = self.lock();
                let held = r
                    .publish
                    .iter()
                    .filter_map(|p| hold_port(p).map_err(|e| warn!(container = %id, error = %e, "published port")).ok())
                    .collect();
                st.held.insert(id.clone(), held);
                st.records.insert(id, r);
            }
        }
        let mut st = self.lock();
        if !st.records.is_empty() {
            if let Err(e) = self.ensure_bridge(&mut st).and_then(|()| self.sync(&mut st)) {
                warn!(error = %e, "cannot restore the bridge network");
            }
        }
    }

    /// The address of a bridged container.
    pub fn address(&self, id: &str) -> Option<Ipv4Addr> {
        self.lock().records.get(id).map(|r| r.address)
    }

    /// The services of the desired document: each used service gets an
    /// address on the bridge (kept while it is used), its name resolves to
    /// it in its consumers' hosts files, and connections to it are spread
    /// over its endpoints. Services no longer used give their address back.
    pub fn route_services(&self, services: &[ServiceEndpoints], ports: &[ServicePort]) {
        let mut st = self.lock();
        let mut routed = Vec::new();
        let mut leased = false;
        for s in services {
            let ports: Vec<ServicePort> = ports.iter().filter(|p| p.service == s.name).cloned().collect();
            if ports.is_empty() {
                continue;
            }
            let id = format!("{SERVICE_LEASE}{}", s.name);
            let had = st.leases.address_of(&id).is_some();
            match st.leases.lease_high(&self.cfg.subnet, &id) {
                Ok(vip) => {
                    leased |= !had;
                    routed.push(Service {
                        name: s.name.clone(),
                        vip,
                        consumers: s.consumers.clone(),
                        ports,
                        endpoints: s.endpoints.clone(),
                    });
                }
                Err(e) => warn!(service = %s.name, error = %e, "no address for the service"),
            }
        }
        let stale: Vec<String> = st
            .leases
            .iter()
            .filter_map(|(_, id)| id.strip_prefix(SERVICE_LEASE))
            .filter(|name| !routed.iter().any(|s| s.name == *name))
            .map(|name| format!("{SERVICE_LEASE}{name}"))
            .collect();
        for id in &stale {
            st.leases.release(id);
        }
        if leased || !stale.is_empty() {
            if let Err(e) = self.save_leases(&st) {
                warn!(error = %e, "cannot save address leases");
            }
        }
        if st.services == routed {
            return;
        }
        st.services = routed;
        if st.bridge_ready {
            if let Err(e) = self.sync(&mut st) {
                warn!(error = %e, "cannot route the services");
            }
        }
    }

    /// Gives `id` its namespace, address, rules and files. On error nothing
    /// of it is left (its address is free again).
    pub fn attach(&self, id: &str, spec: &ContainerSpec) -> Result<Wired, String> {
        debug_assert_eq!(spec.network, NetworkMode::Bridge);
        let workload = workload_of(id).to_string();
        let mut st = self.lock();
        for p in &spec.publish {
            let taken = st.records.iter().find(|(other, r)| {
                workload_of(other) != workload
                    && r.publish.iter().any(|q| q.host_port == p.host_port && q.protocol == p.protocol)
            });
            if let Some((_, r)) = taken {
                return Err(format!(
                    "host port {}/{} is published by workload {} on this device",
                    p.host_port,
                    rules::proto(p.protocol),
                    r.workload
                ));
            }
        }
        let held = spec.publish.iter().map(hold_port).collect::<Result<Vec<_>, _>>()?;
        let address = st.leases.lease(&self.cfg.subnet, id)?;
        st.held.insert(id.to_string(), held);
        let wired = self.save_leases(&st).and_then(|()| self.ensure_bridge(&mut st)).and_then(|()| {
            let record = Record {
                workload,
                hostname: spec.hostname.clone().unwrap_or_else(|| id.to_string()),
                address,
                publish: spec.publish.clone(),
                allow_from: spec.allow_from.clone(),
                bandwidth: spec.bandwidth,
            };
            self.wire(id, &record)?;
            let json = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
            std::fs::write(self.dir(id).join("record.json"), json).map_err(|e| format!("record: {e}"))?;
            st.records.insert(id.to_string(), record);
            self.sync(&mut st)
        });
        match wired {
            Ok(()) => Ok(Wired {
                address,
                netns: self.dir(id).join("netns"),
                hosts: self.dir(id).join("hosts"),
                resolv: self.dir(id).join("resolv.conf"),
            }),
            Err(e) => {
                drop(st);
                self.detach(id);
                Err(format!("bridge network: {e}"))
            }
        }
    }

    /// Takes down what `id` had (veth, namespace, address, rules, files);
    /// nothing when it had none.
    pub fn detach(&self, id: &str) {
        let mut st = self.lock();
        let had_record = st.records.remove(id).is_some();
        st.held.remove(id);
        let had_lease = st.leases.release(id);
        let dir = self.dir(id);
        if !had_record && !had_lease && !dir.exists() {
            return;
        }
        // Unmounted, the namespace goes once nothing holds it, and its veth
        // pair with it, in the kernel's own time (deleting the veth here
        // would wait for the network stack to settle: ~35 ms a container).
        // Without a namespace to drop (a reboot, a setup cut short), the
        // host end is deleted here.
        let netns = dir.join("netns");
        let dropped = netns.exists() && nix::mount::umount2(&netns, nix::mount::MntFlags::MNT_DETACH).is_ok();
        if !dropped {
            delete_link(&self.host_if(id));
        }
        let _ = std::fs::remove_dir_all(&dir);
        if had_lease {
            if let Err(e) = self.save_leases(&st) {
                warn!(error = %e, "cannot save address leases");
            }
        }
        if had_record {
            if let Err(e) = self.sync(&mut st) {
                warn!(error = %e, "cannot update the bridge network's rules");
            }
        }
    }

    fn save_leases(&self, st: &State) -> Result<(), String> {
        if let Some(dir) = self.leases_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        crate::runtime::layout::write_atomic(&self.leases_path, st.leases.render().as_bytes())
            .map_err(|e| format!("save leases {}: {e}", self.leases_path.display()))
    }

    /// The bridge with the gateway address, forwarding on: made once per
    /// agent start (kept if it is there).
    fn ensure_bridge(&self, st: &mut State) -> Result<(), String> {
        if st.bridge_ready {
            return Ok(());
        }
        let bridge = &self.cfg.bridge;
        let mut s = netlink::Socket::open().map_err(|e| format!("netlink: {e}"))?;
        // With nothing attached, a bridge left from before (another subnet,
        // stale service addresses) is made afresh.
        if st.records.is_empty() {
            if let Some(old) = netlink::index(bridge) {
                let _ = s.delete_link(old);
            }
        }
        match s.create_bridge(bridge) {
            Ok(()) => info!(bridge = %bridge, subnet = %self.cfg.subnet, "bridge created"),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("create bridge {bridge}: {e}")),
        }
        let index = netlink::index(bridge).ok_or_else(|| format!("bridge {bridge} vanished"))?;
        s.add_address(index, self.cfg.subnet.gateway(), self.cfg.subnet.prefix())
            .and_then(|()| s.set_up(index))
            .map_err(|e| format!("bring up bridge {bridge}: {e}"))?;
        for (path, value) in [
            ("/proc/sys/net/ipv4/ip_forward".to_string(), "1"),
            // Published ports reached at 127.0.0.1 from the device itself.
            (format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"), "1"),
        ] {
            std::fs::write(&path, value).map_err(|e| format!("set {path}: {e}"))?;
        }
        st.bridge_ready = true;
        Ok(())
    }

    /// Makes `id`'s namespace and veth pair, address and routes, then its limits.
    fn wire(&self, id: &str, r: &Record) -> Result<(), String> {
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let master = netlink::index(&self.cfg.bridge).ok_or_else(|| format!("no bridge {}", self.cfg.bridge))?;
        let (netns, host_if, subnet, address) = (dir.join("netns"), self.host_if(id), self.cfg.subnet, r.address);
        // A veth of that name still there: its namespace is being dropped (the
        // same container id came back at once), or an agent died mid-setup.
        delete_link(&host_if);
        std::thread::spawn(move || wire_namespace(&netns, &host_if, master, address, &subnet))
            .join()
            .map_err(|_| "the namespace thread panicked".to_string())?
            .map_err(|e| format!("wire the container's namespace: {e}"))?;
        let b = r.bandwidth;
        if b.egress_bps > 0 {
            tc(Some(&dir.join("netns")), "eth0", b.egress_bps)?;
        }
        if b.ingress_bps > 0 {
            tc(None, &self.host_if(id), b.ingress_bps)?;
        }
        Ok(())
    }

    /// Brings the service addresses on the bridge, the rules and every
    /// hosts file in line with the records and services.
    fn sync(&self, st: &mut State) -> Result<(), String> {
        self.sync_vips(st);
        let by_workload = |name: &str| {
            st.records.iter().filter(|(_, r)| r.workload == name).max_by_key(|(id, _)| instance(id)).map(|(_, r)| r)
        };
        let services: Vec<rules::Service> = st
            .services
            .iter()
            .map(|s| rules::Service {
                vip: s.vip,
                ports: s
                    .ports
                    .iter()
                    .map(|p| {
                        let mut backends: Vec<(Ipv4Addr, u16)> = Vec::new();
                        for e in s.endpoints.iter().filter(|e| e.port_name == p.name) {
                            // Here: straight to the container, when it is bridged.
                            let local = (e.device == self.device).then(|| by_workload(&s.name)).flatten();
                            // Port 0: not published, reachable on its own device only.
                            let to = match local {
                                Some(r) => Some((r.address, p.port)),
                                None if e.port == 0 => None,
                                None => e.address.parse::<Ipv4Addr>().ok().map(|ip| (ip, e.port)),
                            };
                            if let Some(to) = to.filter(|to| !backends.contains(to)) {
                                backends.push(to);
                            }
                        }
                        rules::ServicePort { protocol: p.protocol, port: p.port, backends }
                    })
                    .collect(),
            })
            .collect();
        let attached: Vec<rules::Attached<'_>> =
            st.records
                .values()
                .map(|r| rules::Attached {
                    address: r.address,
                    publish: &r.publish,
                    allowed: r.allow_from.as_ref().map(|names| {
                        names.iter().filter_map(|n| by_workload(n)).map(|a| a.address).collect::<Vec<_>>()
                    }),
                })
                .collect();
        let ruleset = rules::render(&self.cfg.bridge, &self.cfg.subnet, &attached, &services);
        if st.loaded.as_deref() != Some(ruleset.as_str()) {
            nft(&ruleset)?;
            st.loaded = Some(ruleset);
        }
        let names: BTreeMap<&str, Ipv4Addr> = st
            .records
            .values()
            .filter_map(|r| Some((r.workload.as_str(), by_workload(&r.workload)?.address)))
            .collect();
        for (id, r) in &st.records {
            let dir = self.dir(id);
            // A service it uses is reached at the service's address, even
            // when an instance runs here: the connections are spread.
            let mut names = names.clone();
            for s in st.services.iter().filter(|s| s.consumers.contains(&r.workload)) {
                names.insert(s.name.as_str(), s.vip);
            }
            write_if_changed(&dir.join("hosts"), &hosts_file(r, &names))?;
            write_if_changed(&dir.join("resolv.conf"), &self.resolv)?;
        }
        Ok(())
    }
}

impl Network {
    /// Service addresses on the bridge (a /32 each: the host answers for
    /// them, then NAT sends the connection on).
    fn sync_vips(&self, st: &mut State) {
        if !st.bridge_ready {
            return;
        }
        let want: BTreeSet<Ipv4Addr> = st.services.iter().map(|s| s.vip).collect();
        if want == st.vips {
            return;
        }
        let Some(index) = netlink::index(&self.cfg.bridge) else { return };
        let Ok(mut sock) = netlink::Socket::open() else { return };
        for vip in want.difference(&st.vips) {
            if let Err(e) = sock.add_address(index, *vip, 32) {
                warn!(%vip, error = %e, "cannot add a service address to the bridge");
            }
        }
        for vip in st.vips.difference(&want) {
            if let Err(e) = sock.delete_address(index, *vip, 32) {
                warn!(%vip, error = %e, "cannot remove a service address from the bridge");
            }
        }
        st.vips = want;
    }
}

/// Binds (without listening) a socket to a published port of the device,
/// held while the container runs, as Docker's proxy holds it: a port a
/// process of the device listens on is refused (the forward would take its
/// connections away silently), and one that tries later is told it is in use.
fn hold_port(p: &Publish) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::FromRawFd;
    let kind = match p.protocol {
        baton_protocol::spec::PortProtocol::Tcp => libc::SOCK_STREAM,
        baton_protocol::spec::PortProtocol::Udp => libc::SOCK_DGRAM,
    };
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_in is valid: 0.0.0.0, the port set below.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = p.host_port.to_be();
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_in of `len` bytes.
    let r =
        unsafe { libc::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr as *const _ as *const libc::sockaddr, len) };
    if r == 0 {
        return Ok(fd);
    }
    let e = std::io::Error::last_os_error();
    Err(match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "device port {}/{} is in use by a process on the device; publish another port",
            p.host_port,
            rules::proto(p.protocol)
        ),
        _ => format!("device port {}/{}: {e}", p.host_port, rules::proto(p.protocol)),
    })
}

fn instance(id: &str) -> u32 {
    crate::supervisor::parse_container_id(id).map_or(0, |(_, n)| n)
}

/// Rewrites a bind-mounted file in place (a rename would leave the
/// container reading the old inode), only when it changes.
fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

/// A container's /etc/hosts: itself, then every bridged workload on the
/// device by name (its newest instance).
fn hosts_file(me: &Record, names: &BTreeMap<&str, Ipv4Addr>) -> String {
    let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let own = if me.hostname == me.workload { me.hostname.clone() } else { format!("{} {}", me.hostname, me.workload) };
    text.push_str(&format!("{}\t{own}\n", me.address));
    for (name, ip) in names {
        if *name != me.workload {
            text.push_str(&format!("{ip}\t{name}\n"));
        }
    }
    text
}

/// The nameservers containers use: the host's, without loopback ones
/// (systemd-resolved's stub is unreachable from a container: its upstream
/// list is used), else public resolvers, as Docker does.
fn resolv_conf() -> String {
    let text = ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let mut out = String::new();
    let mut servers = 0;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("nameserver"), Some(ip)) if ip.starts_with("127.") || ip == "::1" => continue,
            (Some("nameserver"), Some(_)) => servers += 1,
            (Some("search" | "options" | "domain"), _) => {}
            _ => continue,
        }
        out.push_str(line.trim());
        out.push('\n');
    }
    if servers == 0 {
        out.push_str("nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
    }
    out
}

/// In a thread of its own (namespaces are per thread): a new network
/// namespace bind-mounted at `netns`, a veth pair from the host's bridge
/// into it as `eth0`, its address, `lo` and `eth0` up, the default route.
fn wire_namespace(netns: &Path, host_if: &str, master: u32, address: Ipv4Addr, subnet: &Subnet) -> std::io::Result<()> {
    let mut host = netlink::Socket::open()?;
    // SAFETY: unshare(2) moves only this thread, which ends after this.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::fs::File::create(netns)?;
    nix::mount::mount(
        Some("/proc/thread-self/ns/net"),
        netns,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(std::io::Error::from)?;
    // No IPv6 inside: the rules are IPv4's, and link-local IPv6 between
    // containers would go around them (`allow_from`, unpublished ports).
    for knob in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
    }
    let ns = std::fs::File::open(netns)?;
    host.create_veth(host_if, master, "eth0", ns.as_raw_fd(), mac_of(address))?;
    let mut inner = netlink::Socket::open()?;
    let lo = netlink::index("lo").ok_or_else(|| std::io::Error::other("no lo in the new namespace"))?;
    let eth0 = netlink::index("eth0").ok_or_else(|| std::io::Error::other("eth0 did not arrive"))?;
    inner.set_up(lo)?;
    inner.add_address(eth0, address, subnet.prefix())?;
    inner.set_up(eth0)?;
    inner.add_default_route(subnet.gateway())
}

/// Deletes a link of the host's namespace, if there is one of that name.
fn delete_link(name: &str) {
    if let Some(index) = netlink::index(name) {
        if let Err(e) = netlink::Socket::open().and_then(|mut s| s.delete_link(index)) {
            warn!(link = name, error = %e, "cannot delete a veth");
        }
    }
}

/// A container's MAC address, made from its IPv4 address (locally
/// administered, as Docker does): an address that passes to a new instance
/// keeps its MAC, so neighbours' ARP caches stay right.
fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x62, o[0], o[1], o[2], o[3]]
}

/// Loads a ruleset (`nft -f -`).
fn nft(ruleset: &str) -> Result<(), String> {
    let child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "bridge networking needs the nft tool (Debian: apt install nftables)".into()
            }
            _ => format!("run nft: {e}"),
        })?;
    let mut child = child;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset.as_bytes()).map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft refused the rules: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A token bucket of `bps` on `dev` (in the namespace at `netns`, else the host's).
fn tc(netns: Option<&Path>, dev: &str, bps: u64) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let burst = (bps / 8 / 100).max(16 * 1024);
    let mut cmd = Command::new("tc");
    cmd.args(["qdisc", "replace", "dev", dev, "root", "tbf"])
        .args(["rate", &format!("{bps}bit"), "burst", &format!("{burst}b"), "latency", "100ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // Held open until the child has run (its fd is what the child joins).
    let ns = netns.map(|path| std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))).transpose()?;
    if let Some(fd) = ns.as_ref().map(AsRawFd::as_raw_fd) {
        // SAFETY: setns(2) is async-signal-safe; the fd stays open until the child execs.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "bandwidth limits need the tc tool (Debian: apt install iproute2)".to_string(),
        _ => format!("run tc: {e}"),
    })?;
    drop(ns);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("tc on {dev}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Writes the namespace and files of `w` into an OCI config made by
/// `oci::config_json` (which gave it a network namespace of its own).
pub fn into_config(config: &mut serde_json::Value, w: &Wired) {
    if let Some(ns) =
        config["linux"]["namespaces"].as_array_mut().and_then(|list| list.iter_mut().find(|n| n["type"] == "network"))
    {
        ns["path"] = serde_json::json!(w.netns);
    }
    if let Some(mounts) = config["mounts"].as_array_mut() {
        for (file, target) in [(&w.hosts, "/etc/hosts"), (&w.resolv, "/etc/resolv.conf")] {
            mounts.push(serde_json::json!({
                "destination": target, "type": "bind", "source": file,
                "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_files_name_every_workload_once_by_its_newest_instance() {
        let rec = |w: &str, ip: u8| Record {
            workload: w.into(),
            hostname: format!("{w}-0"),
            address: Ipv4Addr::new(10, 88, 0, ip),
            publish: vec![],
            allow_from: None,
            bandwidth: Bandwidth::default(),
        };
        let names = BTreeMap::from([("web", Ipv4Addr::new(10, 88, 0, 2)), ("db", Ipv4Addr::new(10, 88, 0, 5))]);
        let text = hosts_file(&rec("web", 2), &names);
        assert!(text.contains("10.88.0.2\tweb-0 web\n") && text.contains("10.88.0.5\tdb\n"), "{text}");
        assert_eq!(text.matches("web").count(), 2, "{text}");
        assert_eq!(workload_of("my-app-12"), "my-app");
        assert_eq!(instance("my-app-12"), 12);
    }
}
