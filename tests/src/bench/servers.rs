//! Fast greeting servers for the benchmark's backend pods: blocking accept on a few threads
//! (the test harness's servers poll, which is fine for tests and too slow here).

use std::{
    io::Write as _,
    net::{TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::Context as _;

use crate::servers::enter_netns;

/// A pod's servers; stopped and joined on drop (each blocking call wakes every 100 ms).
pub struct Greeters {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn accept_timeout(l: &TcpListener, t: Duration) {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: t.as_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket and a correctly sized option value; accept honours SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

impl Greeters {
    /// Serves `name` on TCP `tcp_port` (`tcp_threads` acceptors) and UDP `udp_port` in the
    /// network namespace at `ns`.
    pub fn start(
        ns: &Path,
        name: &str,
        tcp_port: u16,
        udp_port: u16,
        tcp_threads: usize,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<anyhow::Result<()>>();
        let greeting: Arc<[u8]> = Arc::from(format!("{name}\n").into_bytes());
        let (ltx, lrx) = mpsc::channel::<TcpListener>();
        let mut threads = Vec::new();
        // One thread binds both sockets in the namespace; the others inherit them.
        {
            let (ns, tx, stop, greeting) =
                (ns.to_path_buf(), tx.clone(), stop.clone(), greeting.clone());
            threads.push(thread::spawn(move || {
                let setup = enter_netns(&ns).and_then(|()| {
                    let l = TcpListener::bind(("0.0.0.0", tcp_port))?;
                    accept_timeout(&l, Duration::from_millis(100));
                    let u = UdpSocket::bind(("0.0.0.0", udp_port))?;
                    u.set_read_timeout(Some(Duration::from_millis(100)))?;
                    Ok((l, u))
                });
                let u = match setup {
                    Ok((l, u)) => {
                        let _ = ltx.send(l);
                        let _ = tx.send(Ok(()));
                        u
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&greeting, from);
                    }
                }
            }));
        }
        rx.recv_timeout(Duration::from_secs(5))
            .context("greeting server did not start")??;
        let listener = Arc::new(lrx.recv().context("listener")?);
        for _ in 0..tcp_threads {
            let (l, stop, greeting) = (listener.clone(), stop.clone(), greeting.clone());
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((mut c, _)) = l.accept() {
                        let _ = c.write_all(&greeting);
                    }
                }
            }));
        }
        Ok(Greeters { stop, threads })
    }
}

impl Drop for Greeters {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
