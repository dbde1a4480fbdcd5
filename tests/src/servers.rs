//! Backend "pods": real TCP and UDP servers that answer with their pod's name, and a TCP echo
//! server for long-lived connections, each on a thread that has entered the pod's network
//! namespace (setns affects only that thread).

use std::{
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
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

impl PodServers {
    /// A TCP echo server on `port`: each connection gets back what it sends, for as long as
    /// it stays open. One thread polls every connection (bounded by the guard).
    pub fn echo(ns_path: &Path, port: u16) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
        let (flag, ns) = (stop.clone(), ns_path.to_path_buf());
        let thread = thread::spawn(move || {
            let listener = enter_netns(&ns).and_then(|()| {
                let l = TcpListener::bind(("0.0.0.0", port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let listener = match listener {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut conns: Vec<TcpStream> = Vec::new();
            let mut buf = [0u8; 4096];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((c, _)) = listener.accept()
                    && c.set_nonblocking(true).is_ok()
                {
                    conns.push(c);
                }
                let mut idle = true;
                conns.retain_mut(|c| match c.read(&mut buf) {
                    Ok(0) => false,
                    Ok(n) => {
                        idle = false;
                        c.set_nonblocking(false).is_ok()
                            && c.write_all(&buf[..n]).is_ok()
                            && c.set_nonblocking(true).is_ok()
                    }
                    Err(e) => e.kind() == ErrorKind::WouldBlock,
                });
                if idle {
                    sleep(Duration::from_millis(1));
                }
            }
        });
        let servers = PodServers {
            stop,
            threads: vec![thread],
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("echo server did not start")??;
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
