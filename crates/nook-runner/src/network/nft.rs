//! The runner's nftables table: the rules every sandbox of this runner passes, and one chain per sandbox whose
//! policy is more than "any public address".
//!
//! The table is written as nft's own language and loaded with one `nft -f -` per change, which the kernel applies
//! as one transaction. Changes happen when the runner starts and when a sandbox with its own rules starts, stops or
//! gets a new policy; a sandbox with the default policy costs no change at all, because the base table already lets
//! every address of the subnet reach public addresses. Every packet a sandbox sends is judged (not only a
//! connection's first), so a new policy cuts off connections it no longer allows.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use nook_api::network::{inside_restricted, EgressTarget, RESTRICTED_BLOCKS};
use nook_api::{EgressAction, EgressMode, NetworkPolicy};

use super::{NetworkError, Subnet};

/// How refused traffic is refused: at once, so that a connection fails with "no route to host" instead of hanging.
const REFUSE: &str = "reject with icmpx admin-prohibited";

/// The chain name of one sandbox's policy, from its address.
pub fn policy_chain(address: Ipv4Addr) -> String {
    format!("sandbox_{:08x}", u32::from(address))
}

/// The whole base table, replacing any table of the same name (a runner that starts again starts clean; the
/// sandboxes it adopts get their chains back afterwards).
pub fn base_table(table: &str, subnet: Subnet, gateway: Ipv4Addr, proxy_port: u16) -> String {
    let restricted = RESTRICTED_BLOCKS
        .iter()
        .map(|(address, prefix)| format!("{address}/{prefix}"))
        .collect::<Vec<_>>()
        .join(", ");
    let subnet = subnet.to_string();
    format!(
        "table inet {table} {{}}
delete table inet {table}
table inet {table} {{
    set restricted {{
        type ipv4_addr; flags interval;
        elements = {{ {restricted} }}
    }}
    map policies {{
        type ipv4_addr : verdict;
    }}
    map redirects {{
        type ipv4_addr : verdict;
    }}
    set proxied {{
        type ipv4_addr;
    }}
    chain sandbox_forward {{
        type filter hook forward priority filter - 10; policy accept;
        ip saddr {subnet} jump sandbox_egress
        ip daddr {subnet} ct state established,related accept
        ip daddr {subnet} {REFUSE}
    }}
    chain sandbox_egress {{
        ip daddr {subnet} {REFUSE}
        ip saddr vmap @policies
        jump public_only
    }}
    chain public_only {{
        ip daddr @restricted {REFUSE}
        accept
    }}
    chain sandbox_input {{
        type filter hook input priority filter - 10; policy accept;
        ip saddr {subnet} jump sandbox_to_host
        iifname \"nk*\" meta nfproto ipv6 drop
    }}
    chain sandbox_to_host {{
        ip daddr {gateway} meta l4proto {{ tcp, udp }} th dport 53 accept
        ip daddr {gateway} tcp dport {proxy_port} ip saddr @proxied accept
        ct state established,related accept
        {REFUSE}
    }}
    chain sandbox_dnat {{
        type nat hook prerouting priority dstnat; policy accept;
        ip saddr {subnet} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {gateway}:53
        ip saddr @proxied ip daddr != {subnet} meta l4proto tcp jump to_proxy
    }}
    chain to_proxy {{
        ip saddr vmap @redirects
    }}
    chain sandbox_snat {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} ip daddr != {subnet} masquerade
    }}
}}
"
    )
}

