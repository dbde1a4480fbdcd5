//! kube-proxy's rules for ClusterIP Services, written the way kube-proxy writes them, so the
//! benchmark compares against the real thing: the iptables mode's `iptables-restore` input
//! (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* with `statistic random` probabilities) and the
//! nftables mode's `table ip kube-proxy` (the `service-ips` verdict map, `numgen random`).
//! Chain names use kube-proxy's hashes (sha256, base32). Only what a ClusterIP Service with
//! endpoints needs is generated (no NodePorts, LoadBalancers or affinity).

use std::{fmt::Write as _, net::Ipv4Addr};

use data_encoding::BASE32;
use sha2::{Digest as _, Sha256};

/// One Service port and its endpoints.
#[derive(Clone, Debug)]
pub struct SvcPort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// "tcp" or "udp", as kube-proxy writes it.
    pub proto: &'static str,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl SvcPort {
    /// kube-proxy's ServicePortName.String(): "ns/name:port" (":port" only when named).
    fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

fn hash(s: &str) -> String {
    BASE32.encode(&Sha256::digest(s.as_bytes()))
}

/// iptables mode: `KUBE-SVC-` + portProtoHash.
pub fn svc_chain(s: &SvcPort) -> String {
    format!(
        "KUBE-SVC-{}",
        &hash(&(s.port_name_string() + s.proto))[..16]
    )
}

/// iptables mode: `KUBE-SEP-` + hash of port name, protocol and endpoint.
pub fn sep_chain(s: &SvcPort, ep: (Ipv4Addr, u16)) -> String {
    let e = format!("{}:{}", ep.0, ep.1);
    format!(
        "KUBE-SEP-{}",
        &hash(&(s.port_name_string() + s.proto + &e))[..16]
    )
}

/// The chains and rules of one Service port (nat table), appended to `chains` / `rules`.
fn iptables_service(s: &SvcPort, cluster_cidr: &str, chains: &mut String, rules: &mut String) {
    let svc = svc_chain(s);
    let pn = s.port_name_string();
    let _ = writeln!(chains, ":{svc} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc} -m comment --comment \"{pn} cluster IP\" -m {p} -p {p} -d {vip}/32 --dport {port} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
        p = s.proto,
        vip = s.vip,
        port = s.port
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = sep_chain(s, *ep);
        let comment = format!("-m comment --comment \"{pn} -> {}:{}\"", ep.0, ep.1);
        if i + 1 < n {
            let _ = writeln!(
                rules,
                "-A {svc} {comment} -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / (n - i) as f64
            );
        } else {
            let _ = writeln!(rules, "-A {svc} {comment} -j {sep}");
        }
    }
    for ep in &s.endpoints {
        let sep = sep_chain(s, *ep);
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {pn} -s {}/32 -j KUBE-MARK-MASQ",
            ep.0
        );
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {pn} -m {p} -p {p} -j DNAT --to-destination {}:{}",
            ep.0,
            ep.1,
            p = s.proto
        );
    }
}

fn kube_services_rule(s: &SvcPort) -> String {
    format!(
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {}\n",
        s.port_name_string(),
        s.vip,
        s.port,
        svc_chain(s),
        p = s.proto
    )
}

