//! The egress proxy: where the kernel sends the TCP connections of sandboxes whose policy names domains.
//!
//! A connection arrives with its original destination kept by the kernel (`SO_ORIGINAL_DST`). The proxy reads the
//! client's first bytes, takes the name it asks for from the TLS ClientHello's server name or the HTTP Host header,
//! and judges that name by the sandbox's policy. An allowed name is resolved by the runner's own lookup and the
//! proxy connects to that address (checked against the address rules and the restricted blocks), not to the
//! address the sandbox dialled: a sandbox that names an allowed domain while dialling another host's address
//! reaches the allowed domain or nothing. The bytes already read are sent first, then both directions are copied
//! until either side closes. Nothing is decrypted.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use nook_api::network::EgressTarget;
use nook_api::{EgressAction, NetworkPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::dns::Names;
use super::{Directory, EgressDecision};

/// The most the proxy reads before it must know the name.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client has to send the bytes that name its destination.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The proxy, bound and ready to serve.
pub struct EgressProxy {
    listener: TcpListener,
    directory: Arc<Directory>,
    names: Arc<Names>,
}

impl EgressProxy {
    /// Binds the proxy's socket.
    pub async fn bind(address: SocketAddr, directory: Arc<Directory>, names: Arc<Names>) -> io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(address).await?,
            directory,
            names,
        })
    }

    /// Serves connections until the runtime ends, each on its own task.
    pub async fn serve(self) {
        loop {
            let (client, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "the egress proxy could not accept a connection");
                    continue;
                }
            };
            let (directory, names) = (self.directory.clone(), self.names.clone());
            tokio::spawn(async move {
                if let Err(error) = relay(client, peer, &directory, &names).await {
                    tracing::debug!(%peer, %error, "an egress proxy connection ended with an error");
                }
            });
        }
    }
}

/// Judges one connection and, if allowed, relays it.
async fn relay(mut client: TcpStream, peer: SocketAddr, directory: &Directory, names: &Names) -> io::Result<()> {
    let SocketAddr::V4(peer) = peer else {
        return Ok(());
    };
    let Some(sandbox) = directory.lookup(*peer.ip()) else {
        return Ok(());
    };
    let original = original_destination(&client)?;
    let mut head = Vec::with_capacity(1024);
    let name = tokio::time::timeout(HEAD_TIMEOUT, read_name(&mut client, &mut head))
        .await
        .unwrap_or(Ok(None))?;
    let (destination, rule, reason) = judge(&sandbox.policy, name.as_deref(), original, names).await;
    let mut decision = EgressDecision {
        sandbox_id: sandbox.id,
        host: name.unwrap_or_else(|| original.ip().to_string()),
        port: Some(original.port()),
        allowed: destination.is_some(),
        rule: rule.map(|index| index + 1),
        by: "proxy",
        reason,
    };
    let Some(destination) = destination else {
        directory.report(&decision);
        return Ok(());
    };
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(destination)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            decision.allowed = false;
            decision.reason = format!("connecting to {destination} failed: {error}");
            directory.report(&decision);
            return Ok(());
        }
        Err(_) => {
            decision.allowed = false;
            decision.reason = format!("connecting to {destination} timed out");
            directory.report(&decision);
            return Ok(());
        }
    };
    directory.report(&decision);
    upstream.set_nodelay(true)?;
    client.set_nodelay(true)?;
    upstream.write_all(&head).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Where a connection to `original` that asked for `name` may go (none: refused), the rule that decided, and why.
/// An address rule sends it where it was going; a name (by a rule or the policy's default) sends it where the name
/// leads, never to a restricted address a rule does not open.
async fn judge(
    policy: &NetworkPolicy,
    name: Option<&str>,
    original: SocketAddrV4,
    names: &Names,
) -> (Option<SocketAddrV4>, Option<usize>, String) {
    let port = original.port();
    let (action, rule) = policy.decide(name, *original.ip(), port);
    // Without a name only an address rule can let a connection through.
    if action == EgressAction::Deny || (name.is_none() && rule.is_none()) {
        let why = match (rule, name) {
            (Some(_), _) => "a rule denies the connection",
            (None, Some(_)) => "no rule allows the name",
            (None, None) => {
                "the connection named no host (neither TLS SNI nor HTTP Host) and no address rule allows it"
            }
        };
        return (None, rule, why.into());
    }
    let by_address = rule.is_some_and(|index| matches!(policy.rules[index].target(), Some(EgressTarget::Block(..))));
    let Some(name) = name.filter(|_| !by_address) else {
        return (Some(original), rule, "an address rule allows it".into());
    };
    match names.resolve(name).await {
        Ok(addresses) => match addresses.into_iter().find(|address| policy.opens_address(*address)) {
            Some(address) => (
                Some(SocketAddrV4::new(address, port)),
                rule,
                format!("relayed to {address}:{port}"),
            ),
            None => (
                None,
                rule,
                "the name resolves only to addresses the policy does not open".into(),
            ),
        },
        Err(error) => (None, rule, format!("the name does not resolve: {error}")),
    }
}

/// Where the sandbox was connecting before the kernel redirected it here.
fn original_destination(stream: &TcpStream) -> io::Result<SocketAddrV4> {
    let address = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)),
        u16::from_be(address.sin_port),
    ))
}

