//! Network egress policies: what a sandbox may reach, as the API carries them, and the checks every policy passes
//! before the runner turns it into kernel rules.
//!
//! A policy is a mode and an ordered list of rules. `allow_all` lets the sandbox reach any public address (after its
//! deny rules); `none` gives it no network interface at all; `rules` applies the rules in order, first match wins,
//! and then `default`. A rule names a CIDR block or an address (enforced in the kernel), or a domain, exact or a
//! `*.` wildcard (enforced by nook's resolver and egress proxy), optionally limited to ports. Private ranges and
//! link-local addresses (cloud metadata services live there) are never reached through a broad rule: only a rule
//! whose block lies inside them opens them.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most rules one policy may carry.
pub const MAX_EGRESS_RULES: usize = 256;
/// Most ports one rule may name.
pub const MAX_RULE_PORTS: usize = 32;
/// Longest domain name (RFC 1035's limit for a name in text form).
pub const MAX_DOMAIN_LEN: usize = 253;

/// Address blocks no sandbox reaches unless a rule inside the block allows it: "this" network, RFC 1918 private
/// ranges, shared address space (carrier-grade NAT), loopback, link-local (where cloud metadata services such as
/// 169.254.169.254 answer), IETF protocol assignments, benchmarking, multicast and reserved space.
pub const RESTRICTED_BLOCKS: [(Ipv4Addr, u8); 10] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(224, 0, 0, 0), 3),
];

/// What a sandbox may reach. Body of `PUT /v1/sandboxes/{sandbox}/network`, which takes effect on a running
/// sandbox at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// `allow_all` (the default): any public address, after the deny rules; `none`: no network interface;
    /// `rules`: the rules in order, first match wins, then `default`.
    #[serde(default)]
    pub egress: EgressMode,
    /// Ordered rules; the first that matches a connection decides it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<EgressRule>,
    /// What happens to traffic no rule matches in `rules` mode (`deny` when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<EgressAction>,
}

/// How a sandbox's egress is decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// Any public address, after the policy's deny rules.
    #[default]
    AllowAll,
    /// No network at all: the sandbox has only its loopback interface.
    None,
    /// The rules in order, then the policy's default.
    Rules,
}

/// What a rule does with the traffic it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EgressAction {
    /// Let it through.
    Allow,
    /// Refuse it (connections fail at once rather than hang).
    Deny,
}

/// One egress rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// Allow or deny.
    pub action: EgressAction,
    /// An IPv4 address or CIDR block (`198.51.100.7`, `10.1.0.0/16`), a domain (`api.example.com`) or a wildcard
    /// domain (`*.example.com`, which matches subdomains only).
    pub to: String,
    /// Destination ports (TCP and UDP); all ports when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// What a rule's `to` names, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressTarget<'a> {
    /// An address block.
    Block(Ipv4Addr, u8),
    /// A domain, exact.
    Domain(&'a str),
    /// Every subdomain of this domain (the rule's `*.` removed).
    Subdomains(&'a str),
}

impl EgressRule {
    /// What the rule names; `None` when `to` is neither a block nor a domain (a checked policy never has that).
    pub fn target(&self) -> Option<EgressTarget<'_>> {
        parse_target(&self.to).ok()
    }
}

impl NetworkPolicy {
    /// A policy with no network at all.
    pub fn none() -> Self {
        Self {
            egress: EgressMode::None,
            ..Self::default()
        }
    }

    /// Checks every rule; the message names the rule and what is wrong with it.
    pub fn check(&self) -> Result<(), String> {
        if self.rules.len() > MAX_EGRESS_RULES {
            return Err(format!("a network policy has at most {MAX_EGRESS_RULES} rules"));
        }
        if self.egress == EgressMode::None && !self.rules.is_empty() {
            return Err("egress `none` takes no rules: the sandbox has no network".into());
        }
        if self.default.is_some() && self.egress != EgressMode::Rules {
            return Err("`default` applies only to egress `rules`".into());
        }
        for (index, rule) in self.rules.iter().enumerate() {
            let number = index + 1;
            parse_target(&rule.to).map_err(|why| format!("rule {number} (`{}`): {why}", rule.to))?;
            if rule.ports.len() > MAX_RULE_PORTS {
                return Err(format!("rule {number}: at most {MAX_RULE_PORTS} ports"));
            }
            if rule.ports.contains(&0) {
                return Err(format!("rule {number}: port 0 is not a port"));
            }
        }
        Ok(())
    }

