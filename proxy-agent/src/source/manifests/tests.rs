use std::{thread::sleep, time::Duration};

use super::{watch::*, *};
use crate::model::ProblemReason;

const SVC: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.1.0.1]
";

fn write(dir: &Path, name: &str, text: &str) {
    // Distinct mtimes/sizes are what rescan looks at; make sure a rewrite is seen.
    sleep(Duration::from_millis(10));
    fs::write(dir.join(name), text).unwrap();
}

fn counts(m: &ManifestDir) -> (usize, usize, usize) {
    let o = m.objects();
    (o.services.len(), o.slices.len(), o.nodes.len())
}

#[test]
fn multi_document_files_lists_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "all.yaml", &format!("{SVC}---\n{SLICE}---\n"));
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ignored"}}]});
    write(tmp.path(), "nodes.json", &list.to_string());
    write(tmp.path(), ".hidden.yaml", "not: [valid");
    write(tmp.path(), "notes.txt", "not a manifest");
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let r = m.rescan().unwrap();
    assert!(r.changed);
    assert!(r.new_problems.is_empty(), "{:?}", r.new_problems);
    assert_eq!(counts(&m), (1, 1, 1));
    assert!(
        !m.rescan().unwrap().changed,
        "nothing changed, nothing reported"
    );
}

/// A file over the size limit is refused with a reason, and keeps its last good objects.
#[test]
fn a_file_over_the_size_limit_is_refused_and_keeps_its_objects() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "a.yaml", SVC);
    let mut m = ManifestDir::new(tmp.path())
        .unwrap()
        .with_max_file_bytes(4096);
    m.rescan().unwrap();
    assert_eq!(counts(&m), (1, 0, 0));
    write(
        tmp.path(),
        "a.yaml",
        &format!("{SVC}# {}\n", "x".repeat(5000)),
    );
    let r = m.rescan().unwrap();
    assert_eq!(r.new_problems.len(), 1, "{:?}", r.new_problems);
    assert_eq!(r.new_problems[0].reason, ProblemReason::Parse);
    assert!(r.new_problems[0].detail.contains("larger than 4096 bytes"));
    assert_eq!(counts(&m), (1, 0, 0), "the last good objects stay");
}

/// A byte order mark (as Windows editors write UTF-8) is not a parse error, in YAML or JSON.
#[test]
fn a_byte_order_mark_is_read_past() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "svc.yaml", &format!("\u{feff}{SVC}"));
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a"}});
    write(tmp.path(), "node.json", &format!("\u{feff}{node}"));
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let r = m.rescan().unwrap();
    assert!(r.new_problems.is_empty(), "{:?}", r.new_problems);
    assert_eq!(counts(&m), (1, 0, 1));
}

#[test]
fn a_file_that_does_not_parse_keeps_its_last_good_objects() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "web.yaml", SVC);
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    m.rescan().unwrap();
    write(
        tmp.path(),
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web\n",
    );
    let r = m.rescan().unwrap();
    assert_eq!(r.new_problems.len(), 1);
    let p = &r.new_problems[0];
    assert_eq!(p.reason, ProblemReason::Parse);
    assert!(p.origin.ends_with("web.yaml"), "{p}");
    assert!(p.field.starts_with("line "), "{p}");
    assert_eq!(counts(&m), (1, 0, 0), "the last good Service is kept");
    assert_eq!(m.problems().count(), 1);

    write(
        tmp.path(),
        "web.yaml",
        &SVC.replace("10.96.0.10", "10.96.0.20"),
    );
    let r = m.rescan().unwrap();
    assert!(r.new_problems.is_empty());
    assert_eq!(m.problems().count(), 0);
    let ip = m.objects().services[0]
        .object
        .spec
        .as_ref()
        .unwrap()
        .cluster_ip
        .clone();
    assert_eq!(ip.as_deref(), Some("10.96.0.20"));

    // A broken file that is removed takes its problems along.
    write(tmp.path(), "web.yaml", "kind: [");
    m.rescan().unwrap();
    assert_eq!(m.problems().count(), 1);
    fs::remove_file(tmp.path().join("web.yaml")).unwrap();
    m.rescan().unwrap();
    assert_eq!((m.problems().count(), counts(&m)), (0, (0, 0, 0)));
}

