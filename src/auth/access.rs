//! Who may use which route: the api's paths mapped to what they need, and the check
//! of a principal against it. Pure functions over path and method text, so `http/`
//! and the tests share one table.

use super::token::{Principal, Role, Scope};
use crate::config::MetricsAccess;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials (probes, the dashboard's page, login).
    Open,
    /// Any valid credential (metrics, system information, the session).
    Authenticated,
    /// A credential whose scopes include this subsystem.
    Scope(Scope),
    /// The admin role (tokens, backups, configuration).
    Admin,
}

/// Why an authenticated principal was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    #[error("this route needs the {0} role")]
    Role(Role),
    #[error("this token has no {0} scope")]
    Scope(Scope),
    #[error("this token is read-only")]
    ReadOnly,
}

/// Subsystem routes by path prefix (whole segments only).
const SCOPED: &[(&str, Scope)] = &[
    ("/v1/cache", Scope::Cache),
    ("/v1/queues", Scope::Queue),
    ("/v1/jobs", Scope::Queue),
    ("/v1/schedules", Scope::Queue),
    ("/v1/sql", Scope::Sql),
    ("/v1/gateway", Scope::Gateway),
];

const ADMIN_ONLY: &[&str] = &["/v1/admin", "/v1/auth/tokens", "/v1/config"];

const ANY_CREDENTIAL: &[&str] = &["/v1/metrics", "/v1/system", "/v1/auth/session"];

/// POSTs that only read, which a readonly token may therefore make. `/v1/sql/query`
/// runs on read-only reader connections and refuses statements SQLite does not call
/// read-only; `/v1/sql/analyze` does the same and rolls back its index trial.
const READ_ONLY_POSTS: &[&str] = &["/v1/cache/mget", "/v1/sql/query", "/v1/sql/analyze"];

/// What `path` needs. Paths under `/v1` that no rule names are admin-only, so a route
/// added without a rule fails closed.
pub fn route_access(path: &str, metrics: MetricsAccess) -> Access {
    if path == "/metrics" {
        return match metrics {
            MetricsAccess::Open => Access::Open,
            MetricsAccess::Token => Access::Authenticated,
        };
    }
    if !under(path, "/v1") {
        return Access::Open;
    }
    if path == "/v1/auth/login" || path == "/v1/auth/logout" {
        return Access::Open;
    }
    if let Some((_, scope)) = SCOPED.iter().find(|(prefix, _)| under(path, prefix)) {
        return Access::Scope(*scope);
    }
    if ANY_CREDENTIAL.iter().any(|prefix| under(path, prefix)) {
        return Access::Authenticated;
    }
    if ADMIN_ONLY.iter().any(|prefix| under(path, prefix)) {
        return Access::Admin;
    }
    Access::Admin
}

/// Whether `principal` may make this request to a route needing `access`.
pub fn authorize(
    principal: &Principal,
    method: &str,
    path: &str,
    access: Access,
) -> Result<(), Forbidden> {
    match access {
        Access::Open | Access::Authenticated => {}
        Access::Admin => {
            if principal.role != Role::Admin {
                return Err(Forbidden::Role(Role::Admin));
            }
        }
        Access::Scope(scope) => {
            if !principal.has_scope(scope) {
                return Err(Forbidden::Scope(scope));
            }
        }
    }
    if principal.role == Role::Readonly && !is_read(method, path) {
        return Err(Forbidden::ReadOnly);
    }
    Ok(())
}

/// Whether a request only reads.
pub fn is_read(method: &str, path: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS")
        || (method == "POST" && READ_ONLY_POSTS.contains(&path))
}

/// `path` is `prefix` or below it (`/v1/cache/x`, not `/v1/cachex`).
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, scopes: &[Scope]) -> Principal {
        Principal {
            name: "t".into(),
            role,
            scopes: scopes.to_vec(),
            token_hash: None,
        }
    }

    #[test]
    fn routes_map_to_what_they_need() {
        let open = MetricsAccess::Open;
        for (path, access) in [
            ("/", Access::Open),
            ("/healthz", Access::Open),
            ("/app.js", Access::Open),
            ("/metrics", Access::Open),
            ("/v1/auth/login", Access::Open),
            ("/v1/cache/k", Access::Scope(Scope::Cache)),
            ("/v1/cachex", Access::Admin),
            ("/v1/jobs/1/ack", Access::Scope(Scope::Queue)),
            ("/v1/schedules", Access::Scope(Scope::Queue)),
            ("/v1/sql/query", Access::Scope(Scope::Sql)),
            ("/v1/gateway/purge", Access::Scope(Scope::Gateway)),
            ("/v1/admin/backup", Access::Admin),
            ("/v1/auth/tokens/x", Access::Admin),
            ("/v1/config/validate", Access::Admin),
            ("/v1/metrics/history", Access::Authenticated),
            ("/v1/auth/session", Access::Authenticated),
            ("/v1/unknown", Access::Admin),
        ] {
            assert_eq!(route_access(path, open), access, "{path}");
        }
        assert_eq!(
            route_access("/metrics", MetricsAccess::Token),
            Access::Authenticated
        );
    }

    #[test]
    fn roles_and_scopes_decide() {
        let cache = Access::Scope(Scope::Cache);
        let sql = Access::Scope(Scope::Sql);
        let readonly = principal(Role::Readonly, &[]);
        assert_eq!(authorize(&readonly, "GET", "/v1/cache/k", cache), Ok(()));
        assert_eq!(
            authorize(&readonly, "POST", "/v1/cache/mget", cache),
            Ok(())
        );
        assert_eq!(
            authorize(&readonly, "PUT", "/v1/cache/k", cache),
            Err(Forbidden::ReadOnly)
        );
        assert_eq!(
            authorize(&readonly, "POST", "/v1/sql/execute", sql),
            Err(Forbidden::ReadOnly)
        );
        let queue_operator = principal(Role::Operator, &[Scope::Queue]);
        assert_eq!(
            authorize(&queue_operator, "POST", "/v1/sql/query", sql),
            Err(Forbidden::Scope(Scope::Sql))
        );
        assert_eq!(
            authorize(&queue_operator, "POST", "/v1/admin/backup", Access::Admin),
            Err(Forbidden::Role(Role::Admin))
        );
        let admin = principal(Role::Admin, &[]);
        assert_eq!(
            authorize(&admin, "POST", "/v1/admin/backup", Access::Admin),
            Ok(())
        );
        assert_eq!(authorize(&admin, "DELETE", "/v1/cache/k", cache), Ok(()));
        let scoped_admin = principal(Role::Admin, &[Scope::Cache]);
        assert_eq!(
            authorize(&scoped_admin, "POST", "/v1/sql/execute", sql),
            Err(Forbidden::Scope(Scope::Sql))
        );
    }
}
