//! Who is calling and what they may do: the caller of each API request, the permission each route needs, and the
//! capability tokens that grant chosen verbs on one sandbox.
//!
//! The authentication layers (the native bearer check, E2B's key check) work out the [`Caller`], check that the
//! matched route is within its grant ([`permits`]), and run the rest of the request inside [`Caller::scope`]. The
//! control plane's lookups read the caller from there ([`Caller::current`]): a sandbox of another tenant is not found
//! (by id or by name, with the same answer as one that does not exist), lists hold the caller's tenant only, and
//! new sandboxes are the caller's tenant's. Work the server does on its own (deadlines, lifecycle, reconciling) runs
//! outside any caller and sees every sandbox; names then resolve in the `default` tenant.
//!
//! A capability token is `nkc_` + the base64url of its claims (tenant, sandbox id, verbs, expiry) + `.` + an
//! HMAC-SHA256 of them under the server's signing secret: nothing is stored, and it cannot be widened or extended.

use std::future::Future;

use axum::http::{Method, StatusCode};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use nook_api::tenancy::{Scope, Verb, DEFAULT_TENANT};
use serde::{Deserialize, Serialize};

use crate::error::ApiFailure;

tokio::task_local! {
    static CALLER: Caller;
}

/// The prefix of capability tokens.
pub const TOKEN_PREFIX: &str = "nkc_";

/// Who is calling.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// The tenant whose sandboxes it may see.
    pub tenant: String,
    /// What it may do.
    pub grant: Grant,
}

/// What a caller may do.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    /// An API key with a scope.
    Key {
        /// The key's id.
        id: String,
        /// Its scope.
        scope: Scope,
    },
    /// A capability token: these verbs on this sandbox.
    Sandbox {
        /// The sandbox's id.
        id: String,
        /// The verbs.
        verbs: Vec<Verb>,
    },
}

impl Caller {
    /// The caller of the request being served, if any (none: the server's own work).
    pub fn current() -> Option<Caller> {
        CALLER.try_with(Clone::clone).ok()
    }

    /// Runs `work` as this caller.
    pub async fn scope<F: Future>(self, work: F) -> F::Output {
        CALLER.scope(self, work).await
    }

    /// Whether this is the operator: an admin key of the `default` tenant, which manages tenants and every key.
    pub fn is_operator(&self) -> bool {
        self.tenant == DEFAULT_TENANT
            && matches!(
                self.grant,
                Grant::Key {
                    scope: Scope::Admin,
                    ..
                }
            )
    }

    /// Whether this caller may see `sandbox` (its tenant's; a capability token's own sandbox only).
    pub fn sees(&self, tenant: &str, sandbox_id: &str) -> bool {
        match &self.grant {
            Grant::Key { .. } => self.tenant == tenant,
            Grant::Sandbox { id, .. } => self.tenant == tenant && id == sandbox_id,
        }
    }
}

/// The tenant of the current caller, or `default` for the server's own work.
pub fn current_tenant() -> String {
    Caller::current().map_or_else(|| DEFAULT_TENANT.to_string(), |caller| caller.tenant)
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// The least key scope.
    pub scope: Scope,
    /// Only the operator.
    pub operator: bool,
    /// The verb a capability token needs; none: no token may call it.
    pub verb: Option<Verb>,
    /// It changes (or reads the contents of) the shared image catalogue: keys of the default tenant only.
    pub catalogue: bool,
}

/// What a request to `route` (the matched template) with `method` needs.
pub fn need(method: &Method, route: &str) -> Need {
    let looks = *method == Method::GET || *method == Method::HEAD || route.ends_with("/files/search");
    // GETs that act or hand out access: a terminal writes to its process; a port's token opens the port.
    let acts = route.ends_with("/terminal") || route.starts_with("/v1/sandboxes/{sandbox}/ports/");
    let scope = if looks && !acts { Scope::Read } else { Scope::Write };
    if route.starts_with("/v1/tenants") || route == "/metrics" {
        return Need {
            scope: Scope::Admin,
            operator: true,
            verb: None,
            catalogue: false,
        };
    }
    if route.starts_with("/v1/keys") || route.starts_with("/v1/audit") {
        return Need {
            scope: Scope::Admin,
            operator: false,
            verb: None,
            catalogue: false,
        };
    }
    // What still acts on the whole image store: pruning, builds (and their logs), E2B's templates and snapshots.
    // Tenants' own images are judged per image (`images`).
    let catalogue = route == "/v1/images/prune"
        || route.starts_with("/v1/builds")
        || route.starts_with("/templates")
        || route.starts_with("/v2/templates")
        || route.starts_with("/v3/templates")
        || route.starts_with("/snapshots")
        || route == "/sandboxes/{id}/snapshots";
    let verb = route.strip_prefix("/v1/sandboxes/{sandbox}").and_then(|rest| {
        let first = rest.trim_start_matches('/').split('/').next().unwrap_or("");
        match first {
            "" if looks => Some(Verb::Read),
            "stats" | "events" => Some(Verb::Read),
            "exec" | "processes" => Some(Verb::Exec),
            "files" if looks => Some(Verb::FilesRead),
            "files" => Some(Verb::FilesWrite),
            // Tokens are made by keys only: a token cannot mint a wider one.
            "tokens" => None,
            _ => Some(Verb::Manage),
        }
    });
    Need {
        scope,
        operator: false,
        verb,
        catalogue,
    }
}

