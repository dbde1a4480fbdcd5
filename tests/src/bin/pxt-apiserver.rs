//! Runs the fake API server with a few objects, for trying it with kubectl by hand:
//! `pxt-apiserver` prints its URL; `kubectl --server URL get svc,endpointslices -A`.
use proxy_tests::apiserver::FakeApiServer;
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    api.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}));
    api.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": true}}]}));
    println!("{}", api.url());
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    std::thread::sleep(std::time::Duration::from_secs(secs));
    Ok(())
}
