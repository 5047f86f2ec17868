//! Sandbox networking: each sandbox's own interface, address and egress policy, the runner's resolver and its
//! egress proxy.
//!
//! The layout is routed, not bridged. The runner owns a subnet (10.89.0.0/16 by default) whose first address, the
//! gateway, sits on an interface of the host that holds nothing else (a bridge without ports). A sandbox's network namespace gets one end of a veth pair as
//! `eth0` with a /32 address and a default route through the gateway; the host end (`nk` and the address in hex)
//! has no address, a /32 route to the sandbox and strict reverse-path filtering, so a sandbox cannot send with
//! another's address. Sandboxes never share a link: one reaches another only through the host, whose rules refuse
//! it. Everything is done over netlink ([`netlink`]) from the host side, while the sandbox's init is still
//! starting its agent, so a sandbox never runs a process before its network exists.
//!
//! Egress is judged in the kernel by the runner's nftables table ([`nft`]): a sandbox's packets go to public
//! addresses unless its policy's chain says otherwise; private, link-local (metadata) and reserved blocks only
//! through a rule inside them. Names are judged by the runner's resolver ([`dns`]), which every sandbox's DNS
//! traffic reaches whatever server it asks, and, for policies with domain rules, by the egress proxy ([`proxy`]),
//! to which the kernel hands their TCP connections: it reads the name from the TLS ClientHello or the HTTP Host
//! header, judges it, and connects to that name's own address, so naming an allowed domain while connecting to
//! another's address gets nowhere.

pub mod dns;
pub mod netlink;
pub mod nft;
pub mod proxy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use nook_api::NetworkPolicy;
use serde::{Deserialize, Serialize};

use netlink::Netlink;

/// The default subnet of a runner's sandboxes.
pub const DEFAULT_SUBNET: &str = "10.89.0.0/16";
/// The port of the egress proxy on the gateway address.
pub const PROXY_PORT: u16 = 3128;
/// The name of a sandbox's interface inside it.
const SANDBOX_INTERFACE: &str = "eth0";

/// An IPv4 block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    /// Its first address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
}

impl Subnet {
    /// Parses `a.b.c.d/n`; the block must leave room for a gateway and at least one sandbox.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (address, prefix) = text.split_once('/').ok_or("a subnet is written a.b.c.d/n")?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{address} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|prefix| (8..=29).contains(prefix))
            .ok_or("the subnet's prefix length must be 8 to 29")?;
        let subnet = Self { address, prefix };
        if u32::from(address) & !subnet.mask() != 0 {
            return Err(format!("{text} has bits set beyond its prefix"));
        }
        Ok(subnet)
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The gateway: the first usable address.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) + 1)
    }

    /// How many sandbox addresses the block holds (all but the network, gateway and broadcast addresses).
    pub fn capacity(self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix))) - 3
    }

    /// The `n`th sandbox address (from 0).
    fn host(self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) + 2 + n)
    }

    /// Whether the address is in the block.
    pub fn contains(self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == u32::from(self.address)
    }

    /// The name of the runner's nftables table (`inet` family) for this block.
    pub fn table_name(self) -> String {
        format!("nook_{:08x}{:02}", u32::from(self.address), self.prefix)
    }

    /// The name of the host interface that holds the gateway address.
    pub fn gateway_interface(self) -> String {
        format!("nook{:08x}", u32::from(self.address))
    }

    /// The index of a sandbox address within the block (0 for the first after the gateway).
    fn index(self, address: Ipv4Addr) -> Option<u32> {
        (self.contains(address) && u32::from(address) >= u32::from(self.address) + 2)
            .then(|| u32::from(address) - u32::from(self.address) - 2)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// How a runner networks its sandboxes.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The block sandboxes get addresses from; its first address is the gateway.
    pub subnet: Subnet,
    /// Resolvers the runner's resolver asks for names it does not know itself (the host's, from
    /// `/etc/resolv.conf`, by default).
    pub upstream_dns: Vec<SocketAddr>,
    /// Names the resolver answers itself, with these addresses.
    pub dns_records: BTreeMap<String, Vec<Ipv4Addr>>,
}