#[test]
fn a_field_of_the_wrong_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "web.yaml",
        &SVC.replace("port: 80,", "port: eighty,"),
    );
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let r = m.rescan().unwrap();
    assert_eq!(r.new_problems.len(), 1);
    let p = &r.new_problems[0];
    assert_eq!(
        (p.kind, p.name.as_str(), p.field.as_str()),
        ("Service", "web", "spec.ports[0].port")
    );
    assert_eq!(counts(&m), (0, 0, 0));

    // Slices are kept in a smaller form, read through the EndpointSlice type: its field
    // paths still name the culprit.
    write(
        tmp.path(),
        "web.yaml",
        &SLICE.replace(
            "- addresses: [10.1.0.1]",
            "- addresses: [10.1.0.1]\n  conditions: {ready: maybe}",
        ),
    );
    let r = m.rescan().unwrap();
    let p = &r.new_problems[0];
    assert_eq!(
        (p.kind, p.name.as_str(), p.field.as_str()),
        ("EndpointSlice", "web-1", "endpoints[0].conditions.ready")
    );
}

/// The ClusterIP of Service `name`, and the names of the slices.
fn ips_and_slices(m: &ManifestDir) -> (Vec<String>, Vec<String>) {
    let o = m.objects();
    let ips = o
        .services
        .iter()
        .map(|s| {
            let name = s.object.metadata.name.clone().unwrap_or_default();
            let ip = s.object.spec.as_ref().unwrap().cluster_ip.clone();
            format!("{name}={}", ip.unwrap_or_default())
        })
        .collect();
    let slices = o
        .slices
        .iter()
        .map(|s| s.object.name.clone().unwrap_or_default())
        .collect();
    (ips, slices)
}

#[test]
fn each_document_stands_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let other = SVC
        .replace("name: web", "name: other")
        .replace("10.96.0.10", "10.96.0.11");
    write(
        tmp.path(),
        "all.yaml",
        &format!("{SVC}---\n{SLICE}---\n{other}"),
    );
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    m.rescan().unwrap();
    assert_eq!(counts(&m), (2, 1, 0));

    // A broken slice beside a changed Service, and a valid Service dropped from the file: the
    // change and the removal are applied, the slice keeps its last good version.
    let broken_slice = SLICE.replace(
        "- addresses: [10.1.0.1]",
        "- addresses: [10.1.0.1]\n  conditions: {ready: maybe}",
    );
    write(
        tmp.path(),
        "all.yaml",
        &format!(
            "{}---\n{broken_slice}",
            SVC.replace("10.96.0.10", "10.96.0.20")
        ),
    );
    let r = m.rescan().unwrap();
    let named: Vec<_> = r
        .new_problems
        .iter()
        .map(|p| (p.kind, p.name.as_str(), p.field.as_str()))
        .collect();
    assert_eq!(
        named,
        [("EndpointSlice", "web-1", "endpoints[0].conditions.ready")]
    );
    assert_eq!(
        ips_and_slices(&m),
        (vec!["web=10.96.0.20".into()], vec!["web-1".into()])
    );
    assert_eq!(m.problems().count(), 1);

    // A document that names no object: what the file still declares is applied, and nothing
    // it held before goes away.
    write(
        tmp.path(),
        "all.yaml",
        &format!(
            "{}---\nmetadata: {{name: x}}\n",
            SVC.replace("10.96.0.10", "10.96.0.30")
        ),
    );
    let r = m.rescan().unwrap();
    assert_eq!(r.new_problems.len(), 1, "{:?}", r.new_problems);
    assert_eq!(r.new_problems[0].reason, ProblemReason::MissingField);
    assert_eq!(
        ips_and_slices(&m),
        (vec!["web=10.96.0.30".into()], vec!["web-1".into()])
    );

    // Fixed: exactly what the file says.
    write(tmp.path(), "all.yaml", SVC);
    let r = m.rescan().unwrap();
    assert!(r.new_problems.is_empty());
    assert_eq!(m.problems().count(), 0);
    assert_eq!(ips_and_slices(&m), (vec!["web=10.96.0.10".into()], vec![]));
}

