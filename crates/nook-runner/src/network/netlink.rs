//! A small synchronous rtnetlink client: the handful of link, address and route changes a sandbox's network needs,
//! as netlink messages on one socket (no `ip` process per sandbox).
//!
//! A netlink socket belongs to the network namespace it was opened in. Changes inside a sandbox's namespace are made
//! on a short-lived thread that enters it ([`in_namespace`]), opens its own socket there and exits; the runner's
//! other threads never leave the host's namespace.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;

/// One rtnetlink socket, in the namespace of the thread that opened it.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
            buffer: vec![0; 16 * 1024],
        })
    }

    /// Creates a bridge with no ports, unless an interface of that name exists: a device that only holds an
    /// address (the `dummy` driver would do, but kernels are often built without it; bridges are everywhere).
    pub fn ensure_addressed_device(&mut self, name: &str) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.into()));
        link.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        exists_is_fine(self.request(RouteNetlinkMessage::NewLink(link), NLM_F_CREATE | NLM_F_EXCL))
    }

    /// Creates a veth pair: `host_name` here, and its peer `peer_name` directly in the namespace `peer_namespace`.
    pub fn create_veth(&mut self, host_name: &str, peer_name: &str, peer_namespace: &File) -> io::Result<()> {
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(peer_name.into()));
        peer.attributes.push(LinkAttribute::NetNsFd(peer_namespace.as_raw_fd()));
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(host_name.into()));
        link.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(link), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// The index of the interface `name`.
    pub fn index(&mut self, name: &str) -> io::Result<u32> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.into()));
        let reply = self.exchange(RouteNetlinkMessage::GetLink(link), 0)?;
        match reply {
            Some(RouteNetlinkMessage::NewLink(link)) => Ok(link.header.index),
            _ => Err(io::Error::other(format!(
                "the kernel did not describe the interface {name}"
            ))),
        }
    }

    /// Brings an interface up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }

    /// Deletes an interface (a veth's peer goes with it); a missing one is not an error.
    pub fn delete(&mut self, name: &str) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.into()));
        match self.request(RouteNetlinkMessage::DelLink(link), 0) {
            Err(error) if error.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            other => other,
        }
    }

    /// Adds `address/prefix` to an interface, unless it has it.
    pub fn add_address(&mut self, index: u32, address: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = prefix;
        message.header.index = index;
        message.attributes.push(AddressAttribute::Local(address.into()));
        message.attributes.push(AddressAttribute::Address(address.into()));
        exists_is_fine(self.request(RouteNetlinkMessage::NewAddress(message), NLM_F_CREATE | NLM_F_EXCL))
    }

    /// Adds a route to `destination/prefix` out of interface `index`, through `gateway` or (without one) directly
    /// on the link; an existing identical route is not an error.
    pub fn add_route(
        &mut self,
        destination: Ipv4Addr,
        prefix: u8,
        index: u32,
        gateway: Option<Ipv4Addr>,
    ) -> io::Result<()> {
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route.header.destination_prefix_length = prefix;
        route.header.table = RT_TABLE_MAIN;
        route.header.protocol = RouteProtocol::Static;
        route.header.kind = RouteType::Unicast;
        route.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if prefix > 0 {
            route
                .attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(destination)));
        }
        route.attributes.push(RouteAttribute::Oif(index));
        if let Some(gateway) = gateway {
            route
                .attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        }
        exists_is_fine(self.request(RouteNetlinkMessage::NewRoute(route), NLM_F_CREATE | NLM_F_EXCL))
    }

    /// Sends a change and waits for its acknowledgement.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.exchange(message, flags | NLM_F_ACK).map(|_| ())
    }

    /// Sends one message and reads until its acknowledgement or answer.
    fn exchange(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<Option<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.sequence;
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        loop {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buffer[offset..size])
                    .map_err(|error| io::Error::other(format!("an unreadable netlink answer: {error}")))?;
                let length = reply.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += (length + 3) & !3;
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            Some(_) => Err(error.to_io()),
                            None => Ok(None),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(None),
                    NetlinkPayload::InnerMessage(inner) => return Ok(Some(inner)),
                    _ => {}
                }
            }
        }
    }
}

fn exists_is_fine(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(error) if error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Runs `work` on a new thread that has entered the network namespace `namespace`, and returns its result. The
/// thread exits afterwards, so no thread of the runner stays in a sandbox's namespace.
pub fn in_namespace<T: Send + 'static>(
    namespace: File,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    std::thread::Builder::new()
        .name("nook-netns".into())
        .spawn(move || {
            nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)?;
            work()
        })?
        .join()
        .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}
