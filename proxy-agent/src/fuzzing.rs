//! The properties `cargo xtask fuzz` checks (its targets in `proxy-agent/fuzz/` only call these,
//! so the seeds also run as unit tests). Each panics when its property does not hold.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    model::{self, Changes, Frontend, FrontendSpec, Index, Model, ObjectSet, Objects, Problem},
    source::manifests::parse_text,
};

const NODE: &str = "node-a";

/// Any bytes as one manifest file (the first byte picks `.yaml` or `.json`): parsing and the
/// model never panic, every problem names its file and field, and nothing a pod cannot be
/// reached at is programmed as a backend.
pub fn manifest(data: &[u8]) {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let name = if pick % 2 == 0 { "f.yaml" } else { "f.json" };
    let (set, problems) = parse_text(name, &String::from_utf8_lossy(text));
    let mut objects = Objects::default();
    objects.extend_from(&Arc::from(name), &set);
    let desired = model::build(&objects, NODE);
    for p in problems.iter().chain(&desired.problems) {
        check_problem(p, &[name]);
    }
    for (frontend, spec) in &desired.frontends {
        check_frontend(frontend, spec);
    }
}

/// Any bytes as a sequence of file writes and removals (steps split at 0xff; a step's first
/// byte picks one of four files, its rest is the file's YAML, empty: removed): after every step
/// the incremental model, told only what the index says changed, agrees with a fresh build.
pub fn model(data: &[u8]) {
    const NAMES: [&str; 4] = ["a.yaml", "b.yaml", "c.yaml", "d.yaml"];
    let mut files: BTreeMap<&str, ObjectSet> = BTreeMap::new();
    let mut index = Index::default();
    let mut model = Model::default();
    let mut view: BTreeMap<Frontend, FrontendSpec> = BTreeMap::new();
    for (step, chunk) in data.split(|b| *b == 0xff).take(64).enumerate() {
        let Some((&pick, text)) = chunk.split_first() else {
            continue;
        };
        let name = NAMES[usize::from(pick) % NAMES.len()];
        let origin: Arc<str> = Arc::from(name);
        if let Some(old) = files.remove(name) {
            index.remove(&origin, &old);
        }
        if !text.is_empty() {
            let (set, _) = parse_text(name, &String::from_utf8_lossy(text));
            index.insert(&origin, &set);
            files.insert(name, set);
        }
        let mut objects = Objects::default();
        for (f, set) in &files {
            objects.extend_from(&Arc::from(*f), set);
        }
        let want = model::build(&objects, NODE);
        let touched = index.take_touched();
        let partial = model.build(&index, touched.as_ref().into(), NODE, false);
        let changed = partial.changed.expect("a partial pass names what changed");
        view.retain(|_, spec| !changed.contains(&spec.service));
        view.extend(partial.desired.frontends);
        assert_eq!(view, want.frontends, "step {step}: frontends");
        assert_eq!(partial.desired.problems, want.problems, "step {step}");
        assert_eq!(partial.desired.held_vips, want.held_vips, "step {step}");
        assert_eq!(
            partial.desired.held_services, want.held_services,
            "step {step}"
        );
        for p in &want.problems {
            check_problem(p, &NAMES);
        }
        for (frontend, spec) in &want.frontends {
            check_frontend(frontend, spec);
        }
    }
    let full = model.build(&index, Changes::All, NODE, true).desired;
    let mut objects = Objects::default();
    for (f, set) in &files {
        objects.extend_from(&Arc::from(*f), set);
    }
    assert_eq!(full, model::build(&objects, NODE), "a full pass at the end");
}

fn check_problem(p: &Problem, origins: &[&str]) {
    assert!(origins.contains(&&*p.origin), "{p}: not from the input");
    assert!(!p.field.is_empty(), "{p}: names no field");
    assert!(!p.detail.is_empty(), "{p}: says nothing");
}

fn check_frontend(frontend: &Frontend, spec: &FrontendSpec) {
    for b in &spec.backends {
        let ip = b.ip;
        assert!(
            !(ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_multicast()
                || ip == frontend.vip
                || b.port == 0),
            "{frontend}: backend {ip}:{} programmed",
            b.port
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    /// The committed seeds pass (so a property broken by a change fails `cargo test`, not
    /// only a fuzz run).
    #[test]
    fn the_seed_corpus_holds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut seen = 0;
        for (target, check) in [
            ("manifest", super::manifest as fn(&[u8])),
            ("model", super::model),
        ] {
            for entry in fs::read_dir(root.join(target)).expect("seeds are committed") {
                check(&fs::read(entry.unwrap().path()).unwrap());
                seen += 1;
            }
        }
        assert!(seen >= 6, "{seen} seeds");
    }
}
