//! The demo's objects, and real `kubectl` pointed at a [`FakeApiServer`]: shared by
//! `cargo xtask demo [--kube]` (`pxt-demo`) and the test that runs the `--kube` steps.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{Context as _, bail};

use crate::{
    agent::Manifests,
    apiserver::FakeApiServer,
    cluster::{TCP_PORT, UDP_PORT},
};

/// The demo Service's ClusterIP.
pub const VIP: &str = "10.96.0.10";
/// The demo EndpointSlice (of Service `hello` in `default`).
pub const SLICE: &str = "hello-x1";

/// Service `hello`: TCP 80 and UDP 53 to the pods' servers.
pub fn service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: {TCP_PORT}}}\n  - {{name: dns, port: 53, targetPort: {UDP_PORT}, protocol: UDP}}\n"
    )
}

/// Its EndpointSlice, one ready endpoint per address.
pub fn slice_yaml(ips: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {SLICE}\n  namespace: default\n  labels: {{kubernetes.io/service-name: hello}}\naddressType: IPv4\nports:\n- {{name: http, port: {TCP_PORT}}}\n- {{name: dns, port: {UDP_PORT}, protocol: UDP}}\nendpoints:\n"
    );
    for ip in ips {
        s.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: demo-node\n"
        ));
    }
    s
}

/// `kubectl` with a kubeconfig for one server, in a directory that also holds the manifests
/// it is given (removed on drop).
pub struct Kubectl {
    dir: Manifests,
    kubeconfig: PathBuf,
}

impl Kubectl {
    pub fn new(api: &FakeApiServer) -> anyhow::Result<Self> {
        let dir = Manifests::new()?;
        dir.write("kubeconfig", &api.kubeconfig())?;
        let kubeconfig = dir.dir.join("kubeconfig");
        Ok(Kubectl { dir, kubeconfig })
    }

    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// Writes a manifest file next to the kubeconfig; its path.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        self.dir.write(name, text)?;
        Ok(self.dir.dir.join(name))
    }

    /// `kubectl ARGS`, each request bounded (10 s); its output, whatever its exit status.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=10s")
            .args(args)
            .output()
            .context("running kubectl (is it installed? `cargo xtask toolchain` checks)")
    }

    /// `kubectl ARGS`, which must succeed; its standard output.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