impl NetworkConfig {
    /// The default subnet, the host's resolvers and no records of its own.
    pub fn with_defaults() -> Self {
        Self {
            subnet: Subnet::parse(DEFAULT_SUBNET).expect("the default subnet parses"),
            upstream_dns: host_resolvers(Path::new("/etc/resolv.conf")),
            dns_records: BTreeMap::new(),
        }
    }
}

/// The name servers of a resolv.conf file (none when it cannot be read).
pub fn host_resolvers(path: &Path) -> Vec<SocketAddr> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|address| SocketAddr::new(address, 53))
        .collect()
}

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A netlink or system call failed.
    #[error("{action} failed")]
    System {
        /// What was being done.
        action: String,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// nftables refused the rules or could not be run.
    #[error("loading the sandboxes' egress rules failed: {message}")]
    Nft {
        /// What nft said.
        message: String,
    },
    /// The runner was started without sandbox networking.
    #[error(
        "this runner gives sandboxes no network (nook serve --no-network): only the policy `none` can be set; restart \
         it without --no-network for egress rules"
    )]
    Disabled,
    /// Every sandbox address of the subnet is in use.
    #[error("no sandbox address is free in {0} (give the runner a larger --network-subnet)")]
    Exhausted(Subnet),
}

fn system(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetworkError {
    let action = action.into();
    move |source| NetworkError::System { action, source }
}

/// A sandbox's place on the network while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Its address.
    pub address: Ipv4Addr,
}

impl Attachment {
    /// The host end of its veth pair.
    pub fn host_interface(&self) -> String {
        format!("nk{:08x}", u32::from(self.address))
    }
}

/// What the resolver and the proxy need to know of each sandbox, by address.
#[derive(Debug)]
pub struct Directory {
    by_address: RwLock<HashMap<Ipv4Addr, SandboxEntry>>,
    /// Every egress decision, for the audit log.
    decisions: tokio::sync::broadcast::Sender<EgressDecision>,
}

impl Default for Directory {
    fn default() -> Self {
        Self {
            by_address: RwLock::default(),
            decisions: tokio::sync::broadcast::channel(DECISION_QUEUE).0,
        }
    }
}

/// How many egress decisions may wait for the audit log before the oldest are dropped.
const DECISION_QUEUE: usize = 8192;

/// One sandbox in the [`Directory`].
#[derive(Debug, Clone)]
pub struct SandboxEntry {
    /// Its id.
    pub id: String,
    /// Its policy now.
    pub policy: Arc<NetworkPolicy>,
}

impl Directory {
    /// Logs an egress decision and passes it to whoever follows them (the audit log).
    pub fn report(&self, decision: &EgressDecision) {
        decision.log();
        let _ = self.decisions.send(decision.clone());
    }

    /// Follows the egress decisions made from now on.
    pub fn decisions(&self) -> tokio::sync::broadcast::Receiver<EgressDecision> {
        self.decisions.subscribe()
    }

    /// The sandbox at `address`.
    pub fn lookup(&self, address: Ipv4Addr) -> Option<SandboxEntry> {
        self.by_address.read().expect("directory").get(&address).cloned()
    }

    fn insert(&self, address: Ipv4Addr, entry: SandboxEntry) {
        self.by_address.write().expect("directory").insert(address, entry);
    }

    fn remove(&self, address: Ipv4Addr) {
        self.by_address.write().expect("directory").remove(&address);
    }
}

