//! The chaos load, run inside the client pod: paced TCP connects to one ClusterIP (each one
//! recorded with its CLOCK_MONOTONIC times and which pod answered), and one long-lived echo
//! connection, until its stdin closes.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::bench::load::linger_zero;

/// A connect waits this long: a dropped SYN (retransmitted after 1 s) shows as a slow
/// connect, not as a failure.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The clock both this process and the driver read: CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes only `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The pod that answered (its greeting).
    Reply(String),
    /// ECONNREFUSED: what a Service without endpoints answers (EPERM from the socket path on
    /// kernels before 5.18).
    Refused,
    /// The connect did not complete in [`CONNECT_TIMEOUT`].
    Timeout,
    /// Connected (from this local port), but no greeting came in [`CONNECT_TIMEOUT`].
    NoGreeting(u16),
    Error(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub start_ns: u64,
    /// When the connect returned: the backend was chosen before (at connect() on the socket
    /// path, at the SYN or its resend on the packet path).
    pub connected_ns: u64,
    pub end_ns: u64,
    pub outcome: Outcome,
}

/// The long-lived connection: round trips every 20 ms until the end or its first error.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Echo {
    pub round_trips: u64,
    /// When (CLOCK_MONOTONIC ns) and how it broke.
    pub broken: Option<(u64, String)>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProbeResult {
    pub attempts: Vec<Attempt>,
    pub echo: Option<Echo>,
}

/// One connect and its greeting: the outcome, and when the connect returned.
fn once(target: SocketAddr) -> (Outcome, u64) {
    let connect = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT);
    let connected_ns = monotonic_ns();
    (greeting(connect), connected_ns)
}

fn greeting(connect: std::io::Result<TcpStream>) -> Outcome {
    let mut s = match connect {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::PermissionDenied
            ) =>
        {
            return Outcome::Refused;
        }
        Err(e) if e.kind() == ErrorKind::TimedOut => return Outcome::Timeout,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let _ = s.set_read_timeout(Some(CONNECT_TIMEOUT));
    let mut buf = [0u8; 64];
    let outcome = match s.read(&mut buf) {
        Ok(0) => Outcome::Error("closed before the greeting".into()),
        Ok(n) => Outcome::Reply(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Outcome::NoGreeting(s.local_addr().map_or(0, |a| a.port()))
        }
        Err(e) => Outcome::Error(e.to_string()),
    };
    linger_zero(&s);
    outcome
}

/// One worker's share of `rate`: connects at fixed times, never in a burst to catch up.
fn worker(
    target: SocketAddr,
    interval: Duration,
    offset: Duration,
    stop: &AtomicBool,
    deadline: Instant,
) -> Vec<Attempt> {
    let mut out = Vec::new();
    let mut next = Instant::now() + offset;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        let start_ns = monotonic_ns();
        let (outcome, connected_ns) = once(target);
        out.push(Attempt {
            start_ns,
            connected_ns,
            end_ns: monotonic_ns(),
            outcome,
        });
        next = (next + interval).max(Instant::now());
    }
    out
}

fn echo(target: SocketAddr, stop: &AtomicBool, deadline: Instant) -> Echo {
    let mut e = Echo::default();
    let broke = |why: String| Some((monotonic_ns(), why));
    let mut s = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(err) => {
            e.broken = broke(format!("connect: {err}"));
            return e;
        }
    };
    let _ = s.set_read_timeout(Some(CONNECT_TIMEOUT));
    let mut back = [0u8; 8];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let sent = e.round_trips.to_be_bytes();
        let r = s.write_all(&sent).and_then(|()| s.read_exact(&mut back));
        match r {
            Ok(()) if back == sent => e.round_trips += 1,
            Ok(()) => {
                e.broken = broke(format!("echoed {back:?} for {sent:?}"));
                return e;
            }
            Err(err) => {
                e.broken = broke(err.to_string());
                return e;
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    e
}

/// Runs until `stop` (or `max`): `rate` connects per second over `workers` threads, and the
/// echo connection if asked for.
pub fn run(
    target: SocketAddr,
    rate: u32,
    workers: u32,
    echo_target: Option<SocketAddr>,
    stop: &AtomicBool,
    max: Duration,
) -> ProbeResult {
    let deadline = Instant::now() + max;
    let interval = Duration::from_secs(1) * workers / rate.max(1);
    thread::scope(|s| {
        let echo = echo_target.map(|t| s.spawn(move || echo(t, stop, deadline)));
        let loads: Vec<_> = (0..workers)
            .map(|i| {
                let offset = interval * i / workers;
                s.spawn(move || worker(target, interval, offset, stop, deadline))
            })
            .collect();
        let mut attempts: Vec<Attempt> = loads
            .into_iter()
            .flat_map(|h| h.join().expect("worker"))
            .collect();
        attempts.sort_by_key(|a| a.start_ns);
        ProbeResult {
            attempts,
            echo: echo.map(|h| h.join().expect("echo")),
        }
    })
}