/// Loads one sandbox's policy: its chain (made or emptied and refilled) and its map entry, or, for the default
/// policy, no chain at all.
pub fn set_policy(
    table: &str,
    address: Ipv4Addr,
    policy: &NetworkPolicy,
    gateway: Ipv4Addr,
    proxy_port: u16,
    had_chain: bool,
) -> Option<String> {
    let chain = policy_chain(address);
    let redirect_chain = format!("{chain}_redirect");
    let mut script = String::new();
    if had_chain {
        remove_lines(&mut script, table, address);
    }
    if needs_no_chain(policy) {
        return (!script.is_empty()).then_some(script);
    }
    let _ = writeln!(script, "add chain inet {table} {chain}");
    for rule in &policy.rules {
        let ports = ports_match(&rule.ports);
        match (rule.target(), rule.action) {
            (Some(EgressTarget::Block(block, prefix)), EgressAction::Allow) => {
                let opened = if inside_restricted(block, prefix) {
                    String::new()
                } else {
                    " ip daddr != @restricted".into()
                };
                let _ = writeln!(
                    script,
                    "add rule inet {table} {chain} ip daddr {block}/{prefix}{opened}{ports} accept"
                );
            }
            (Some(EgressTarget::Block(block, prefix)), EgressAction::Deny) => {
                let _ = writeln!(
                    script,
                    "add rule inet {table} {chain} ip daddr {block}/{prefix}{ports} {REFUSE}"
                );
            }
            // Names are judged by the resolver and the egress proxy, never by an address.
            _ => {}
        }
    }
    let last = match policy.unmatched_action() {
        EgressAction::Allow => "jump public_only".to_string(),
        EgressAction::Deny => REFUSE.to_string(),
    };
    let _ = writeln!(script, "add rule inet {table} {chain} {last}");
    let _ = writeln!(
        script,
        "add element inet {table} policies {{ {address} : jump {chain} }}"
    );
    if policy.has_domain_rules() {
        // TCP that no address rule decides goes to the egress proxy, which reads the name the client asks for
        // (TLS SNI, HTTP Host) and judges that.
        // Address rules before the first domain rule decide in the kernel; from the first domain rule on, the
        // proxy walks the rest in order with the name in hand.
        let _ = writeln!(script, "add chain inet {table} {redirect_chain}");
        for rule in &policy.rules {
            let Some(EgressTarget::Block(block, prefix)) = rule.target() else {
                break;
            };
            let ports = ports_match(&rule.ports);
            let _ = writeln!(
                script,
                "add rule inet {table} {redirect_chain} ip daddr {block}/{prefix}{ports} return"
            );
        }
        let _ = writeln!(
            script,
            "add rule inet {table} {redirect_chain} meta l4proto tcp dnat ip to {gateway}:{proxy_port}"
        );
        let _ = writeln!(
            script,
            "add element inet {table} redirects {{ {address} : jump {redirect_chain} }}"
        );
        let _ = writeln!(script, "add element inet {table} proxied {{ {address} }}");
    }
    Some(script)
}

/// Removes a sandbox's chain and map entries, when it stops or returns to the default policy.
pub fn remove_policy(table: &str, address: Ipv4Addr) -> String {
    let mut script = String::new();
    remove_lines(&mut script, table, address);
    script
}

/// The lines that remove everything [`set_policy`] may have added for `address`. Each `add` before its `delete`
/// makes the pair work whether or not the object exists.
fn remove_lines(script: &mut String, table: &str, address: Ipv4Addr) {
    let chain = policy_chain(address);
    let redirect_chain = format!("{chain}_redirect");
    for (map, verdict) in [("policies", &chain), ("redirects", &redirect_chain)] {
        let _ = writeln!(script, "add chain inet {table} {verdict}");
        let _ = writeln!(
            script,
            "add element inet {table} {map} {{ {address} : jump {verdict} }}"
        );
        let _ = writeln!(script, "delete element inet {table} {map} {{ {address} }}");
    }
    let _ = writeln!(script, "add element inet {table} proxied {{ {address} }}");
    let _ = writeln!(script, "delete element inet {table} proxied {{ {address} }}");
    let _ = writeln!(script, "delete chain inet {table} {chain}");
    let _ = writeln!(script, "delete chain inet {table} {redirect_chain}");
}

/// Whether the base table's rules are the whole policy: any public address, nothing else.
pub fn needs_no_chain(policy: &NetworkPolicy) -> bool {
    policy.egress == EgressMode::AllowAll && policy.rules.is_empty()
}

