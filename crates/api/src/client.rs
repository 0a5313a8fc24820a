//! Who is asking: the client address and tenant the guard's hot-key rules count.
//!
//! Behind a load balancer or gateway every connection comes from the proxy, so the peer
//! address would put every shopper under one client-IP key, and a tenant header sent by
//! a shopper could spend another merchant's quota. Addresses of the proxies are
//! configured (`trusted_proxies`); only a connection from one of them may name the
//! client (`X-Forwarded-For`, the nearest address that is not itself a trusted proxy)
//! and the tenant (`X-Tenant`). From anyone else both headers are ignored.

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error)]
#[error("trusted_proxies: {0:?} is not an address or a CIDR block (e.g. 10.0.0.0/8)")]
pub struct BadProxy(pub String);

/// Longest `X-Forwarded-For` walked (entries), and longest tenant (bytes) counted.
const FORWARDED_MAX: usize = 16;
const TENANT_MAX: usize = 128;

impl TrustedProxies {
    /// From comma-separated addresses and CIDR blocks; empty trusts nobody.
    pub fn parse(list: &str) -> Result<TrustedProxies, BadProxy> {
        let nets = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| BadProxy(s.to_owned()))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { nets })
    }

    /// Whether `ip` is one of the trusted proxies (whose connections carry many
    /// clients).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the
    /// nearest `X-Forwarded-For` entry that is not one (headers appended by proxies
    /// further out, or by the client itself, are not believed).
    /// Addresses are taken canonical: an IPv4 client of a listener on `[::]` arrives as
    /// `::ffff:a.b.c.d`, and is the IPv4 address both here and to `trusted_proxies`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        // Nearest first: the last header, its last entry; nothing collected.
        let nearest_first = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.rsplit(','));
        for entry in nearest_first.take(FORWARDED_MAX) {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                break;
            };
            let ip = ip.to_canonical();
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }

    /// The tenant a trusted proxy named, if any: the nearest value (the last header's
    /// last comma-separated entry), as for `X-Forwarded-For`. A proxy that appends its
    /// `X-Tenant` to one the client sent leaves the client's first, and the client's
    /// must not choose the tenant.
    pub fn tenant(&self, peer: IpAddr, headers: &HeaderMap) -> Option<HeaderValue> {
        if !self.is_trusted(peer.to_canonical()) {
            return None;
        }
        let last = headers.get_all("x-tenant").iter().next_back()?;
        let nearest = match last.as_bytes().iter().rposition(|&b| b == b',') {
            None => last.clone(),
            Some(comma) => {
                HeaderValue::from_bytes(last.as_bytes()[comma + 1..].trim_ascii()).ok()?
            }
        };
        Some(nearest).filter(|t| !t.is_empty() && t.len() <= TENANT_MAX)
    }
}

/// The key a client's address is counted under by the per-client-IP rules: an IPv4
/// address, or an IPv6 address's /64 network. One subscriber is handed a /64 (or more)
/// and may send from any of its 2^64 addresses: counted one by one, a client could take
/// a fresh allowance with each request, and push everyone else's keys out of the table.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !(u128::MAX >> 64)).into()),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_network_and_a_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_eq!(client_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(client_key(a), client_key(other));
        let v4: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_key(v4), v4);
        // A listener on [::] sees IPv4 clients as mapped addresses: the same client, and
        // a trusted proxy all the same.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
        let proxies = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let h = headers(&[
            ("x-forwarded-for", "::ffff:198.51.100.7"),
            ("x-tenant", "acme"),
        ]);
        assert_eq!(
            proxies.client_ip(mapped, &h),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(proxies.tenant(mapped, &h).unwrap(), "acme");
    }

    #[test]
    fn an_untrusted_peer_names_nobody() {
        let proxies = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-tenant", "acme")]);
        assert_eq!(proxies.client_ip(peer, &h), peer);
        assert_eq!(proxies.tenant(peer, &h), None);
        // Nobody trusted: the same.
        let none = TrustedProxies::default();
        assert_eq!(
            none.client_ip("10.0.0.1".parse().unwrap(), &h),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_nearest_untrusted_address_and_the_tenant() {
        let proxies = TrustedProxies::parse("10.0.0.0/8, 192.0.2.1").unwrap();
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        // The client forged the first entry; the edge proxy (192.0.2.1) appended the
        // address it saw; the inner proxy (10.9.9.9) appended the edge's.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
            ("x-forwarded-for", "192.0.2.1, 10.9.9.9"),
            ("x-tenant", "acme"),
        ]);
        assert_eq!(
            proxies.client_ip(peer, &h),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            proxies.tenant(peer, &h),
            Some(HeaderValue::from_static("acme"))
        );
        // A proxy that appends its tenant to the one the client sent: its own counts,
        // as a second header or after a comma.
        for h in [
            headers(&[("x-tenant", "evil"), ("x-tenant", "acme")]),
            headers(&[("x-tenant", "evil, acme")]),
            headers(&[("x-tenant", "x".repeat(200).leak()), ("x-tenant", "acme")]),
        ] {
            assert_eq!(
                proxies.tenant(peer, &h),
                Some(HeaderValue::from_static("acme")),
                "{h:?}"
            );
        }
        // An empty or overlong nearest value names none.
        let h = headers(&[("x-tenant", "acme"), ("x-tenant", "")]);
        assert_eq!(proxies.tenant(peer, &h), None);
        // No header: the proxy itself.
        assert_eq!(proxies.client_ip(peer, &HeaderMap::new()), peer);
        // Garbage stops the walk at the last good address.
        let h = headers(&[("x-forwarded-for", "nonsense, 198.51.100.8")]);
        assert_eq!(
            proxies.client_ip(peer, &h),
            "198.51.100.8".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn bad_entries_are_named() {
        let error = TrustedProxies::parse("10.0.0.0/8, 10.0.0.0/99").unwrap_err();
        assert_eq!(error.0, "10.0.0.0/99");
        assert!(TrustedProxies::parse("").unwrap().nets.is_empty());
        assert!(TrustedProxies::parse("::1, fd00::/8").is_ok());
    }
}