    /// The policy in a line: `allow 10.1.0.0/16:443; deny *.example.com; then deny`.
    pub fn summary(&self) -> String {
        let rules: Vec<String> = self
            .rules
            .iter()
            .map(|rule| {
                let action = match rule.action {
                    EgressAction::Allow => "allow",
                    EgressAction::Deny => "deny",
                };
                if rule.ports.is_empty() {
                    format!("{action} {}", rule.to)
                } else {
                    let ports: Vec<String> = rule.ports.iter().map(u16::to_string).collect();
                    format!("{action} {}:{}", rule.to, ports.join(","))
                }
            })
            .collect();
        match (self.egress, self.unmatched_action()) {
            (EgressMode::None, _) => "no network".into(),
            (EgressMode::AllowAll, _) if rules.is_empty() => "any public address".into(),
            (EgressMode::AllowAll, _) => format!("{}; then any public address", rules.join("; ")),
            (EgressMode::Rules, EgressAction::Allow) => format!("{}; then any public address", rules.join("; ")),
            (EgressMode::Rules, EgressAction::Deny) => format!("{}; then deny", rules.join("; ")),
        }
    }

    /// Whether any rule names a domain (such policies need nook's resolver and egress proxy to decide).
    pub fn has_domain_rules(&self) -> bool {
        self.rules.iter().any(|rule| {
            matches!(
                rule.target(),
                Some(EgressTarget::Domain(_) | EgressTarget::Subdomains(_))
            )
        })
    }

    /// The decision for a connection to `domain` on `port` by the domain rules alone: the first domain rule that
    /// matches, else what the mode says for a name no rule names (`allow_all`: allow; `rules`: the default).
    /// Address rules cannot match a name; the caller checks the address the name leads to separately.
    pub fn domain_decision(&self, domain: &str, port: Option<u16>) -> (EgressAction, Option<usize>) {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        for (index, rule) in self.rules.iter().enumerate() {
            let matches = rule.target().is_some_and(|target| name_matches(target, &domain));
            let port_matches = rule.ports.is_empty() || port.is_none_or(|port| rule.ports.contains(&port));
            if matches && port_matches {
                return (rule.action, Some(index));
            }
        }
        (self.unmatched_action(), None)
    }

    /// The decision for a TCP connection to `address:port` that asked for `name` (TLS SNI, HTTP Host): the rules in
    /// order, an address rule matching the address and a domain rule matching the name, else what the mode says.
    pub fn decide(&self, name: Option<&str>, address: Ipv4Addr, port: u16) -> (EgressAction, Option<usize>) {
        let name = name.map(|name| name.trim_end_matches('.').to_ascii_lowercase());
        for (index, rule) in self.rules.iter().enumerate() {
            if !(rule.ports.is_empty() || rule.ports.contains(&port)) {
                continue;
            }
            let matches = match (rule.target(), name.as_deref()) {
                (Some(EgressTarget::Block(block, prefix)), _) => in_block(address, block, prefix),
                (Some(target @ (EgressTarget::Domain(_) | EgressTarget::Subdomains(_))), Some(name)) => {
                    name_matches(target, name)
                }
                _ => false,
            };
            if matches {
                if rule.action == EgressAction::Allow {
                    if let Some(EgressTarget::Block(block, prefix)) = rule.target() {
                        // A broad allow never opens a restricted address.
                        if is_restricted(address) && !inside_restricted(block, prefix) {
                            return (EgressAction::Deny, Some(index));
                        }
                    }
                }
                return (rule.action, Some(index));
            }
        }
        match self.unmatched_action() {
            EgressAction::Allow if is_restricted(address) => (EgressAction::Deny, None),
            action => (action, None),
        }
    }

    /// Whether an allowed name may lead to `address`: any address outside the restricted blocks, and a restricted
    /// one only when an allow rule inside its block opens it. So an allowed name that resolves to a metadata or
    /// private address still gets nowhere.
    pub fn opens_address(&self, address: Ipv4Addr) -> bool {
        !is_restricted(address)
            || self.rules.iter().any(|rule| {
                rule.action == EgressAction::Allow
                    && matches!(rule.target(), Some(EgressTarget::Block(block, prefix))
                        if inside_restricted(block, prefix) && in_block(address, block, prefix))
            })
    }

    /// What happens to traffic no rule matches.
    pub fn unmatched_action(&self) -> EgressAction {
        match self.egress {
            EgressMode::AllowAll => EgressAction::Allow,
            EgressMode::None => EgressAction::Deny,
            EgressMode::Rules => self.default.unwrap_or(EgressAction::Deny),
        }
    }
}

