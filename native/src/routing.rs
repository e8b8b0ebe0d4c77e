//! Which backend set a call belongs to.
//!
//! A call reaches Service NAMESPACE/NAME when its `:authority` (any port) is `NAME.NAMESPACE`,
//! `NAME.NAMESPACE.svc` or `NAME.NAMESPACE.svc.cluster.local`; failing that, when the gRPC
//! service in its path (`/pkg.Service/Method`) is one the set declares. Routes are keyed by
//! `NAME.NAMESPACE` so that a lookup needs no allocation.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::pool::Backend;
use crate::stats::Stats;
use crate::strategy::Picker;

pub struct Target {
    pub backend: Arc<Backend>,
    pub stats: Arc<Stats>,
    /// "backend HOST:PORT (Service NS/NAME, pod POD)", for error messages.
    pub who: String,
}

pub struct Route {
    /// NAMESPACE/NAME
    pub key: String,
    pub targets: Vec<Target>,
    pub picker: Picker,
}

#[derive(Default)]
pub struct Table {
    routes: HashMap<String, Arc<Route>>,
    grpc_services: HashMap<String, String>,
}

/// `NAME.NAMESPACE` for `NAMESPACE/NAME`.
pub fn host_key(key: &str) -> String {
    match key.split_once('/') {
        Some((ns, name)) => format!("{name}.{ns}"),
        None => key.to_string(),
    }
}

/// The `NAME.NAMESPACE` part of an authority, if it has that form.
fn authority_host(authority: &str) -> Option<Cow<'_, str>> {
    let mut host = authority;
    if host.bytes().filter(|&b| b == b':').count() == 1 {
        host = &host[..host.find(':')?];
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        let lowered = host.to_ascii_lowercase();
        service_host(&lowered).map(|h| Cow::Owned(h.to_string()))
    } else {
        service_host(host).map(Cow::Borrowed) // the usual case: no allocation
    }
}

/// `NAME.NAMESPACE` from a lower-case host: trailing dots and the `.svc[.cluster.local]`
/// suffix dropped.
fn service_host(host: &str) -> Option<&str> {
    let host = host.trim_end_matches('.');
    let host = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    (host.bytes().filter(|&b| b == b'.').count() == 1).then_some(host)
}

/// `'text'` in single quotes, backslashes and quotes escaped.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl Table {
    pub fn insert(&mut self, route: Route) -> Option<Arc<Route>> {
        self.routes.insert(host_key(&route.key), Arc::new(route))
    }

    pub fn remove(&mut self, key: &str) -> Option<Arc<Route>> {
        self.routes.remove(&host_key(key))
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Route>> {
        self.routes.get(&host_key(key))
    }

    /// gRPC service name → NAMESPACE/NAME of the Service that declares it.
    pub fn set_grpc_services(&mut self, table: HashMap<String, String>) {
        self.grpc_services = table
            .into_iter()
            .map(|(name, key)| (name, host_key(&key)))
            .collect();
    }

    /// The route of a call and how it matched ("authority" or "grpc-service"), or why none.
    pub fn route(&self, authority: &str, path: &str) -> Result<(Arc<Route>, &'static str), String> {
        let host = authority_host(authority);
        if let Some(route) = host.as_deref().and_then(|h| self.routes.get(h)) {
            return Ok((Arc::clone(route), "authority"));
        }
        let service = match path.strip_prefix('/') {
            Some(rest) => &rest[..rest.rfind('/').unwrap_or(0)],
            None => "",
        };
        if let Some(route) = self
            .grpc_services
            .get(service)
            .and_then(|k| self.routes.get(k))
        {
            return Ok((Arc::clone(route), "grpc-service"));
        }
        Err(match host {
            Some(h) => {
                let (name, ns) = h.split_once('.').unwrap_or((&h, ""));
                format!(
                    "no backend set for Service {ns}/{name} (authority {}); \
                     is the Service annotated with weighbridge.io/strategy?",
                    quoted(authority)
                )
            }
            None => format!(
                "no route for authority {} and gRPC service {}: use \
                 NAME.NAMESPACE[.svc[.cluster.local]] as the authority, or list the gRPC \
                 service in weighbridge.io/grpc-services",
                quoted(authority),
                quoted(service)
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_forms() {
        for (authority, host) in [
            ("echo.default", Some("echo.default")),
            ("echo.default:8080", Some("echo.default")),
            ("Echo.Default.svc", Some("echo.default")),
            ("echo.default.svc.cluster.local.:443", Some("echo.default")),
            ("localhost:8080", None),
            ("a.b.c", None),
            ("[::1]:80", None),
        ] {
            assert_eq!(authority_host(authority).as_deref(), host, "{authority}");
        }
    }

    #[test]
    fn misses_explain_themselves() {
        let t = Table::default();
        let e = t
            .route("missing.default.svc", "/test.Echo/Unary")
            .err()
            .unwrap();
        assert!(
            e.starts_with(
                "no backend set for Service default/missing (authority 'missing.default.svc')"
            ),
            "{e}"
        );
        let e = t.route("localhost:8080", "/test.Echo/Unary").err().unwrap();
        assert!(
            e.starts_with("no route for authority 'localhost:8080' and gRPC service 'test.Echo'"),
            "{e}"
        );
    }
}