/// Whether `caller` may make a request that needs `need`: `Ok`, or the refusal (403) saying what is missing.
pub fn permits(caller: &Caller, need: Need, route: &str) -> Result<(), ApiFailure> {
    let refuse = |message: String| Err(ApiFailure::new(StatusCode::FORBIDDEN, "forbidden", message));
    match &caller.grant {
        Grant::Key { scope, .. } => {
            if need.operator && !caller.is_operator() {
                return refuse(format!(
                    "{route} is for the operator (an admin key of the {DEFAULT_TENANT} tenant)"
                ));
            }
            if need.catalogue && caller.tenant != DEFAULT_TENANT {
                return refuse(format!(
                    "{route} acts on the whole image store (or on E2B templates), which the {DEFAULT_TENANT} \
                     tenant keeps; other tenants import, pull, tag and snapshot images of their own"
                ));
            }
            if *scope < need.scope {
                return refuse(format!(
                    "this key's scope is {}; {route} needs {}",
                    scope.as_str(),
                    need.scope.as_str()
                ));
            }
            Ok(())
        }
        Grant::Sandbox { verbs, .. } => match need.verb {
            Some(verb) if verbs.contains(&verb) => Ok(()),
            Some(verb) => refuse(format!(
                "this capability token does not grant {} (it grants {}), which {route} needs",
                verb.as_str(),
                verbs.iter().map(|verb| verb.as_str()).collect::<Vec<_>>().join(", ")
            )),
            None => refuse(format!("a capability token cannot call {route}: use an API key")),
        },
    }
}

/// What a capability token says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Claims {
    /// Tenant.
    t: String,
    /// Sandbox id.
    s: String,
    /// Verbs.
    v: Vec<Verb>,
    /// Expiry, Unix seconds.
    e: i64,
}

/// Makes and checks capability tokens.
pub struct Tokens {
    secret: [u8; 32],
}

