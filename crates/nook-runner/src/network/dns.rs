//! The runner's resolver: every sandbox's DNS server (the kernel sends a sandbox's port-53 traffic here whatever
//! server it names), which judges each name by the asking sandbox's policy before answering.
//!
//! A name the policy refuses gets NXDOMAIN, so tools fail with "could not resolve" rather than a hang. Names in the
//! runner's own records are answered from them; the rest are forwarded unchanged to the upstream resolvers and their
//! answer is relayed. A query from an address that is no sandbox is refused.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use nook_api::EgressAction;
use tokio::net::UdpSocket;

use super::{Directory, EgressDecision};

/// How long an upstream resolver has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// TTL of the answers from the runner's own records.
const RECORD_TTL: u32 = 30;
/// Largest DNS message over UDP that the resolver reads or relays.
const MAX_DATAGRAM: usize = 4096;

/// How names become addresses: the runner's own records first, then the upstream resolvers. Shared by the resolver
/// and the egress proxy, so both see the same answers.
#[derive(Debug)]
pub struct Names {
    records: BTreeMap<String, Vec<Ipv4Addr>>,
    upstream: Vec<SocketAddr>,
}

impl Names {
    /// The runner's own records (names in any case, with or without the root's dot) over these upstream resolvers.
    pub fn new(upstream: Vec<SocketAddr>, records: BTreeMap<String, Vec<Ipv4Addr>>) -> Self {
        let records = records
            .into_iter()
            .map(|(name, addresses)| (normalise(&name), addresses))
            .collect();
        Self { records, upstream }
    }

    /// The runner's own addresses for `name`, if it has any.
    fn own(&self, name: &str) -> Option<&Vec<Ipv4Addr>> {
        self.records.get(&normalise(name))
    }

    /// The IPv4 addresses of `name`.
    pub async fn resolve(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
        if let Some(addresses) = self.own(name) {
            return Ok(addresses.clone());
        }
        let fqdn = Name::from_ascii(format!("{}.", normalise(name)))
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))?;
        let mut query = Message::new(rand::random(), MessageType::Query, OpCode::Query);
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(fqdn, RecordType::A));
        let bytes = query.to_vec().map_err(io::Error::other)?;
        let answer = self.forward(&bytes).await?;
        let answer = Message::from_vec(&answer).map_err(|error| io::Error::other(error.to_string()))?;
        let addresses: Vec<Ipv4Addr> = answer
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(address) => Some(address.0),
                _ => None,
            })
            .collect();
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} has no IPv4 address"),
            ));
        }
        Ok(addresses)
    }

    /// Sends a query to each upstream resolver in turn; the first answer with the query's id is returned.
    async fn forward(&self, query: &[u8]) -> io::Result<Vec<u8>> {
        if query.len() < 2 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a DNS query has an id"));
        }
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no upstream resolver is configured");
        for server in &self.upstream {
            let local: SocketAddr = match server.ip() {
                IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let attempt = async {
                let socket = UdpSocket::bind(local).await?;
                socket.connect(server).await?;
                socket.send(query).await?;
                let mut buffer = vec![0; MAX_DATAGRAM];
                loop {
                    let size = socket.recv(&mut buffer).await?;
                    if size >= 2 && buffer[..2] == query[..2] {
                        buffer.truncate(size);
                        return Ok::<_, io::Error>(buffer);
                    }
                }
            };
            match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(error)) => last = error,
                Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, format!("{server} did not answer")),
            }
        }
        Err(last)
    }
}

/// The resolver, bound and ready to serve.
pub struct Resolver {
    socket: Arc<UdpSocket>,
    directory: Arc<Directory>,
    names: Arc<Names>,
}

impl Resolver {
    /// Binds the resolver's socket.
    pub async fn bind(address: SocketAddr, directory: Arc<Directory>, names: Arc<Names>) -> io::Result<Self> {
        Ok(Self {
            socket: Arc::new(UdpSocket::bind(address).await?),
            directory,
            names,
        })
    }

    /// Answers queries until the runtime ends; each query is answered on its own task, so a slow upstream holds up
    /// nobody else.
    pub async fn serve(self) {
        let mut buffer = vec![0; MAX_DATAGRAM];
        loop {
            let (size, peer) = match self.socket.recv_from(&mut buffer).await {
                Ok(received) => received,
                Err(error) => {
                    tracing::warn!(%error, "the sandboxes' resolver could not read a query");
                    continue;
                }
            };
            let query = buffer[..size].to_vec();
            let socket = self.socket.clone();
            let directory = self.directory.clone();
            let names = self.names.clone();
            tokio::spawn(async move {
                if let Some(answer) = answer(&query, peer, &directory, &names).await {
                    let _ = socket.send_to(&answer, peer).await;
                }
            });
        }
    }
}