fn ports_match(ports: &[u16]) -> String {
    if ports.is_empty() {
        return String::new();
    }
    let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    format!(" meta l4proto {{ tcp, udp }} th dport {{ {list} }}")
}

/// Loads a script with `nft -f -`; the kernel applies it as one transaction or not at all.
pub fn load(script: &str) -> Result<(), NetworkError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetworkError::Nft {
            message: match source.kind() {
                std::io::ErrorKind::NotFound => {
                    "the nft program is missing: install nftables (scripts/setup.sh does), or run without a network"
                        .into()
                }
                _ => format!("cannot run nft: {source}"),
            },
        })?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(script.as_bytes()))
        .unwrap_or(Ok(()));
    let output = child.wait_with_output().map_err(|source| NetworkError::Nft {
        message: format!("waiting for nft: {source}"),
    })?;
    if !output.status.success() || written.is_err() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(NetworkError::Nft {
            message: format!("nft refused the rules: {}", stderr.trim()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nook_api::EgressRule;

    fn subnet() -> Subnet {
        Subnet::parse("10.89.0.0/16").unwrap()
    }

    #[test]
    fn broad_allows_never_open_restricted_blocks() {
        let policy = NetworkPolicy {
            egress: EgressMode::Rules,
            rules: vec![
                EgressRule {
                    action: EgressAction::Allow,
                    to: "10.201.0.0/24".into(),
                    ports: vec![80],
                },
                EgressRule {
                    action: EgressAction::Allow,
                    to: "0.0.0.0/0".into(),
                    ports: vec![],
                },
            ],
            default: None,
        };
        let address = Ipv4Addr::new(10, 89, 0, 5);
        let script = set_policy("nook_t", address, &policy, subnet().gateway(), 3128, false).unwrap();
        assert!(script.contains(
            "add rule inet nook_t sandbox_0a590005 ip daddr 10.201.0.0/24 meta l4proto { tcp, udp } th dport { 80 } accept"
        ));
        assert!(script.contains("ip daddr 0.0.0.0/0 ip daddr != @restricted accept"));
        assert!(script.contains(&format!("add rule inet nook_t sandbox_0a590005 {REFUSE}")));
        assert!(script.contains("add element inet nook_t policies { 10.89.0.5 : jump sandbox_0a590005 }"));
        assert!(!script.contains("redirects"));
    }

    #[test]
    fn the_default_policy_needs_no_chain() {
        let address = Ipv4Addr::new(10, 89, 0, 5);
        assert_eq!(
            set_policy(
                "nook_t",
                address,
                &NetworkPolicy::default(),
                subnet().gateway(),
                3128,
                false
            ),
            None
        );
        let back = set_policy(
            "nook_t",
            address,
            &NetworkPolicy::default(),
            subnet().gateway(),
            3128,
            true,
        )
        .unwrap();
        assert!(back.contains("delete chain inet nook_t sandbox_0a590005"));
    }

    #[test]
    fn domain_rules_send_tcp_to_the_proxy() {
        let policy = NetworkPolicy {
            egress: EgressMode::Rules,
            rules: vec![EgressRule {
                action: EgressAction::Allow,
                to: "*.example.test".into(),
                ports: vec![],
            }],
            default: None,
        };
        let address = Ipv4Addr::new(10, 89, 0, 5);
        let script = set_policy("nook_t", address, &policy, subnet().gateway(), 3128, false).unwrap();
        assert!(script.contains("dnat ip to 10.89.0.1:3128"));
        assert!(script.contains("add element inet nook_t proxied { 10.89.0.5 }"));
    }

    #[test]
    fn the_base_table_names_the_subnet() {
        let table = base_table("nook_t", subnet(), subnet().gateway(), 3128);
        assert!(table.contains("ip saddr 10.89.0.0/16 jump sandbox_egress"));
        assert!(table.contains("169.254.0.0/16"));
    }
}
