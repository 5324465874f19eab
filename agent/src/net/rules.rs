//! The device's nftables rules for bridged containers, rendered whole from
//! what is attached: NAT to the outside, published ports, and who may
//! connect to a workload that limits it. Pure; `net` loads the text with one
//! `nft -f -`, which replaces the agent's two tables in one transaction —
//! nothing else on the host (Docker's, the firewall's tables) is touched.

use std::fmt::Write;
// `core::net`: addresses as data (the std path would also offer sockets).
use core::net::Ipv4Addr;

use baton_protocol::spec::{PortProtocol, Publish};

use super::ipam::Subnet;

/// What one attached container asks of the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached<'a> {
    pub address: Ipv4Addr,
    pub publish: &'a [Publish],
    /// Only these addresses may open connections to it (None: any).
    pub allowed: Option<Vec<Ipv4Addr>>,
}

/// A service's address on the device and, per declared port, the
/// endpoints connections to it are spread over (round robin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub protocol: PortProtocol,
    pub port: u16,
    pub backends: Vec<(Ipv4Addr, u16)>,
}

pub(super) fn proto(p: PortProtocol) -> &'static str {
    match p {
        PortProtocol::Tcp => "tcp",
        PortProtocol::Udp => "udp",
    }
}

/// The two tables, named after the bridge (two agents on one host keep
/// apart): `ip <bridge>` (NAT, published ports) and `bridge <bridge>`
/// (connections between containers on the bridge), each deleted and made
/// again in the same transaction.
pub fn render(bridge: &str, subnet: &Subnet, attached: &[Attached<'_>], services: &[Service]) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "table ip {bridge} {{}}\ndelete table ip {bridge}\ntable ip {bridge} {{");
    // Service addresses, then published ports, for packets from containers,
    // from outside and from the device itself (to any of its own
    // addresses, loopback too).
    let _ = writeln!(t, "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;");
    let _ = writeln!(t, "\t\tjump services\n\t\tfib daddr type local jump published\n\t}}");
    let _ = writeln!(t, "\tchain output {{\n\t\ttype nat hook output priority -100; policy accept;");
    let _ = writeln!(t, "\t\tjump services\n\t\tfib daddr type local jump published\n\t}}");
    // A new connection to a service goes to its next endpoint (round
    // robin); with none, it is refused at once rather than left to time out.
    let _ = writeln!(t, "\tchain services {{");
    for s in services {
        for p in &s.ports {
            let (vip, proto, port) = (s.vip, proto(p.protocol), p.port);
            if p.backends.is_empty() {
                let how = if p.protocol == PortProtocol::Tcp { " with tcp reset" } else { "" };
                let _ = writeln!(t, "\t\tip daddr {vip} {proto} dport {port} reject{how}");
                continue;
            }
            let map: Vec<String> =
                p.backends.iter().enumerate().map(|(i, (ip, port))| format!("{i} : {ip} . {port}")).collect();
            let n = p.backends.len();
            let _ = writeln!(
                t,
                "\t\tip daddr {vip} {proto} dport {port} dnat ip to numgen inc mod {n} map {{ {} }}",
                map.join(", ")
            );
        }
    }
    let _ = writeln!(t, "\t}}");
    let _ = writeln!(t, "\tchain published {{");
    for a in attached {
        for p in a.publish {
            let proto = proto(p.protocol);
            let _ = writeln!(t, "\t\t{proto} dport {} dnat to {}:{}", p.host_port, a.address, p.port);
        }
    }
    let _ = writeln!(t, "\t}}");
    // Out to the world as the device; a published port reached from the
    // device's loopback or from a container on the same bridge (hairpin)
    // is answered through the device too.
    let _ = writeln!(t, "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;");
    let _ = writeln!(t, "\t\tip saddr {subnet} ip daddr != {subnet} masquerade");
    let _ = writeln!(t, "\t\toifname \"{bridge}\" ip saddr 127.0.0.0/8 masquerade");
    let _ = writeln!(t, "\t\toifname \"{bridge}\" ip saddr {subnet} ct status dnat masquerade");
    let _ = writeln!(t, "\t}}");
    // From outside, only what is published (or answers) reaches a container:
    // a host of the LAN that routes the subnet through the device gets no
    // further. Containers connecting through the device (a service address,
    // a published port, the gateway) meet `allow_from` here, before their
    // source is masqueraded.
    let _ = writeln!(t, "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;");
    let _ = writeln!(t, "\t\toifname \"{bridge}\" iifname != \"{bridge}\" ct state established,related accept");
    let _ = writeln!(t, "\t\toifname \"{bridge}\" iifname != \"{bridge}\" ct status dnat accept");
    let _ = writeln!(t, "\t\toifname \"{bridge}\" iifname != \"{bridge}\" drop");
    for a in attached {
        let Some(allowed) = &a.allowed else { continue };
        let from = source_filter(allowed);
        let _ = writeln!(t, "\t\tiifname \"{bridge}\" ip daddr {}{from} ct state new drop", a.address);
    }
    let _ = writeln!(t, "\t}}\n}}");

    let _ = writeln!(t, "table bridge {bridge} {{}}\ndelete table bridge {bridge}\ntable bridge {bridge} {{");
    let _ = writeln!(t, "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;");
    for a in attached {
        let Some(allowed) = &a.allowed else { continue };
        // A new TCP connection, or a UDP datagram to a server port (below
        // the kernel's ephemeral range), from a container not allowed; the
        // answers to its own connections still reach it. (The bridge family
        // has no conntrack on many kernels, so the rule reads the packet.)
        let from = source_filter(allowed);
        let _ = writeln!(t, "\t\tip daddr {}{from} tcp flags & (syn | ack) == syn drop", a.address);
        let _ = writeln!(t, "\t\tip daddr {}{from} udp dport < 32768 drop", a.address);
    }
    let _ = writeln!(t, "\t}}\n}}");
    t
}

/// ` ip saddr != { … }` for a list of allowed sources (nothing: none allowed).
fn source_filter(allowed: &[Ipv4Addr]) -> String {
    if allowed.is_empty() {
        return String::new();
    }
    let list: Vec<String> = allowed.iter().map(Ipv4Addr::to_string).collect();
    format!(" ip saddr != {{ {} }}", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_publishes_nats_and_guards() {
        let subnet: Subnet = "10.88.0.0/24".parse().unwrap();
        let web = [Publish { host_port: 8080, port: 80, protocol: PortProtocol::Tcp }];
        let dns = [Publish { host_port: 5353, port: 53, protocol: PortProtocol::Udp }];
        let attached = [
            Attached { address: Ipv4Addr::new(10, 88, 0, 2), publish: &web, allowed: None },
            Attached {
                address: Ipv4Addr::new(10, 88, 0, 3),
                publish: &dns,
                allowed: Some(vec![Ipv4Addr::new(10, 88, 0, 2)]),
            },
            Attached { address: Ipv4Addr::new(10, 88, 0, 4), publish: &[], allowed: Some(vec![]) },
        ];
        let services = [
            Service {
                vip: Ipv4Addr::new(10, 88, 0, 9),
                ports: vec![ServicePort {
                    protocol: PortProtocol::Tcp,
                    port: 80,
                    backends: vec![(Ipv4Addr::new(10, 88, 0, 2), 80), (Ipv4Addr::new(192, 168, 1, 7), 8080)],
                }],
            },
            Service {
                vip: Ipv4Addr::new(10, 88, 0, 10),
                ports: vec![ServicePort { protocol: PortProtocol::Tcp, port: 5432, backends: vec![] }],
            },
        ];
        let text = render("baton0", &subnet, &attached, &services);
        assert!(
            text.contains("ip daddr 10.88.0.9 tcp dport 80 dnat ip to numgen inc mod 2 map { 0 : 10.88.0.2 . 80, 1 : 192.168.1.7 . 8080 }"),
            "{text}"
        );
        assert!(text.contains("ip daddr 10.88.0.10 tcp dport 5432 reject with tcp reset"), "{text}");
        assert!(text.starts_with("table ip baton0 {}\ndelete table ip baton0\n"), "{text}");
        assert!(text.contains("table bridge baton0 {\n"), "{text}");
        assert!(text.contains("\t\ttcp dport 8080 dnat to 10.88.0.2:80\n"), "{text}");
        assert!(text.contains("\t\tudp dport 5353 dnat to 10.88.0.3:53\n"), "{text}");
        assert!(text.contains("ip saddr 10.88.0.0/24 ip daddr != 10.88.0.0/24 masquerade"), "{text}");
        assert!(text.contains("ip daddr 10.88.0.3 ip saddr != { 10.88.0.2 } tcp flags & (syn | ack) == syn drop"));
        assert!(text.contains("ip daddr 10.88.0.4 tcp flags & (syn | ack) == syn drop"), "{text}");
        assert!(!text.contains("ip daddr 10.88.0.2 "), "an open workload gets no rule: {text}");
        assert!(text.contains("iifname \"baton0\" ip daddr 10.88.0.3 ip saddr != { 10.88.0.2 } ct state new drop"));
        assert!(text.contains("oifname \"baton0\" iifname != \"baton0\" drop"), "{text}");
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }
}