/// Reads until the name the client asks for is known (kept in `head`); `None` when its bytes name none.
async fn read_name(client: &mut TcpStream, head: &mut Vec<u8>) -> io::Result<Option<String>> {
    let mut chunk = [0u8; 4096];
    loop {
        match parse_name(head) {
            Parsed::Name(name) => return Ok(Some(name)),
            Parsed::NoName => return Ok(None),
            Parsed::NeedMore if head.len() >= MAX_HEAD => return Ok(None),
            Parsed::NeedMore => {}
        }
        let size = client.read(&mut chunk).await?;
        if size == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..size]);
    }
}

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Name(String),
    NoName,
    NeedMore,
}

/// The destination name in a connection's first bytes: a TLS ClientHello's server name, or an HTTP/1 request's
/// Host header (without its port).
fn parse_name(head: &[u8]) -> Parsed {
    match head.first() {
        None => Parsed::NeedMore,
        Some(0x16) => parse_sni(head),
        Some(_) => parse_host_header(head),
    }
}

fn parse_host_header(head: &[u8]) -> Parsed {
    let Some(end) = head.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Parsed::NeedMore;
    };
    let Ok(text) = std::str::from_utf8(&head[..end]) else {
        return Parsed::NoName;
    };
    for line in text.split("\r\n").skip(1) {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        if field.trim().eq_ignore_ascii_case("host") {
            let value = value.trim();
            // A port may follow the name; an IPv6 literal in brackets names no domain.
            let host = value.rsplit_once(':').map_or(value, |(host, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    host
                } else {
                    value
                }
            });
            return if is_domain(host) {
                Parsed::Name(host.to_ascii_lowercase())
            } else {
                Parsed::NoName
            };
        }
    }
    Parsed::NoName
}

/// Reads the server name extension of a ClientHello in the first TLS record.
fn parse_sni(head: &[u8]) -> Parsed {
    if head.len() < 5 {
        return Parsed::NeedMore;
    }
    let record_length = usize::from(u16::from_be_bytes([head[3], head[4]]));
    if head.len() < 5 + record_length {
        return if 5 + record_length > MAX_HEAD {
            Parsed::NoName
        } else {
            Parsed::NeedMore
        };
    }
    let mut reader = Reader(&head[5..5 + record_length]);
    let name = (|| {
        if reader.u8()? != 1 {
            return None; // not a ClientHello
        }
        reader.skip(3)?; // handshake length
        reader.skip(2 + 32)?; // version, random
        let session = usize::from(reader.u8()?);
        reader.skip(session)?;
        let suites = usize::from(reader.u16()?);
        reader.skip(suites)?;
        let compression = usize::from(reader.u8()?);
        reader.skip(compression)?;
        let extensions = usize::from(reader.u16()?);
        let mut extensions = Reader(reader.take(extensions)?);
        while !extensions.0.is_empty() {
            let kind = extensions.u16()?;
            let length = usize::from(extensions.u16()?);
            let mut body = Reader(extensions.take(length)?);
            if kind == 0 {
                let list = usize::from(body.u16()?);
                let mut list = Reader(body.take(list)?);
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let length = usize::from(list.u16()?);
                    let name = list.take(length)?;
                    if name_type == 0 {
                        return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
                    }
                }
            }
        }
        None
    })();
    match name {
        Some(name) if is_domain(&name) => Parsed::Name(name),
        _ => Parsed::NoName,
    }
}

/// Whether a host is a domain name (not an address literal, not empty, only name characters).
fn is_domain(host: &str) -> bool {
    !host.is_empty()
        && host.parse::<Ipv4Addr>().is_err()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

/// A cursor over bytes, every read bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.0.len() < count {
            return None;
        }
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        Some(taken)
    }

    fn skip(&mut self, count: usize) -> Option<()> {
        self.take(count).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with one server name.
    fn client_hello(name: &str) -> Vec<u8> {
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut extensions = Vec::new();
        extensions.extend_from_slice(&0u16.to_be_bytes());
        extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        extensions.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn names_come_from_sni() {
        let hello = client_hello("API.example.test");
        assert_eq!(parse_name(&hello), Parsed::Name("api.example.test".into()));
        assert_eq!(parse_name(&hello[..20]), Parsed::NeedMore);
        assert_eq!(parse_name(&client_hello("198.51.100.2")), Parsed::NoName);
        let mut garbage = hello.clone();
        garbage[5] = 2; // a ServerHello
        assert_eq!(parse_name(&garbage), Parsed::NoName);
    }

    #[test]
    fn names_come_from_the_host_header() {
        assert_eq!(
            parse_name(b"GET / HTTP/1.1\r\nhost: Web.test:8080\r\nAccept: */*\r\n\r\n"),
            Parsed::Name("web.test".into())
        );
        assert_eq!(parse_name(b"GET / HTTP/1.1\r\nHost: web.test"), Parsed::NeedMore);
        assert_eq!(
            parse_name(b"GET / HTTP/1.1\r\nHost: 198.51.100.2\r\n\r\n"),
            Parsed::NoName
        );
        assert_eq!(parse_name(b"GET / HTTP/1.0\r\n\r\n"), Parsed::NoName);
    }
}