impl Tokens {
    /// Tokens signed with `secret`.
    pub fn new(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    fn sign(&self, claims: &[u8]) -> String {
        crate::ids::signature(&self.secret, &[b"capability-token", claims])
    }

    /// A token for `verbs` on a sandbox until `expires_at`.
    pub fn issue(&self, tenant: &str, sandbox_id: &str, verbs: &[Verb], expires_at: DateTime<Utc>) -> String {
        let claims = Claims {
            t: tenant.to_string(),
            s: sandbox_id.to_string(),
            v: verbs.to_vec(),
            e: expires_at.timestamp(),
        };
        let claims = serde_json::to_vec(&claims).expect("claims serialize");
        let signature = self.sign(&claims);
        format!(
            "{TOKEN_PREFIX}{}.{signature}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims)
        )
    }

    /// The caller a token stands for, if it is genuine and has not expired.
    pub fn verify(&self, token: &str) -> Result<Caller, &'static str> {
        let body = token.strip_prefix(TOKEN_PREFIX).ok_or("not a capability token")?;
        let (claims, signature) = body.split_once('.').ok_or("the capability token is malformed")?;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .map_err(|_| "the capability token is malformed")?;
        let expected = self.sign(&claims);
        if !crate::ids::same_secret(&expected, signature) {
            return Err("the capability token's signature does not match");
        }
        let claims: Claims = serde_json::from_slice(&claims).map_err(|_| "the capability token is malformed")?;
        if Utc::now().timestamp() >= claims.e {
            return Err("the capability token has expired");
        }
        Ok(Caller {
            tenant: claims.t,
            grant: Grant::Sandbox {
                id: claims.s,
                verbs: claims.v,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, scope: Scope) -> Caller {
        Caller {
            tenant: tenant.into(),
            grant: Grant::Key {
                id: "key-1".into(),
                scope,
            },
        }
    }

    #[test]
    fn routes_need_scopes_and_verbs() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(need(&get, "/v1/sandboxes/{sandbox}").verb, Some(Verb::Read));
        assert_eq!(
            need(&Method::DELETE, "/v1/sandboxes/{sandbox}").verb,
            Some(Verb::Manage)
        );
        assert_eq!(need(&post, "/v1/sandboxes/{sandbox}/exec").verb, Some(Verb::Exec));
        assert_eq!(
            need(&get, "/v1/sandboxes/{sandbox}/processes/{pid}/terminal").verb,
            Some(Verb::Exec)
        );
        assert_eq!(need(&get, "/v1/sandboxes/{sandbox}/files").verb, Some(Verb::FilesRead));
        let search = need(&post, "/v1/sandboxes/{sandbox}/files/search");
        assert_eq!((search.scope, search.verb), (Scope::Read, Some(Verb::FilesRead)));
        assert_eq!(
            need(&Method::PUT, "/v1/sandboxes/{sandbox}/files").verb,
            Some(Verb::FilesWrite)
        );
        assert_eq!(need(&post, "/v1/sandboxes/{sandbox}/stop").verb, Some(Verb::Manage));
        assert_eq!(need(&post, "/v1/sandboxes/{sandbox}/tokens").verb, None);
        assert_eq!(need(&post, "/v1/sandboxes").verb, None);
        assert!(need(&get, "/v1/tenants").operator);
        assert_eq!(
            need(&get, "/v1/sandboxes/{sandbox}/processes/{pid}/terminal").scope,
            Scope::Write
        );
        assert_eq!(need(&get, "/v1/sandboxes/{sandbox}/ports/{port}").scope, Scope::Write);
        assert_eq!(
            need(&get, "/v1/sandboxes/{sandbox}/processes/{pid}/output").scope,
            Scope::Read
        );
        assert!(need(&post, "/v1/images/prune").catalogue && !need(&post, "/v1/images/pull").catalogue);
        assert!(
            need(&get, "/v1/builds/{build}").catalogue && !need(&post, "/v1/sandboxes/{sandbox}/snapshot").catalogue
        );
        let tenant_writer = key("acme", Scope::Write);
        let route = "/v1/images/prune";
        assert!(permits(&tenant_writer, need(&post, route), route)
            .unwrap_err()
            .message
            .contains("whole image store"));
        assert!(permits(&key(DEFAULT_TENANT, Scope::Write), need(&post, route), route).is_ok());
        assert_eq!(need(&get, "/v1/keys").scope, Scope::Admin);

        let reader = key("acme", Scope::Read);
        assert!(permits(&reader, need(&get, "/v1/sandboxes"), "/v1/sandboxes").is_ok());
        let refused = permits(&reader, need(&post, "/v1/sandboxes"), "/v1/sandboxes").unwrap_err();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(refused.message.contains("scope is read"), "{}", refused.message);
        assert!(permits(&key("acme", Scope::Admin), need(&get, "/v1/tenants"), "/v1/tenants").is_err());
        assert!(permits(
            &key(DEFAULT_TENANT, Scope::Admin),
            need(&get, "/v1/tenants"),
            "/v1/tenants"
        )
        .is_ok());
        assert!(permits(&key(DEFAULT_TENANT, Scope::Write), need(&get, "/v1/keys"), "/v1/keys").is_err());
    }

    #[test]
    fn tokens_carry_their_grant_and_cannot_be_altered() {
        let tokens = Tokens::new([7; 32]);
        let later = Utc::now() + chrono::Duration::hours(1);
        let token = tokens.issue("acme", "sb-1", &[Verb::FilesRead], later);
        let caller = tokens.verify(&token).unwrap();
        assert_eq!(caller.tenant, "acme");
        assert!(caller.sees("acme", "sb-1") && !caller.sees("acme", "sb-2") && !caller.sees("other", "sb-1"));
        let route = "/v1/sandboxes/{sandbox}/exec";
        assert!(permits(&caller, need(&Method::POST, route), route)
            .unwrap_err()
            .message
            .contains("does not grant exec"));
        let route = "/v1/sandboxes/{sandbox}/files";
        assert!(permits(&caller, need(&Method::GET, route), route).is_ok());

        // Claims from another token with this one's signature, a token of another secret, an expired one.
        let wider = tokens.issue("acme", "sb-1", &Verb::ALL, later);
        let (wider_claims, _) = wider.split_once('.').unwrap();
        let (_, signature) = token.split_once('.').unwrap();
        assert!(tokens.verify(&format!("{wider_claims}.{signature}")).is_err());
        assert!(Tokens::new([8; 32]).verify(&token).is_err());
        let expired = tokens.issue("acme", "sb-1", &[Verb::Read], Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(tokens.verify(&expired).unwrap_err(), "the capability token has expired");
    }
}