#[test]
fn a_service_port_without_its_port_is_a_missing_field() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "web.yaml", &SVC.replace("port: 80, ", ""));
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let r = m.rescan().unwrap();
    let p: Vec<_> = r
        .new_problems
        .iter()
        .map(|p| (p.kind, p.name.as_str(), p.field.as_str(), p.reason))
        .collect();
    assert_eq!(
        p,
        [(
            "Service",
            "web",
            "spec.ports[0].port",
            ProblemReason::MissingField
        )]
    );
    assert_eq!(counts(&m), (0, 0, 0));
}

#[test]
fn objects_without_kind_and_old_apis_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "a.yaml", "metadata: {name: x}\n");
    write(
        tmp.path(),
        "b.yaml",
        &SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"),
    );
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let r = m.rescan().unwrap();
    let reasons: Vec<_> = r.new_problems.iter().map(|p| p.reason).collect();
    assert_eq!(
        reasons,
        vec![ProblemReason::MissingField, ProblemReason::InvalidValue]
    );
}

#[test]
fn removing_a_file_removes_its_objects() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "web.yaml", SVC);
    write(tmp.path(), "slice.yml", SLICE);
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    m.rescan().unwrap();
    assert_eq!(counts(&m), (1, 1, 0));
    fs::remove_file(tmp.path().join("slice.yml")).unwrap();
    assert!(m.rescan().unwrap().changed);
    assert_eq!(counts(&m), (1, 0, 0));
}

#[test]
fn a_missing_directory_is_an_error_naming_it() {
    let err = ManifestDir::new(Path::new("/nonexistent/manifests")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/manifests"));
}

#[test]
fn a_file_rescan_reads_only_that_file_and_keeps_the_index_in_step() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "a.yaml", SVC);
    write(tmp.path(), "b.yaml", SLICE);
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    m.rescan().unwrap();
    assert_eq!(
        m.index().len(),
        1,
        "the Service and its slice share one group"
    );

    // Another file appears but is not named: a per-file rescan does not see it.
    write(tmp.path(), "c.yaml", &SVC.replace("web", "api"));
    let r = m.rescan_paths(&[tmp.path().join("a.yaml")]);
    assert!(!r.changed, "a.yaml did not change");
    assert_eq!(counts(&m), (1, 1, 0));
    let r = m.rescan_paths(&[tmp.path().join("c.yaml")]);
    assert!(r.changed);
    assert_eq!((counts(&m), m.index().len()), ((2, 1, 0), 2));

    // Removal through the per-file path, and paths outside the directory are ignored.
    fs::remove_file(tmp.path().join("b.yaml")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "x.yaml", SVC);
    m.rescan_paths(&[tmp.path().join("b.yaml"), outside.path().join("x.yaml")]);
    assert_eq!((counts(&m), m.index().len()), ((2, 0, 0), 2));
    // The index built file by file equals one built from all objects.
    let fresh = crate::model::build(&m.objects(), "node-a");
    let mut model = crate::model::Model::default();
    assert_eq!(
        model
            .build(m.index(), crate::model::Changes::All, "node-a", true)
            .desired,
        fresh
    );
}

#[test]
fn events_are_sorted_into_read_now_and_wait_for_close() {
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, Flag, ModifyKind, RenameMode,
    };
    let ev = |kind| notify::Event::new(kind);
    let cases = [
        (
            ev(EventKind::Access(AccessKind::Close(AccessMode::Write))),
            EventClass::Ready,
        ),
        (
            ev(EventKind::Modify(ModifyKind::Name(RenameMode::To))),
            EventClass::Ready,
        ),
        (ev(EventKind::Create(CreateKind::File)), EventClass::Writing),
        (ev(EventKind::Create(CreateKind::Folder)), EventClass::Ready),
        (
            ev(EventKind::Remove(notify::event::RemoveKind::File)),
            EventClass::Ready,
        ),
        (
            ev(EventKind::Modify(ModifyKind::Data(DataChange::Any))),
            EventClass::Writing,
        ),
        (
            ev(EventKind::Access(AccessKind::Open(AccessMode::Any))),
            EventClass::Ignore,
        ),
        (
            ev(EventKind::Any).set_flag(Flag::Rescan),
            EventClass::RescanAll,
        ),
    ];
    for (event, want) in cases {
        assert_eq!(classify(&event), want, "{event:?}");
    }
}