const NODEPORTS_LAST: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// A full sync: the `iptables-restore` input kube-proxy writes for these Services, with the
/// jumps from the built-in chains it installs beside it (a fresh namespace has none).
pub fn iptables_full(services: &[SvcPort], cluster_cidr: &str) -> String {
    let mut out = String::new();
    out.push_str(
        "*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-NODEPORTS - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
",
    );
    let (mut chains, mut rules) = (String::new(), String::new());
    for s in services {
        rules.push_str(&kube_services_rule(s));
    }
    rules.push_str(NODEPORTS_LAST);
    for s in services {
        iptables_service(s, cluster_cidr, &mut chains, &mut rules);
    }
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// A partial sync after one Service's endpoints changed, as kube-proxy (1.28+) writes it for
/// `iptables-restore --noflush`: KUBE-SERVICES in full, the changed Service's chains, and the
/// removal of endpoint chains that went away.
pub fn iptables_partial(
    services: &[SvcPort],
    changed: &SvcPort,
    old: &SvcPort,
    cluster_cidr: &str,
) -> String {
    let mut chains = String::from(":KUBE-SERVICES - [0:0]\n");
    let mut rules = String::new();
    for s in services {
        rules.push_str(&kube_services_rule(s));
    }
    rules.push_str(NODEPORTS_LAST);
    iptables_service(changed, cluster_cidr, &mut chains, &mut rules);
    for ep in &old.endpoints {
        if !changed.endpoints.contains(ep) {
            let sep = sep_chain(old, *ep);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let _ = writeln!(rules, "-X {sep}");
        }
    }
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// nftables mode: kube-proxy's hashAndTruncate (8 base32 characters, a dash, the name).
fn nft_name(base: &str) -> String {
    let name = format!("{}-{base}", &hash(base)[..8]);
    if name.len() > 256 {
        format!("{}...", &name[..253])
    } else {
        name
    }
}

pub fn nft_service_chain(s: &SvcPort) -> String {
    format!(
        "service-{}",
        nft_name(&format!(
            "{}/{}/{}/{}",
            s.namespace, s.name, s.proto, s.port_name
        ))
    )
}

pub fn nft_endpoint_chain(s: &SvcPort, ep: (Ipv4Addr, u16)) -> String {
    format!(
        "endpoint-{}",
        nft_name(&format!(
            "{}/{}/{}/{}__{}/{}",
            s.namespace, s.name, s.proto, s.port_name, ep.0, ep.1
        ))
    )
}

fn nft_service(s: &SvcPort, cluster_cidr: &str, out: &mut String) {
    let svc = nft_service_chain(s);
    let _ = writeln!(out, "add chain ip kube-proxy {svc}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {svc} ip daddr {} {} dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
        s.vip, s.proto, s.port
    );
    let vmap: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", nft_endpoint_chain(s, *ep)))
        .collect();
    for ep in &s.endpoints {
        let chain = nft_endpoint_chain(s, *ep);
        let _ = writeln!(out, "add chain ip kube-proxy {chain}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} ip saddr {} jump mark-for-masquerade",
            ep.0
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} meta l4proto {} dnat to {}:{}",
            s.proto, ep.0, ep.1
        );
    }
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        vmap.join(", ")
    );
    let _ = writeln!(out, "add element ip kube-proxy cluster-ips {{ {} }}", s.vip);
    let _ = writeln!(
        out,
        "add element ip kube-proxy service-ips {{ {} . {} . {} : goto {svc} }}",
        s.vip, s.proto, s.port
    );
}

/// A full sync: the `nft -f` transaction kube-proxy's nftables mode writes for these Services.
pub fn nft_full(services: &[SvcPort], cluster_cidr: &str, service_cidr: &str) -> String {
    let mut out = String::from(
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }
add chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add chain ip kube-proxy masquerading
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }
add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy service-endpoints-check
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy services
add rule ip kube-proxy filter-prerouting ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"
",
    );
    let _ = writeln!(
        out,
        "add rule ip kube-proxy cluster-ips-check ip daddr {service_cidr} drop comment \"Drop traffic to unallocated ClusterIPs\""
    );
    out.push_str(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    for s in services {
        nft_service(s, cluster_cidr, &mut out);
    }
    out
}

/// A partial sync after one Service's endpoints changed, as the nftables mode writes it: the
/// Service chain flushed and rewritten, new endpoint chains added, gone ones deleted.
pub fn nft_partial(changed: &SvcPort, old: &SvcPort, cluster_cidr: &str) -> String {
    let mut out = String::new();
    // Every chain that is rewritten is flushed first (new ones are created to be flushed).
    let mut rewritten = vec![nft_service_chain(changed)];
    rewritten.extend(
        changed
            .endpoints
            .iter()
            .map(|ep| nft_endpoint_chain(changed, *ep)),
    );
    for chain in &rewritten {
        let _ = writeln!(out, "add chain ip kube-proxy {chain}");
        let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
    }
    nft_service(changed, cluster_cidr, &mut out);
    for ep in &old.endpoints {
        if !changed.endpoints.contains(ep) {
            let _ = writeln!(
                out,
                "delete chain ip kube-proxy {}",
                nft_endpoint_chain(old, *ep)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> SvcPort {
        SvcPort {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port_name: "p80".into(),
            vip: Ipv4Addr::new(172, 30, 0, 41),
            port: 80,
            proto: "tcp",
            endpoints: vec![(Ipv4Addr::new(10, 180, 0, 1), 80)],
        }
    }

    /// Chain names as kube-proxy's own unit tests spell them (iptables/proxier_test.go and
    /// nftables/proxier_test.go, Service ns1/svc1:p80 with endpoint 10.180.0.1:80).
    #[test]
    fn chain_names_match_kube_proxy() {
        let s = web();
        assert_eq!(svc_chain(&s), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(sep_chain(&s, s.endpoints[0]), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        assert_eq!(nft_service_chain(&s), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            nft_endpoint_chain(&s, s.endpoints[0]),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    #[test]
    fn probabilities_split_evenly_and_the_last_endpoint_takes_the_rest() {
        let mut s = web();
        s.endpoints = (1..=3)
            .map(|i| (Ipv4Addr::new(10, 0, 0, i), 8080))
            .collect();
        let text = iptables_full(&[s], "10.0.0.0/8");
        assert!(text.contains("--probability 0.3333333333 "), "{text}");
        assert!(text.contains("--probability 0.5000000000 "), "{text}");
        assert_eq!(text.matches("-m statistic").count(), 2);
        assert!(text.ends_with("COMMIT\n"));
    }
}
