//! The load generator: closed loop, several workers. TCP: connect -> read the greeting ->
//! close with SO_LINGER 0 (an RST, so no TIME_WAIT piles up on either side). UDP: one
//! connected socket per worker, request -> response. Latency of each operation goes into an
//! HDR histogram.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Tcp,
    Udp,
}

/// How a TCP connection's target is chosen among several.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pick {
    /// Each worker takes them in turn.
    Rotate,
    /// At random, as a Service's load balancing does (kube-proxy's `statistic random` and
    /// `numgen random`, this project's random slot).
    Random,
}

/// One measurement.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Per operation: 1 ms to 10 s, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000, 3).expect("valid bounds")
}

/// An RST at close: the connection leaves no TIME_WAIT behind.
pub fn linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn tcp_once(target: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 64];
    let ok = matches!(s.read(&mut buf), Ok(n) if n > 0);
    linger_zero(&s);
    ok
}

/// Runs `workers` closed loops for `warmup` (not counted) then `duration`; TCP connections go
/// to `targets` as `pick` says.
pub fn run(
    mode: Mode,
    targets: &[SocketAddr],
    pick: Pick,
    workers: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let targets = targets.to_vec();
            thread::spawn(move || {
                let mut hist = histogram();
                let (mut ops, mut errors) = (0u64, 0u64);
                let mut turn = w;
                let udp = match mode {
                    // One connected socket per worker (its target: this worker's turn).
                    Mode::Udp => UdpSocket::bind("0.0.0.0:0")
                        .and_then(|u| {
                            u.connect(targets[w % targets.len()])?;
                            u.set_read_timeout(Some(Duration::from_secs(1)))?;
                            Ok(u)
                        })
                        .ok(),
                    Mode::Tcp => None,
                };
                // Bounded by `end` (each operation by its 1 s timeouts).
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    turn += 1;
                    let ok = match (&udp, mode) {
                        (_, Mode::Tcp) => tcp_once(match pick {
                            Pick::Rotate => targets[turn % targets.len()],
                            Pick::Random => targets[fastrand::usize(..targets.len())],
                        }),
                        (Some(u), Mode::Udp) => {
                            let mut buf = [0u8; 64];
                            u.send(b"ping").is_ok() && matches!(u.recv(&mut buf), Ok(n) if n > 0)
                        }
                        (None, Mode::Udp) => {
                            thread::sleep(Duration::from_millis(10));
                            false
                        }
                    };
                    if t0 < measure_from {
                        continue;
                    }
                    if ok {
                        ops += 1;
                        let us = t0.elapsed().as_micros().max(1) as u64;
                        let _ = hist.record(us.min(10_000_000));
                    } else {
                        errors += 1;
                    }
                }
                (ops, errors, hist)
            })
        })
        .collect();
    let mut total = histogram();
    let (mut ops, mut errors) = (0, 0);
    for h in handles {
        let (o, e, hist) = h.join().expect("worker");
        ops += o;
        errors += e;
        total.add(hist).expect("same bounds");
    }
    let seconds = duration.as_secs_f64();
    LoadResult {
        ops,
        errors,
        seconds,
        rate: ops as f64 / seconds,
        p50_us: total.value_at_quantile(0.50) as f64,
        p99_us: total.value_at_quantile(0.99) as f64,
        max_us: total.max() as f64,
    }
}
