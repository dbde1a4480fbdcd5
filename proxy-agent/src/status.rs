//! `proxy-agent status`: what this kernel offers the datapath ([`crate::features`]), the
//! variants the agent loads on it, and how the packet-path program is attached to interfaces,
//! as the kernel reports them.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    features::{self, Feature, Features, Plan},
    tc::{self, Attachment},
};

#[derive(Debug, Serialize)]
pub struct FeatureView {
    pub name: &'static str,
    pub present: bool,
    /// The first upstream kernel with it.
    pub since: &'static str,
    /// Why the probe could not tell, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct InterfaceView {
    pub name: String,
    #[serde(flatten)]
    pub attachment: Attachment,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub kernel: String,
    pub features: Vec<FeatureView>,
    /// The variants with the packet path attached (`--tc-interface`), and without; an error
    /// names a missing requirement.
    pub with_packet_path: Result<String, String>,
    pub sockets_only: Result<String, String>,
    pub interfaces: Vec<InterfaceView>,
}

fn describe(plan: Result<Plan, features::Missing>) -> Result<String, String> {
    plan.map(|p| {
        format!(
            "reject={:?} getpeername4={} tc_attach={:?}",
            p.reject, p.getpeername, p.tc_attach
        )
    })
    .map_err(|e| e.to_string())
}

/// Probes the kernel and asks it about the interfaces matching `patterns` (all, if none).
pub fn status(patterns: &[String]) -> anyhow::Result<Status> {
    let features = Features::probe();
    let patterns = patterns
        .iter()
        .map(|p| glob::Pattern::new(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut interfaces = Vec::new();
    for (name, index) in tc::interfaces() {
        if !patterns.is_empty() && !patterns.iter().any(|p| p.matches(&name)) {
            continue;
        }
        let attachment = match tc::attachment(&name, index) {
            Ok(a) => a,
            // Gone between listing and asking (pods come and go).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)) => continue,
            Err(e) => return Err(e.into()),
        };
        interfaces.push(InterfaceView { name, attachment });
    }
    Ok(Status {
        kernel: kernel_release(),
        features: Feature::ALL
            .iter()
            .map(|f| FeatureView {
                name: f.name(),
                present: features.has(*f),
                since: f.since(),
                probe_error: features
                    .failed(*f)
                    .map(|e| std::io::Error::from_raw_os_error(e).to_string()),
            })
            .collect(),
        with_packet_path: describe(features::plan(&features, true)),
        sockets_only: describe(features::plan(&features, false)),
        interfaces,
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

pub fn render(s: &Status) -> String {
    let mut out = format!(
        "kernel {}\n\nFEATURE               PRESENT  SINCE\n",
        s.kernel
    );
    for f in &s.features {
        let present = match (&f.present, &f.probe_error) {
            (true, _) => "yes".to_string(),
            (false, None) => "no".to_string(),
            (false, Some(e)) => format!("unknown: {e}"),
        };
        let _ = writeln!(out, "{:<21} {:<8} {}", f.name, present, f.since);
    }
    let line = |r: &Result<String, String>| match r {
        Ok(v) => v.clone(),
        Err(e) => format!("cannot run: {e}"),
    };
    let _ = writeln!(out, "\nwith the packet path: {}", line(&s.with_packet_path));
    let _ = writeln!(out, "sockets only:         {}", line(&s.sockets_only));
    if !s.interfaces.is_empty() {
        let _ = writeln!(out, "\nINTERFACE        PACKET PATH");
        for i in &s.interfaces {
            let mut how = Vec::new();
            if i.attachment.tcx {
                how.push("tcx".to_string());
            }
            for p in &i.attachment.clsact_priorities {
                how.push(format!("clsact (priority {p})"));
            }
            let how = if how.is_empty() {
                "-".to_string()
            } else {
                how.join(", ")
            };
            let _ = writeln!(out, "{:<16} {how}", i.name);
        }
    }
    out
}