/// An egress decision the resolver or the proxy made: logged (target `nook::egress`: denials at info, the rest at
/// debug) and stored by the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressDecision {
    /// The sandbox.
    pub sandbox_id: String,
    /// The name asked for (resolver, TLS SNI, HTTP Host) or the address connected to.
    pub host: String,
    /// The destination port (none for a DNS lookup).
    pub port: Option<u16>,
    /// Whether it was let through.
    pub allowed: bool,
    /// The rule that decided (1-based), or none when the policy's default did.
    pub rule: Option<usize>,
    /// Who decided: `dns` or `proxy`.
    pub by: &'static str,
    /// Why, in a few words.
    pub reason: String,
}

impl EgressDecision {
    /// Logs the decision.
    pub fn log(&self) {
        let port = self.port.map(|port| port.to_string()).unwrap_or_default();
        let rule = self.rule.map_or_else(|| "default".to_string(), |rule| rule.to_string());
        if self.allowed {
            tracing::debug!(target: "nook::egress", sandbox = %self.sandbox_id, host = %self.host, %port,
                %rule, by = self.by, reason = %self.reason, "egress allowed");
        } else {
            tracing::info!(target: "nook::egress", sandbox = %self.sandbox_id, host = %self.host, %port,
                %rule, by = self.by, reason = %self.reason, "egress denied");
        }
    }
}

struct Addresses {
    /// Sandbox addresses in use (by index into the subnet), and the sandbox holding each.
    used: HashMap<u32, String>,
    /// Where the next search for a free address starts, so that a freed address is not reused at once.
    next: u32,
    /// Addresses that have a policy chain in the table.
    chained: HashSet<Ipv4Addr>,
}

/// A runner's network: its gateway, table, resolver and proxy, and its sandboxes' attachments.
pub struct Network {
    subnet: Subnet,
    table: String,
    host: Mutex<Netlink>,
    addresses: Mutex<Addresses>,
    directory: Arc<Directory>,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Network").field("subnet", &self.subnet).finish()
    }
}

impl Network {
    /// Sets the host up: the gateway on its own interface, forwarding, the nftables table (replacing any left by
    /// an earlier run), and starts the resolver and the egress proxy on the gateway. Needs a Tokio runtime.
    pub async fn open(config: NetworkConfig) -> Result<Arc<Self>, NetworkError> {
        let subnet = config.subnet;
        let gateway = subnet.gateway();
        let table = subnet.table_name();
        let gateway_interface = subnet.gateway_interface();
        let mut host = Netlink::open().map_err(system("opening a netlink socket"))?;
        host.ensure_addressed_device(&gateway_interface)
            .map_err(system(format!("creating the gateway interface {gateway_interface}")))?;
        let index = host
            .index(&gateway_interface)
            .map_err(system(format!("finding {gateway_interface}")))?;
        host.add_address(index, gateway, 32).map_err(system(format!(
            "giving {gateway_interface} the gateway address {gateway}"
        )))?;
        host.set_up(index)
            .map_err(system(format!("bringing {gateway_interface} up")))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(system("turning IPv4 forwarding on"))?;
        nft::load(&nft::base_table(&table, subnet, gateway, PROXY_PORT))?;

        let directory = Arc::new(Directory::default());
        let names = Arc::new(dns::Names::new(config.upstream_dns, config.dns_records));
        let resolver = dns::Resolver::bind(SocketAddr::new(gateway.into(), 53), directory.clone(), names.clone())
            .await
            .map_err(system(format!("starting the sandboxes' resolver on {gateway}:53")))?;
        tokio::spawn(resolver.serve());
        let proxy = proxy::EgressProxy::bind(SocketAddr::new(gateway.into(), PROXY_PORT), directory.clone(), names)
            .await
            .map_err(system(format!("starting the egress proxy on {gateway}:{PROXY_PORT}")))?;
        tokio::spawn(proxy.serve());
        Ok(Arc::new(Self {
            subnet,
            table,
            host: Mutex::new(host),
            addresses: Mutex::new(Addresses {
                used: HashMap::new(),
                next: 0,
                chained: HashSet::new(),
            }),
            directory,
        }))
    }