/// Whether a domain target matches a (lower-case) name; a wildcard matches subdomains only.
fn name_matches(target: EgressTarget<'_>, name: &str) -> bool {
    match target {
        EgressTarget::Domain(domain) => domain.eq_ignore_ascii_case(name),
        EgressTarget::Subdomains(parent) => name
            .strip_suffix(&parent.to_ascii_lowercase())
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        EgressTarget::Block(..) => false,
    }
}

/// Whether the block lies inside one of the [`RESTRICTED_BLOCKS`] (a rule for it opens it explicitly).
pub fn inside_restricted(address: Ipv4Addr, prefix: u8) -> bool {
    RESTRICTED_BLOCKS
        .iter()
        .any(|&(block, block_prefix)| prefix >= block_prefix && in_block(address, block, block_prefix))
}

/// Whether the address is in one of the [`RESTRICTED_BLOCKS`].
pub fn is_restricted(address: Ipv4Addr) -> bool {
    inside_restricted(address, 32)
}

/// Whether `address` lies in the block `block`/`prefix`.
pub fn in_block(address: Ipv4Addr, block: Ipv4Addr, prefix: u8) -> bool {
    u32::from(address) & mask(prefix) == u32::from(block) & mask(prefix)
}

/// Parses a rule's `to`.
pub fn parse_target(to: &str) -> Result<EgressTarget<'_>, String> {
    if to.is_empty() {
        return Err("empty".into());
    }
    if to.contains(':') {
        return Err("IPv6 is not supported: sandboxes have IPv4 networking only".into());
    }
    let looks_numeric = to.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '/');
    if looks_numeric {
        let (address, prefix) = match to.split_once('/') {
            Some((address, prefix)) => (
                address,
                prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|prefix| *prefix <= 32)
                    .ok_or("the prefix length must be 0 to 32")?,
            ),
            None => (to, 32),
        };
        let address: Ipv4Addr = address.parse().map_err(|_| "not an IPv4 address")?;
        if u32::from(address) & !mask(prefix) != 0 {
            return Err(format!(
                "the address has bits set beyond the /{prefix} prefix (did you mean {}/{prefix}?)",
                Ipv4Addr::from(u32::from(address) & mask(prefix))
            ));
        }
        return Ok(EgressTarget::Block(address, prefix));
    }
    let (wildcard, name) = match to.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, to),
    };
    check_domain(name)?;
    Ok(if wildcard {
        EgressTarget::Subdomains(name)
    } else {
        EgressTarget::Domain(name)
    })
}

