//! Addresses of bridged containers: which of the subnet's addresses each
//! container holds. Pure: `net` loads and saves the text form
//! (`data_dir/net/leases`, one `ADDRESS CONTAINER` line each), so an address
//! survives an agent restart and is never handed out twice.

use std::collections::BTreeMap;
use std::fmt;
// `core::net`: addresses as data (the std path would also offer sockets).
use core::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 subnet the device's bridge serves (`10.88.0.0/24`): its first
/// host address is the bridge's (the containers' gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0)
    }

    /// The bridge's address: the first host of the subnet.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Addresses containers may have: not the network, the gateway or the broadcast.
    fn hosts(&self) -> impl DoubleEndedIterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let broadcast = u32::from(self.network) | !self.mask();
        (first..broadcast).map(Ipv4Addr::from)
    }
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) =
            s.split_once('/').ok_or_else(|| format!("{s:?}: write it as ADDRESS/PREFIX, e.g. 10.88.0.0/24"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("{s:?}: {prefix:?} is not a prefix length"))?;
        if !(8..=29).contains(&prefix) {
            return Err(format!("{s:?}: the prefix must be between /8 and /29 (room for a gateway and containers)"));
        }
        let subnet = Subnet { network: ip, prefix };
        if u32::from(ip) & !subnet.mask() != 0 {
            let network = Ipv4Addr::from(u32::from(ip) & subnet.mask());
            return Err(format!("{s:?} has host bits set: the subnet is {network}/{prefix}"));
        }
        Ok(subnet)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The leases of one subnet: address → container id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leases {
    by_address: BTreeMap<Ipv4Addr, String>,
}

impl Leases {
    /// Reads the text form; lines that do not parse, or addresses outside
    /// `subnet` (the subnet was changed), are dropped and named.
    pub fn parse(text: &str, subnet: &Subnet) -> (Self, Vec<String>) {
        let mut leases = Leases::default();
        let mut dropped = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let parsed = line.split_once(' ').and_then(|(ip, id)| Some((ip.parse::<Ipv4Addr>().ok()?, id.trim())));
            match parsed {
                Some((ip, id)) if subnet.contains(ip) && !id.is_empty() && !leases.by_address.contains_key(&ip) => {
                    leases.by_address.insert(ip, id.to_string());
                }
                _ => dropped.push(line.to_string()),
            }
        }
        (leases, dropped)
    }

    pub fn render(&self) -> String {
        self.by_address.iter().map(|(ip, id)| format!("{ip} {id}\n")).collect()
    }

    pub fn address_of(&self, id: &str) -> Option<Ipv4Addr> {
        self.by_address.iter().find(|(_, c)| *c == id).map(|(ip, _)| *ip)
    }

    /// `id`'s address: the one it holds, else the lowest free one.
    pub fn lease(&mut self, subnet: &Subnet, id: &str) -> Result<Ipv4Addr, String> {
        if let Some(ip) = self.address_of(id) {
            return Ok(ip);
        }
        let free = subnet.hosts().find(|ip| !self.by_address.contains_key(ip)).ok_or_else(|| {
            format!("no free address left in {subnet} ({} in use by containers and services)", self.by_address.len())
        })?;
        self.by_address.insert(free, id.to_string());
        Ok(free)
    }

    /// `id`'s address: the one it holds, else the highest free one (service
    /// addresses: far from the containers', which take the lowest).
    pub fn lease_high(&mut self, subnet: &Subnet, id: &str) -> Result<Ipv4Addr, String> {
        if let Some(ip) = self.address_of(id) {
            return Ok(ip);
        }
        let free = subnet.hosts().rev().find(|ip| !self.by_address.contains_key(ip)).ok_or_else(|| {
            format!("no free address left in {subnet} ({} in use by containers and services)", self.by_address.len())
        })?;
        self.by_address.insert(free, id.to_string());
        Ok(free)
    }

    /// Frees `id`'s address; true when it held one.
    pub fn release(&mut self, id: &str) -> bool {
        let before = self.by_address.len();
        self.by_address.retain(|_, c| c != id);
        self.by_address.len() != before
    }

    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Addr, &str)> {
        self.by_address.iter().map(|(ip, id)| (*ip, id.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_refuse_what_cannot_serve() {
        let s: Subnet = "10.88.0.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert!(s.contains(Ipv4Addr::new(10, 88, 0, 254)) && !s.contains(Ipv4Addr::new(10, 88, 1, 2)));
        for bad in ["10.88.0.0", "10.88.0.1/24", "10.88.0.0/30", "10.88.0.0/4", "x/24", "10.88.0.0/x"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn leases_are_stable_unique_and_reused_after_release() {
        let s: Subnet = "10.0.0.0/29".parse().unwrap(); // hosts .2 to .6
        let mut l = Leases::default();
        let a = l.lease(&s, "a-0").unwrap();
        let b = l.lease(&s, "b-0").unwrap();
        assert_eq!((a, b), (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)));
        assert_eq!(l.lease(&s, "a-0").unwrap(), a, "a container keeps its address");
        for id in ["c-0", "d-0", "e-0"] {
            l.lease(&s, id).unwrap();
        }
        let full = l.lease(&s, "f-0").unwrap_err();
        assert!(full.contains("no free address left in 10.0.0.0/29"), "{full}");
        assert!(l.release("a-0") && !l.release("a-0"));
        assert_eq!(l.lease(&s, "f-0").unwrap(), a);
        assert!(l.release("e-0"));
        assert_eq!(l.lease_high(&s, "svc:api").unwrap(), Ipv4Addr::new(10, 0, 0, 6), "services from the top");
    }

    #[test]
    fn the_text_form_round_trips_and_drops_what_does_not_belong() {
        let s: Subnet = "10.88.0.0/24".parse().unwrap();
        let mut l = Leases::default();
        l.lease(&s, "web-0").unwrap();
        l.lease(&s, "db-3").unwrap();
        let (back, dropped) = Leases::parse(&l.render(), &s);
        assert_eq!((back, dropped.len()), (l, 0));
        let (back, dropped) = Leases::parse("10.88.0.2 a-0\n10.99.0.2 b-0\ngarbage\n10.88.0.2 c-0\n\n", &s);
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![(Ipv4Addr::new(10, 88, 0, 2), "a-0")]);
        assert_eq!(dropped.len(), 3);
    }
}