    /// Follows the egress decisions of the resolver and the proxy from now on.
    pub fn egress_decisions(&self) -> tokio::sync::broadcast::Receiver<EgressDecision> {
        self.directory.decisions()
    }

    /// The runner's subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// The gateway address, which is also the sandboxes' resolver.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.gateway()
    }

    /// The resolver configuration every sandbox gets.
    pub fn resolv_conf(&self) -> String {
        format!("nameserver {}\noptions ndots:0\n", self.gateway())
    }

    /// Gives the sandbox whose init is `pid` its interface, address and policy. Blocking (a few netlink calls, and
    /// one `nft` run when the policy has rules of its own). On failure nothing of it is left.
    pub fn attach(&self, sandbox_id: &str, pid: i32, policy: &NetworkPolicy) -> Result<Attachment, NetworkError> {
        let attachment = Attachment {
            address: self.allocate(sandbox_id)?,
        };
        let attached = self
            .configure(pid, attachment)
            .and_then(|()| self.apply(sandbox_id, attachment, policy));
        if let Err(error) = attached {
            self.detach(sandbox_id, attachment);
            return Err(error);
        }
        Ok(attachment)
    }

    /// Takes back a sandbox that kept running while the runner was away: its address is in use again and its
    /// policy is loaded again (the table was replaced when the runner started).
    pub fn adopt(&self, sandbox_id: &str, attachment: Attachment, policy: &NetworkPolicy) -> Result<(), NetworkError> {
        if let Some(index) = self.subnet.index(attachment.address) {
            let mut addresses = self.addresses.lock().expect("addresses");
            addresses.used.insert(index, sandbox_id.to_string());
        }
        self.apply(sandbox_id, attachment, policy)
    }

    /// Sets a running sandbox's policy; in force for its next packet.
    pub fn apply(&self, sandbox_id: &str, attachment: Attachment, policy: &NetworkPolicy) -> Result<(), NetworkError> {
        let address = attachment.address;
        let had_chain = self.addresses.lock().expect("addresses").chained.contains(&address);
        if let Some(script) = nft::set_policy(&self.table, address, policy, self.gateway(), PROXY_PORT, had_chain) {
            nft::load(&script)?;
        }
        {
            let mut addresses = self.addresses.lock().expect("addresses");
            if nft::needs_no_chain(policy) {
                addresses.chained.remove(&address);
            } else {
                addresses.chained.insert(address);
            }
        }
        self.directory.insert(
            address,
            SandboxEntry {
                id: sandbox_id.to_string(),
                policy: Arc::new(policy.clone()),
            },
        );
        Ok(())
    }

    /// Takes a sandbox off the network: its policy, its host interface (if its namespace still holds it) and its
    /// address. Only the sandbox holding the address can: a second detach of the same attachment, after the address
    /// went to another sandbox, does nothing. Blocking; errors are logged, since nothing can be done about them
    /// here. An address whose chain could not be removed is not handed out again.
    pub fn detach(&self, sandbox_id: &str, attachment: Attachment) {
        let address = attachment.address;
        let Some(index) = self.subnet.index(address) else {
            return;
        };
        let chained = {
            let addresses = self.addresses.lock().expect("addresses");
            if addresses.used.get(&index).map(String::as_str) != Some(sandbox_id) {
                return;
            }
            addresses.chained.contains(&address)
        };
        self.directory.remove(address);
        let mut reusable = true;
        if chained {
            match nft::load(&nft::remove_policy(&self.table, address)) {
                Ok(()) => {
                    self.addresses.lock().expect("addresses").chained.remove(&address);
                }
                Err(error) => {
                    tracing::warn!(%address, %error, "a sandbox's egress rules could not be removed");
                    reusable = false;
                }
            }
        }
        let interface = attachment.host_interface();
        if let Err(error) = self.host.lock().expect("netlink").delete(&interface) {
            tracing::warn!(%interface, %error, "a sandbox's host interface could not be removed");
        }
        if reusable {
            self.addresses.lock().expect("addresses").used.remove(&index);
        }
    }

    fn allocate(&self, sandbox_id: &str) -> Result<Ipv4Addr, NetworkError> {
        let mut addresses = self.addresses.lock().expect("addresses");
        let capacity = self.subnet.capacity();
        for step in 0..capacity {
            let index = (addresses.next + step) % capacity;
            if let std::collections::hash_map::Entry::Vacant(free) = addresses.used.entry(index) {
                free.insert(sandbox_id.to_string());
                addresses.next = (index + 1) % capacity;
                return Ok(self.subnet.host(index));
            }
        }
        Err(NetworkError::Exhausted(self.subnet))
    }

    /// Makes the veth pair, the host's route to the sandbox, and the sandbox's address and routes.
    fn configure(&self, pid: i32, attachment: Attachment) -> Result<(), NetworkError> {
        let interface = attachment.host_interface();
        let namespace_path = format!("/proc/{pid}/ns/net");
        let namespace = File::open(&namespace_path).map_err(system(format!("opening {namespace_path}")))?;
        {
            let mut host = self.host.lock().expect("netlink");
            host.create_veth(&interface, SANDBOX_INTERFACE, &namespace)
                .map_err(system(format!("creating the veth pair {interface}")))?;
            // Strict reverse-path filtering: packets from this link must come from the sandbox's own address.
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter"), "1")
                .map_err(system(format!("turning reverse-path filtering on for {interface}")))?;
            let index = host.index(&interface).map_err(system(format!("finding {interface}")))?;
            host.set_up(index).map_err(system(format!("bringing {interface} up")))?;
            host.add_route(attachment.address, 32, index, None)
                .map_err(system(format!("routing {} to {interface}", attachment.address)))?;
        }
        let gateway = self.gateway();
        let address = attachment.address;
        netlink::in_namespace(namespace, move || {
            let mut inside = Netlink::open()?;
            let index = inside.index(SANDBOX_INTERFACE)?;
            inside.add_address(index, address, 32)?;
            inside.set_up(index)?;
            inside.add_route(gateway, 32, index, None)?;
            inside.add_route(Ipv4Addr::UNSPECIFIED, 0, index, Some(gateway))
        })
        .map_err(system("configuring the sandbox's eth0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_count() {
        let subnet = Subnet::parse("10.89.0.0/16").unwrap();
        assert_eq!(subnet.gateway(), Ipv4Addr::new(10, 89, 0, 1));
        assert_eq!(subnet.host(0), Ipv4Addr::new(10, 89, 0, 2));
        assert_eq!(subnet.capacity(), 65533);
        assert!(subnet.contains(Ipv4Addr::new(10, 89, 200, 3)));
        assert!(!subnet.contains(Ipv4Addr::new(10, 90, 0, 3)));
        assert_eq!(subnet.index(Ipv4Addr::new(10, 89, 0, 2)), Some(0));
        assert_eq!(subnet.index(Ipv4Addr::new(10, 89, 0, 1)), None);
        assert_eq!(subnet.table_name(), "nook_0a59000016");
        assert_eq!(subnet.gateway_interface(), "nook0a590000");
        assert!(Subnet::parse("10.89.0.1/16").is_err());
        assert!(Subnet::parse("10.89.0.0/30").is_err());
        assert!(Subnet::parse("10.89.0.0").is_err());
    }

    #[test]
    fn resolvers_come_from_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "# comment\nnameserver 192.0.2.53\nsearch x\nnameserver ::1\n").unwrap();
        assert_eq!(
            host_resolvers(&path),
            vec!["192.0.2.53:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
    }

    #[test]
    fn host_interfaces_fit_the_kernel_limit() {
        let attachment = Attachment {
            address: Ipv4Addr::new(10, 89, 255, 254),
        };
        assert_eq!(attachment.host_interface(), "nk0a59fffe");
        assert!(attachment.host_interface().len() <= 15);
    }
}