#[test]
fn the_watch_hands_out_closed_files_at_once_and_open_ones_after_they_settle() {
    let tmp = tempfile::tempdir().unwrap();
    let wake = crate::wake::Wake::default();
    let watch = ManifestWatch::start(tmp.path(), wake).unwrap();
    let path = tmp.path().join("a.yaml");
    // An atomic replace: ready as soon as it is renamed into place.
    fs::write(tmp.path().join(".a.yaml.tmp"), SVC).unwrap();
    fs::rename(tmp.path().join(".a.yaml.tmp"), &path).unwrap();
    let mut seen = false;
    for _ in 0..100 {
        if watch.take(Instant::now()).paths.contains(&path) {
            seen = true;
            break;
        }
        sleep(Duration::from_millis(10));
    }
    assert!(seen, "a renamed file is read at once");

    // A write still open is held back until it settles.
    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, b"# more\n").unwrap();
    let mut due = None;
    for _ in 0..100 {
        due = watch.next_due();
        if due.is_some() {
            break;
        }
        sleep(Duration::from_millis(10));
    }
    let due = due.expect("an open write is tracked");
    assert!(!watch.take(Instant::now()).paths.contains(&path), "not yet");
    assert!(watch.take(due).paths.contains(&path), "settled");
    drop(f);
}

#[test]
fn events_are_routed_by_what_they_are_about() {
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, MetadataKind, ModifyKind,
        RemoveKind, RenameMode,
    };
    let dir = Path::new("/m");
    let ev = |kind, path: &str| notify::Event::new(kind).add_path(PathBuf::from(path));
    let file = || vec![PathBuf::from("/m/a.yaml")];
    let cases = [
        // The agent's own reads open the directory and its files: never a reason to read.
        (
            ev(EventKind::Access(AccessKind::Open(AccessMode::Any)), "/m"),
            Route::Ignore,
        ),
        (
            ev(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/m/a.yaml",
            ),
            Route::Ignore,
        ),
        (
            ev(
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                "/m",
            ),
            Route::Ignore,
        ),
        // The directory moved, was deleted, or was created again (its own watch, or its
        // parent's); the parent's other entries are not ours.
        (
            ev(EventKind::Modify(ModifyKind::Name(RenameMode::From)), "/m"),
            Route::Moved,
        ),
        (
            ev(EventKind::Remove(RemoveKind::Folder), "/m"),
            Route::Moved,
        ),
        (
            ev(EventKind::Create(CreateKind::Folder), "/m"),
            Route::Moved,
        ),
        (
            ev(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "/m"),
            Route::Moved,
        ),
        (
            ev(EventKind::Create(CreateKind::File), "/n.yaml"),
            Route::Ignore,
        ),
        (
            ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/m.yaml",
            ),
            Route::Ignore,
        ),
        // kubelet's ConfigMap update: a new `..<timestamp>` directory, `..data` swapped.
        (
            ev(EventKind::Create(CreateKind::Folder), "/m/..2026_11_29"),
            Route::All,
        ),
        (
            ev(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/m/..data",
            ),
            Route::All,
        ),
        (
            ev(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                "/m/..data_tmp",
            ),
            Route::Ignore,
        ),
        // A file.
        (
            ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/m/a.yaml",
            ),
            Route::Ready(file()),
        ),
        (
            ev(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                "/m/a.yaml",
            ),
            Route::Writing(file()),
        ),
        (
            ev(EventKind::Any, "/m/a.yaml").set_flag(notify::event::Flag::Rescan),
            Route::All,
        ),
    ];
    for (event, want) in cases {
        assert_eq!(route(&event, dir), want, "{event:?}");
    }
}

