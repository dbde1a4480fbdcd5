//! Test client, run as a "pod" (inside the test cgroup and the client netns). Prints one JSON
//! object with what it saw, so tests assert on data, not on log text.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
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
    /// `udp`/`udp-connected`: send from this source port (0: any), so runs repeat a 5-tuple.
    #[arg(long, default_value_t = 0)]
    source_port: u16,
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
    /// one connected UDP socket, one datagram every 50 ms; on a socket error (not a timeout)
    /// it reconnects, as an application would.
    UdpConnectedLoop,
    /// connect and read the greeting, print the socket's cookie on a line, wait for a line on
    /// stdin (or its end), then report the peer as getpeername() gives it then.
    TcpHold,
    /// one TCP connection to an echo server, one round trip every 20 ms, `count` times; it
    /// stops at the first error (the connection is the point).
    TcpEcho,
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(libc::ECONNABORTED) => "ECONNABORTED".into(),
        Some(libc::EDESTADDRREQ) => "EDESTADDRREQ".into(),
        Some(n) => format!("errno {n}"),
        None => format!("{:?}", e.kind()),
    }
}

fn one(
    mode: Mode,
    addr: SocketAddr,
    source_port: u16,
    timeout: Duration,
    r: &mut Report,
) -> std::io::Result<()> {
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
        Mode::UdpLoop | Mode::UdpConnectedLoop | Mode::TcpHold | Mode::TcpEcho => {
            unreachable!("handled in main")
        }
        Mode::Udp | Mode::UdpConnected => {
            let s = UdpSocket::bind(("0.0.0.0", source_port))?;
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

fn udp_connected_loop(addr: SocketAddr, count: u32, r: &mut Report) -> std::io::Result<()> {
    let connect = || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.connect(addr)?;
        Ok(s)
    };
    let mut s = connect()?;
    let mut buf = [0u8; 256];
    for _ in 0..count {
        let start = Instant::now();
        match s.send(b"hello").and_then(|_| s.recv(&mut buf)) {
            Ok(n) => {
                let name = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                *r.replies.entry(name.clone()).or_default() += 1;
                *r.peers.entry(s.peer_addr()?.to_string()).or_default() += 1;
                r.last = name;
            }
            Err(e) => {
                *r.errors.entry(errno_name(&e)).or_default() += 1;
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    s = connect()?;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50).saturating_sub(start.elapsed()));
    }
    Ok(())
}

/// One TCP socket held open while the test changes the maps under it.
fn tcp_hold(addr: SocketAddr, timeout: Duration, r: &mut Report) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    *r.replies
        .entry(String::from_utf8_lossy(&buf[..n]).trim().to_string())
        .or_default() += 1;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and an option value of the size the kernel writes (u64).
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    println!("{cookie}");
    std::io::stdout().flush()?;
    std::io::stdin().read_line(&mut String::new())?;
    *r.peers.entry(s.peer_addr()?.to_string()).or_default() += 1;
    Ok(())
}

fn tcp_echo(
    addr: SocketAddr,
    count: u32,
    timeout: Duration,
    r: &mut Report,
) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    *r.peers.entry(s.peer_addr()?.to_string()).or_default() += 1;
    for i in 0..count {
        let line = format!("round trip {i}\n");
        s.write_all(line.as_bytes())?;
        let mut back = vec![0u8; line.len()];
        s.read_exact(&mut back)?;
        if back != line.as_bytes() {
            return Err(std::io::Error::other("echo differs"));
        }
        *r.replies.entry("echo".into()).or_default() += 1;
        r.last = i.to_string();
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The loop modes report once, at the end.
fn run_loop(f: impl FnOnce(&mut Report) -> std::io::Result<()>) {
    let mut r = Report::default();
    if let Err(e) = f(&mut r) {
        *r.errors.entry(errno_name(&e)).or_default() += 1;
    }
    println!("{}", serde_json::to_string(&r).expect("serializable"));
}

fn main() {
    let args = Args::parse();
    let timeout = Duration::from_millis(args.timeout_ms);
    match args.mode {
        Mode::UdpLoop => return run_loop(|r| udp_loop(args.addr, args.count, timeout, r)),
        Mode::UdpConnectedLoop => {
            return run_loop(|r| udp_connected_loop(args.addr, args.count, r));
        }
        Mode::TcpHold => return run_loop(|r| tcp_hold(args.addr, timeout, r)),
        Mode::TcpEcho => return run_loop(|r| tcp_echo(args.addr, args.count, timeout, r)),
        _ => {}
    }
    let mut r = Report::default();
    for _ in 0..args.count {
        let start = Instant::now();
        if let Err(e) = one(args.mode, args.addr, args.source_port, timeout, &mut r) {
            *r.errors.entry(errno_name(&e)).or_default() += 1;
            r.max_error_us = r.max_error_us.max(start.elapsed().as_micros() as u64);
        }
    }
    println!("{}", serde_json::to_string(&r).expect("serializable"));
}
