//! Backend "pods": real TCP and UDP servers that answer with their pod's name, each on a
//! thread that has entered the pod's network namespace (setns affects only that thread).

use std::{
    fs::File,
    io::{ErrorKind, Write as _},
    net::{TcpListener, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle, sleep},
    time::Duration,
};

use anyhow::{Context as _, anyhow};

/// Servers of one pod; stopped and joined on drop.
pub struct PodServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Enters the network namespace at `ns_path` on the calling thread.
pub fn enter_netns(ns_path: &Path) -> anyhow::Result<()> {
    let f = File::open(ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(anyhow!(
            "setns {}: {}",
            ns_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

impl PodServers {
    /// Serves `name` on every TCP and UDP port given, on all addresses of the pod.
    pub fn start(
        ns_path: &Path,
        name: &str,
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
        let jobs: Vec<(bool, u16)> = tcp_ports
            .iter()
            .map(|p| (true, *p))
            .chain(udp_ports.iter().map(|p| (false, *p)))
            .collect();
        for (tcp, port) in jobs.iter().copied() {
            let (stop, ns, name, ready) = (
                stop.clone(),
                ns_path.to_path_buf(),
                name.to_string(),
                ready_tx.clone(),
            );
            threads.push(thread::spawn(move || {
                let setup = enter_netns(&ns).and_then(|()| {
                    if tcp {
                        let l = TcpListener::bind(("0.0.0.0", port))?;
                        l.set_nonblocking(true)?;
                        Ok((Some(l), None))
                    } else {
                        let u = UdpSocket::bind(("0.0.0.0", port))?;
                        u.set_read_timeout(Some(Duration::from_millis(20)))?;
                        Ok((None, Some(u)))
                    }
                });
                let (tcp, udp) = match setup {
                    Ok(s) => {
                        let _ = ready.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let reply = format!("{name}\n");
                // Bounded by the guard: the loop ends when the guard drops.
                while !stop.load(Ordering::Relaxed) {
                    if let Some(l) = &tcp {
                        match l.accept() {
                            Ok((mut c, _)) => {
                                let _ = c.set_nonblocking(false);
                                let _ = c.write_all(reply.as_bytes());
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                sleep(Duration::from_millis(1));
                            }
                            Err(_) => sleep(Duration::from_millis(5)),
                        }
                    }
                    if let Some(u) = &udp {
                        let mut buf = [0u8; 512];
                        if let Ok((_, from)) = u.recv_from(&mut buf) {
                            let _ = u.send_to(reply.as_bytes(), from);
                        }
                    }
                }
            }));
        }
        let servers = PodServers { stop, threads };
        for _ in &jobs {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .context("server did not start")??;
        }
        Ok(servers)
    }
}

impl Drop for PodServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