/// Waits (bounded) for the watch to hand out work.
fn next_work(watch: &ManifestWatch) -> Option<Work> {
    for _ in 0..100 {
        let w = watch.take(Instant::now());
        if w.all || !w.paths.is_empty() {
            return Some(w);
        }
        sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn reading_the_directory_does_not_wake_its_watch() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "a.yaml", SVC);
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let watch = ManifestWatch::start(tmp.path(), crate::wake::Wake::default()).unwrap();
    // A full read opens the directory and every file; were that an event to act on, each
    // read would cause the next one, forever.
    m.rescan().unwrap();
    sleep(Duration::from_millis(50));
    let w = watch.take(Instant::now());
    assert!(!w.all && w.paths.is_empty(), "{w:?}");
    assert_eq!(watch.next_due(), None);
}

#[test]
fn a_mounted_configmap_update_is_read() {
    use std::os::unix::fs::symlink;
    // kubelet's layout: `..<ts>/` holds the data, `..data -> ..<ts>`, `a.yaml -> ..data/a.yaml`.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir(d.join("..v1")).unwrap();
    fs::write(d.join("..v1/a.yaml"), SVC).unwrap();
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/a.yaml", d.join("a.yaml")).unwrap();
    let mut m = ManifestDir::new(d).unwrap();
    m.rescan().unwrap();
    assert_eq!(counts(&m), (1, 0, 0));

    let watch = ManifestWatch::start(d, crate::wake::Wake::default()).unwrap();
    // The update: a new data directory, a new symlink renamed over `..data`.
    fs::create_dir(d.join("..v2")).unwrap();
    fs::write(d.join("..v2/a.yaml"), format!("{SVC}---\n{SLICE}")).unwrap();
    symlink("..v2", d.join("..data_tmp")).unwrap();
    fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    fs::remove_dir_all(d.join("..v1")).unwrap();
    let w = next_work(&watch).expect("the swap is seen");
    assert!(w.all, "{w:?}");
    assert!(m.rescan().unwrap().changed);
    assert_eq!(counts(&m), (1, 1, 0));
}

/// The watch follows the directory's name: deleted and created again, or swapped for a
/// symlink to another directory, the new one is watched and read, without waiting for a
/// periodic full read.
#[test]
fn a_recreated_or_swapped_directory_is_watched_again() {
    use crate::source::{Source as _, manifests::ManifestSource};
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    fs::create_dir(&dir).unwrap();
    write(&dir, "a.yaml", SVC);
    let mut source = ManifestSource::start(ManifestDir::new(&dir).unwrap());
    source.read(false, None).expect("readable");
    source.follow(&crate::wake::Wake::default()).unwrap();
    source.read(false, None).expect("readable");
    let names = |s: &ManifestSource| -> Vec<String> {
        let mut v: Vec<String> = (s.dir().objects().services.iter())
            .filter_map(|o| o.object.metadata.name.clone())
            .collect();
        v.sort();
        v
    };
    // Reads as the agent does on each wake-up, up to 5 s, until `want`.
    let wait_for = |source: &mut ManifestSource, want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            source.read(false, None);
            if names(source) == want {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        panic!("never read {want:?}, have {:?}", names(source));
    };

    // Deleted and created again, with other files.
    fs::remove_dir_all(&dir).unwrap();
    sleep(Duration::from_millis(50));
    source.read(false, None);
    assert_eq!(
        names(&source),
        ["web"],
        "a vanished directory keeps its objects"
    );
    fs::create_dir(&dir).unwrap();
    write(&dir, "b.yaml", &SVC.replace("web", "b"));
    wait_for(&mut source, &["b"]);
    write(&dir, "c.yaml", &SVC.replace("web", "c"));
    wait_for(&mut source, &["b", "c"]);

    // Swapped for a symlink to another directory (created aside, renamed over the name).
    let other = tmp.path().join("v2");
    fs::create_dir(&other).unwrap();
    write(&other, "d.yaml", &SVC.replace("web", "d"));
    symlink(&other, tmp.path().join("m.tmp")).unwrap();
    fs::remove_dir_all(&dir).unwrap();
    fs::rename(tmp.path().join("m.tmp"), &dir).unwrap();
    wait_for(&mut source, &["d"]);
    write(&other, "e.yaml", &SVC.replace("web", "e"));
    wait_for(&mut source, &["d", "e"]);
}