/// The netmask of a prefix length, as a number.
fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn check_domain(name: &str) -> Result<(), String> {
    if name.len() > MAX_DOMAIN_LEN {
        return Err(format!("a domain has at most {MAX_DOMAIN_LEN} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label of a domain has 1 to 63 characters".into());
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(
                "a domain has letters, digits, hyphens and dots only (a wildcard only as a leading `*.`)".into(),
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a domain's labels do not start or end with a hyphen".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: EgressAction, to: &str, ports: &[u16]) -> EgressRule {
        EgressRule {
            action,
            to: to.into(),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn targets_are_blocks_or_domains() {
        assert_eq!(
            parse_target("10.1.0.0/16"),
            Ok(EgressTarget::Block(Ipv4Addr::new(10, 1, 0, 0), 16))
        );
        assert_eq!(
            parse_target("198.51.100.7"),
            Ok(EgressTarget::Block(Ipv4Addr::new(198, 51, 100, 7), 32))
        );
        assert_eq!(
            parse_target("api.example.test"),
            Ok(EgressTarget::Domain("api.example.test"))
        );
        assert_eq!(
            parse_target("*.example.test"),
            Ok(EgressTarget::Subdomains("example.test"))
        );
        assert!(parse_target("10.1.0.1/16").unwrap_err().contains("10.1.0.0/16"));
        assert!(parse_target("10.1.0.0/33").is_err());
        assert!(parse_target("fd00::/8").unwrap_err().contains("IPv6"));
        assert!(parse_target("a.*.test").is_err());
        assert!(parse_target("-bad.test").is_err());
        assert!(parse_target("").is_err());
    }

    #[test]
    fn restricted_blocks_are_opened_only_from_inside() {
        assert!(inside_restricted(Ipv4Addr::new(10, 201, 0, 0), 24));
        assert!(inside_restricted(Ipv4Addr::new(169, 254, 169, 254), 32));
        assert!(!inside_restricted(Ipv4Addr::new(0, 0, 0, 0), 0));
        assert!(!inside_restricted(Ipv4Addr::new(198, 51, 100, 0), 24));
        assert!(is_restricted(Ipv4Addr::new(192, 168, 1, 1)));
        assert!(is_restricted(Ipv4Addr::new(239, 1, 1, 1)));
        assert!(!is_restricted(Ipv4Addr::new(198, 51, 100, 7)));
    }

    #[test]
    fn domain_rules_match_in_order_and_by_port() {
        let policy = NetworkPolicy {
            egress: EgressMode::Rules,
            rules: vec![
                rule(EgressAction::Deny, "secret.example.test", &[]),
                rule(EgressAction::Allow, "*.example.test", &[443]),
                rule(EgressAction::Allow, "10.0.0.0/8", &[]),
            ],
            default: None,
        };
        assert!(policy.check().is_ok());
        assert!(policy.has_domain_rules());
        assert_eq!(
            policy.domain_decision("secret.example.test", Some(443)),
            (EgressAction::Deny, Some(0))
        );
        assert_eq!(
            policy.domain_decision("API.example.test.", Some(443)),
            (EgressAction::Allow, Some(1))
        );
        assert_eq!(
            policy.domain_decision("api.example.test", Some(80)),
            (EgressAction::Deny, None)
        );
        // A wildcard matches subdomains, not the domain itself, nor names that merely end the same way.
        assert_eq!(
            policy.domain_decision("example.test", Some(443)),
            (EgressAction::Deny, None)
        );
        assert_eq!(
            policy.domain_decision("badexample.test", Some(443)),
            (EgressAction::Deny, None)
        );
        // Without a port (a DNS lookup), a rule limited to ports still matches the name.
        assert_eq!(
            policy.domain_decision("api.example.test", None),
            (EgressAction::Allow, Some(1))
        );
    }

    #[test]
    fn connections_are_decided_by_the_rules_in_order() {
        // E2B's shape: allowed destinations first, then everything else denied.
        let policy = NetworkPolicy {
            egress: EgressMode::AllowAll,
            rules: vec![
                rule(EgressAction::Allow, "good.test", &[]),
                rule(EgressAction::Allow, "169.254.169.254", &[80]),
                rule(EgressAction::Deny, "0.0.0.0/0", &[]),
            ],
            default: None,
        };
        let public = Ipv4Addr::new(198, 51, 100, 20);
        assert_eq!(
            policy.decide(Some("good.test"), public, 443),
            (EgressAction::Allow, Some(0))
        );
        assert_eq!(
            policy.decide(Some("evil.test"), public, 443),
            (EgressAction::Deny, Some(2))
        );
        assert_eq!(policy.decide(None, public, 443), (EgressAction::Deny, Some(2)));
        let metadata = Ipv4Addr::new(169, 254, 169, 254);
        assert_eq!(policy.decide(None, metadata, 80), (EgressAction::Allow, Some(1)));
        assert!(policy.opens_address(metadata));
        assert!(!policy.opens_address(Ipv4Addr::new(10, 0, 0, 1)));
        // Allowing everything does not open restricted blocks.
        let open = NetworkPolicy {
            egress: EgressMode::Rules,
            rules: vec![rule(EgressAction::Allow, "0.0.0.0/0", &[])],
            default: None,
        };
        assert_eq!(open.decide(None, metadata, 80), (EgressAction::Deny, Some(0)));
        assert_eq!(open.decide(None, public, 80), (EgressAction::Allow, Some(0)));
        assert_eq!(
            NetworkPolicy::default().decide(None, metadata, 80),
            (EgressAction::Deny, None)
        );
    }

    #[test]
    fn bad_policies_say_what_is_wrong() {
        let mut policy = NetworkPolicy::none();
        policy.rules.push(rule(EgressAction::Allow, "10.0.0.0/8", &[]));
        assert!(policy.check().unwrap_err().contains("none"));
        let policy = NetworkPolicy {
            egress: EgressMode::AllowAll,
            rules: vec![],
            default: Some(EgressAction::Deny),
        };
        assert!(policy.check().unwrap_err().contains("default"));
        let policy = NetworkPolicy {
            egress: EgressMode::Rules,
            rules: vec![rule(EgressAction::Allow, "10.0.0.0/8", &[0])],
            default: None,
        };
        assert!(policy.check().unwrap_err().contains("rule 1"));
    }
}
