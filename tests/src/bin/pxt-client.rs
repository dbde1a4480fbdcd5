//! Test client, run as a "pod" (inside the test cgroup and the client netns). Prints one JSON
//! object with what it saw, so tests assert on data, not on log text.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use proxy_tests::client::Report;

#[derive(Parser)]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    /// Where to connect / send.
    addr: SocketAddr,
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// connect, read the greeting, close.
    Tcp,
    /// unconnected UDP: sendto + recvfrom.
    Udp,
    /// connected UDP: connect + send + recv.
    UdpConnected,
    /// unconnected UDP from one socket (one source port), one datagram every 50 ms.
    UdpLoop,
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(n) => format!("errno {n}"),
        None => format!("{:?}", e.kind()),
    }
}

fn one(mode: Mode, addr: SocketAddr, timeout: Duration, r: &mut Report) -> std::io::Result<()> {
    let mut buf = [0u8; 256];
    match mode {
        Mode::Tcp => {
            let mut s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            let peer = s.peer_addr()?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            *r.replies.entry(text.trim().to_string()).or_default() += 1;
            *r.peers.entry(peer.to_string()).or_default() += 1;
        }
        Mode::UdpLoop => unreachable!("handled in main"),
        Mode::Udp | Mode::UdpConnected => {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(timeout))?;
            let (n, from) = if matches!(mode, Mode::UdpConnected) {
                s.connect(addr)?;
                s.send(b"hello")?;
                let n = s.recv(&mut buf)?;
                (n, s.peer_addr()?)
            } else {
                s.send_to(b"hello", addr)?;
                s.recv_from(&mut buf)?
            };
            *r.replies
                .entry(String::from_utf8_lossy(&buf[..n]).trim().to_string())
                .or_default() += 1;
            *r.peers.entry(from.to_string()).or_default() += 1;
        }
    }
    Ok(())
}

/// One socket, one source port: a long-lived UDP "flow", as a DNS forwarder or a game client.
fn udp_loop(
    addr: SocketAddr,
    count: u32,
    timeout: Duration,
    r: &mut Report,
) -> std::io::Result<()> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout.min(Duration::from_millis(200))))?;
    let mut buf = [0u8; 256];
    for _ in 0..count {
        let start = Instant::now();
        s.send_to(b"hello", addr)?;
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                let name = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                *r.replies.entry(name.clone()).or_default() += 1;
                *r.peers.entry(from.to_string()).or_default() += 1;
                r.last = name;
            }
            Err(e) => *r.errors.entry(errno_name(&e)).or_default() += 1,
        }
        std::thread::sleep(Duration::from_millis(50).saturating_sub(start.elapsed()));
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if matches!(args.mode, Mode::UdpLoop) {
        let mut r = Report::default();
        if let Err(e) = udp_loop(
            args.addr,
            args.count,
            Duration::from_millis(args.timeout_ms),
            &mut r,
        ) {
            *r.errors.entry(errno_name(&e)).or_default() += 1;
        }
        println!("{}", serde_json::to_string(&r).expect("serializable"));
        return;
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut r = Report::default();
    for _ in 0..args.count {
        let start = Instant::now();
        if let Err(e) = one(args.mode, args.addr, timeout, &mut r) {
            *r.errors.entry(errno_name(&e)).or_default() += 1;
            r.max_error_us = r.max_error_us.max(start.elapsed().as_micros() as u64);
        }
    }
    println!("{}", serde_json::to_string(&r).expect("serializable"));
}