/// The answer to one query, or nothing for a datagram that is not a query.
async fn answer(bytes: &[u8], peer: SocketAddr, directory: &Directory, names: &Names) -> Option<Vec<u8>> {
    let query = Message::from_vec(bytes).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let reply = |code: ResponseCode, answers: Vec<Record>| {
        let mut message = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
        message.metadata.recursion_desired = query.metadata.recursion_desired;
        message.metadata.recursion_available = true;
        message.add_queries(query.queries.clone());
        message.add_answers(answers);
        message.to_vec().ok()
    };
    let sandbox = match peer.ip() {
        IpAddr::V4(address) => directory.lookup(address),
        IpAddr::V6(_) => None,
    };
    let Some(sandbox) = sandbox else {
        return reply(ResponseCode::Refused, Vec::new());
    };
    let [question] = query.queries.as_slice() else {
        return reply(ResponseCode::FormErr, Vec::new());
    };
    let name = normalise(&question.name().to_ascii());
    let (action, rule) = sandbox.policy.domain_decision(&name, None);
    let allowed = action == EgressAction::Allow;
    let decision = EgressDecision {
        sandbox_id: sandbox.id.clone(),
        host: name.clone(),
        port: None,
        allowed,
        rule: rule.map(|index| index + 1),
        by: "dns",
        reason: match (allowed, rule) {
            (true, Some(_)) => "a rule allows the name".into(),
            (false, Some(_)) => "a rule denies the name".into(),
            (true, None) => "no rule names it; the policy allows the rest".into(),
            (false, None) => "no rule allows the name".into(),
        },
    };
    directory.report(&decision);
    if !allowed {
        return reply(ResponseCode::NXDomain, Vec::new());
    }
    if let Some(addresses) = names.own(&name) {
        let answers = match question.query_type() {
            RecordType::A => addresses
                .iter()
                .map(|address| Record::from_rdata(question.name().clone(), RECORD_TTL, RData::A(A(*address))))
                .collect(),
            _ => Vec::new(),
        };
        return reply(ResponseCode::NoError, answers);
    }
    match names.forward(bytes).await {
        Ok(answer) => Some(answer),
        Err(error) => {
            tracing::debug!(%name, %error, "no upstream resolver answered");
            reply(ResponseCode::ServFail, Vec::new())
        }
    }
}

/// A name in the form the policy and the records use: lower case, without the root's trailing dot.
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nook_api::{EgressMode, EgressRule, NetworkPolicy};

    async fn ask(resolver_names: &Names, directory: &Directory, name: &str, from: Ipv4Addr) -> Message {
        let mut query = Message::new(7, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let bytes = answer(
            &query.to_vec().unwrap(),
            SocketAddr::new(from.into(), 5353),
            directory,
            resolver_names,
        )
        .await
        .unwrap();
        Message::from_vec(&bytes).unwrap()
    }

    #[tokio::test]
    async fn names_are_answered_by_policy() {
        let names = Names::new(
            Vec::new(),
            BTreeMap::from([("Web.Test.".to_string(), vec![Ipv4Addr::new(198, 51, 100, 2)])]),
        );
        let directory = Directory::default();
        let sandbox = Ipv4Addr::new(10, 89, 0, 2);
        directory.insert(
            sandbox,
            super::super::SandboxEntry {
                id: "sb-x".into(),
                policy: Arc::new(NetworkPolicy {
                    egress: EgressMode::AllowAll,
                    rules: vec![EgressRule {
                        action: EgressAction::Deny,
                        to: "*.blocked.test".into(),
                        ports: vec![],
                    }],
                    default: None,
                }),
            },
        );
        let answer = ask(&names, &directory, "Web.Test.", sandbox).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer.metadata.id, 7);
        assert!(matches!(answer.answers[0].data, RData::A(A(address)) if address == Ipv4Addr::new(198, 51, 100, 2)));
        let denied = ask(&names, &directory, "api.blocked.test.", sandbox).await;
        assert_eq!(denied.metadata.response_code, ResponseCode::NXDomain);
        // No upstream: a name the runner does not know fails as a server failure, not as "no such name".
        let unknown = ask(&names, &directory, "other.test.", sandbox).await;
        assert_eq!(unknown.metadata.response_code, ResponseCode::ServFail);
        // Only sandboxes are served.
        let stranger = ask(&names, &directory, "web.test.", Ipv4Addr::new(10, 89, 0, 99)).await;
        assert_eq!(stranger.metadata.response_code, ResponseCode::Refused);
    }
}