#[test]
fn a_vanished_directory_is_not_every_file_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    fs::create_dir(&dir).unwrap();
    write(&dir, "a.yaml", SVC);
    let mut m = ManifestDir::new(&dir).unwrap();
    m.rescan().unwrap();
    fs::rename(&dir, tmp.path().join("away")).unwrap();
    // The files' events arrive, but reading them fails because the directory is gone.
    let r = m.rescan_paths(&[dir.join("a.yaml")]);
    assert!(!r.changed);
    assert!(m.rescan().is_err());
    assert_eq!(counts(&m), (1, 0, 0), "the objects are kept");
    // Back in place: nothing to re-read.
    fs::rename(tmp.path().join("away"), &dir).unwrap();
    assert!(!m.rescan().unwrap().changed);
}

/// Enough files for the parallel read: each file's objects stay its own (a file changed or
/// removed afterwards takes exactly its objects along).
#[test]
fn files_read_in_parallel_keep_their_own_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let svc = |i: usize| SVC.replace("web", &format!("s{i}"));
    for i in 0..300 {
        fs::write(tmp.path().join(format!("s{i}.yaml")), svc(i)).unwrap();
    }
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    m.rescan().unwrap();
    let names = |m: &ManifestDir| -> BTreeSet<String> {
        m.objects()
            .services
            .iter()
            .map(|s| s.object.metadata.name.clone().unwrap())
            .collect()
    };
    let want: BTreeSet<String> = (0..300).map(|i| format!("s{i}")).collect();
    assert_eq!(names(&m), want);
    for f in m.files.values() {
        let file_name = Path::new(&*f.origin).file_stem().unwrap().to_str().unwrap();
        let objects = &f.objects.services;
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].metadata.name.as_deref(), Some(file_name));
    }
    fs::remove_file(tmp.path().join("s7.yaml")).unwrap();
    m.rescan_paths(&[tmp.path().join("s7.yaml")]);
    let mut want = want;
    want.remove("s7");
    assert_eq!(names(&m), want);
}

/// A read hands the index over as it goes: every [`PROGRESS_FILES`] files (the Services of
/// those files, each once, in directory order), then once more after the last file; and it
/// ends as a plain rescan does. A second read of unchanged files hands nothing over.
#[test]
fn a_read_hands_over_the_index_as_files_come_in() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 2 * PROGRESS_FILES + 100;
    for i in 0..n {
        let name = format!("s{i:05}");
        fs::write(
            tmp.path().join(format!("{name}.yaml")),
            SVC.replace("web", &name),
        )
        .unwrap();
    }
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let reading = m.start_rescan().unwrap();
    let mut handed: Vec<Vec<String>> = Vec::new();
    let r = m
        .finish_rescan(reading, |index| {
            let mut names: Vec<String> = match index.take_touched() {
                // The first hand-over of a new index: everything it holds is new.
                None => (0..n)
                    .map(|i| format!("s{i:05}"))
                    .filter(|s| index.contains(&crate::model::ServiceRef::new(None, s)))
                    .collect(),
                Some(t) => t.iter().map(|s| s.name.to_string()).collect(),
            };
            names.sort();
            handed.push(names);
        })
        .unwrap();
    assert!(r.changed);
    assert!(
        handed.len() >= 3,
        "{} files come in at least 3 hand-overs, got {}",
        n,
        handed.len()
    );
    assert!(
        handed[..handed.len() - 1]
            .iter()
            .all(|h| h.len() >= PROGRESS_FILES),
        "each hand-over but the last has at least PROGRESS_FILES files: {:?}",
        handed.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let all: Vec<String> = handed.concat();
    let want: Vec<String> = (0..n).map(|i| format!("s{i:05}")).collect();
    assert_eq!(all, want, "each Service once, in directory order");

    let mut plain = ManifestDir::new(tmp.path()).unwrap();
    plain.rescan().unwrap();
    assert_eq!(
        crate::model::build(&m.objects(), "node-a"),
        crate::model::build(&plain.objects(), "node-a")
    );

    let reading = m.start_rescan().unwrap();
    let mut calls = 0;
    let r = m.finish_rescan(reading, |_| calls += 1).unwrap();
    assert!(!r.changed);
    assert_eq!(calls, 0, "nothing read, nothing handed over");
}
