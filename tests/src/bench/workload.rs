//! The Services a benchmark programs: N ClusterIP Services with M endpoints each, the last one
//! (the target) backed by the real pods. Written as manifests for the agent and as
//! [`SvcPort`]s for the kube-proxy rule generators, from one description.

use std::{fmt::Write as _, net::Ipv4Addr};

use super::kube_proxy::SvcPort;

pub const NAMESPACE: &str = "bench";
/// The ClusterIPs are 10.96.0.10 and up.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Pods (the routed test cluster's, and the made-up endpoints of the other Services).
pub const CLUSTER_CIDR: &str = "10.192.0.0/10";
pub const TCP_PORT: u16 = 80;
pub const TCP_TARGET_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 53;
pub const UDP_TARGET_PORT: u16 = 5353;

#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub vip: Ipv4Addr,
    pub endpoints: Vec<Ipv4Addr>,
    /// Also a UDP port (the target only).
    pub udp: bool,
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32)
}

/// A made-up pod IP, unique per (Service, endpoint), in 10.224.0.0/11.
pub fn fake_pod(i: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 224, 0, 0)) + (i * 64 + k) as u32 + 1)
}

/// `n` Services with `m` endpoints; the last has `target` as its endpoints (if given).
pub fn services(n: usize, m: usize, target: Option<&[Ipv4Addr]>) -> Vec<Svc> {
    (0..n)
        .map(|i| {
            let last = i + 1 == n;
            Svc {
                name: format!("svc-{i}"),
                vip: vip(i),
                endpoints: match (last, target) {
                    (true, Some(t)) => t.to_vec(),
                    _ => (0..m).map(|k| fake_pod(i, k)).collect(),
                },
                udp: last && target.is_some(),
            }
        })
        .collect()
}

impl Svc {
    pub fn ports(&self) -> Vec<SvcPort> {
        let port = |port_name: &str, port, target, proto| SvcPort {
            namespace: NAMESPACE.into(),
            name: self.name.clone(),
            port_name: port_name.into(),
            vip: self.vip,
            port,
            proto,
            endpoints: self.endpoints.iter().map(|ip| (*ip, target)).collect(),
        };
        let mut out = vec![port("http", TCP_PORT, TCP_TARGET_PORT, "tcp")];
        if self.udp {
            out.push(port("dns", UDP_PORT, UDP_TARGET_PORT, "udp"));
        }
        out
    }

    /// The Service and its EndpointSlice, as a manifest file (YAML, two documents).
    pub fn manifest(&self) -> String {
        let mut ports = format!(
            "  - {{name: http, port: {TCP_PORT}, targetPort: {TCP_TARGET_PORT}, protocol: TCP}}\n"
        );
        let mut slice_ports = format!("- {{name: http, port: {TCP_TARGET_PORT}, protocol: TCP}}\n");
        if self.udp {
            let _ = writeln!(
                ports,
                "  - {{name: dns, port: {UDP_PORT}, targetPort: {UDP_TARGET_PORT}, protocol: UDP}}"
            );
            let _ = writeln!(
                slice_ports,
                "- {{name: dns, port: {UDP_TARGET_PORT}, protocol: UDP}}"
            );
        }
        let mut eps = String::new();
        for ip in &self.endpoints {
            let _ = writeln!(
                eps,
                "- {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}"
            );
        }
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  clusterIP: {vip}
  ports:
{ports}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abcde
  namespace: {NAMESPACE}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
{slice_ports}endpoints:
{eps}",
            name = self.name,
            vip = self.vip,
        )
    }

    pub fn file_name(&self) -> String {
        format!("{}.yaml", self.name)
    }
}

pub fn ports(svcs: &[Svc]) -> Vec<SvcPort> {
    svcs.iter().flat_map(Svc::ports).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifests the benchmark writes are what the agent's model programs.
    #[test]
    fn manifests_parse_into_the_intended_frontends() {
        let pods = [Ipv4Addr::new(10, 201, 0, 10), Ipv4Addr::new(10, 201, 0, 11)];
        let svcs = services(3, 4, Some(&pods));
        let dir = std::env::temp_dir().join(crate::unique("wl"));
        std::fs::create_dir_all(&dir).unwrap();
        for s in &svcs {
            std::fs::write(dir.join(s.file_name()), s.manifest()).unwrap();
        }
        let mut m = proxy_agent::source::manifests::ManifestDir::new(&dir).unwrap();
        m.rescan().unwrap();
        let desired = proxy_agent::model::build(&m.objects(), "node-a");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(desired.problems.is_empty(), "{:?}", desired.problems);
        // 2 Services with one TCP port, the target with TCP and UDP.
        assert_eq!(desired.frontends.len(), 4);
        let target = desired
            .frontends
            .iter()
            .find(|(f, _)| f.vip == svcs[2].vip && f.port == UDP_PORT)
            .expect("the target's UDP port");
        assert_eq!(target.1.backends.len(), 2);
        assert!(
            desired
                .frontends
                .values()
                .filter(|s| &*s.service.name == "svc-0")
                .all(|s| s.backends.len() == 4)
        );
        assert_eq!(ports(&svcs).len(), 4);
    }
}
