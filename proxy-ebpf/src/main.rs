//! The datapath: socket-level ClusterIP load balancing (cgroup connect4, sendmsg4, recvmsg4,
//! getpeername4) and the per-packet path (TC) for traffic no socket hook saw.
//!
//! - [`maps`]: the pinned maps, declared from proxy-common's table;
//! - [`lb`]: the one backend choice both datapaths call;
//! - [`sock`]: the socket hooks;
//! - [`tc`]: the packet path (parsing, NAT rewrite, conntrack, ICMP, reject);
//! - [`log`]: the slow-path log (aya-log), off unless the agent sets a level.
//!
//! Entry points are thin: each returns its helper's verdict, success or failure alike
//! (aya-template's `match try_x(ctx) { Ok(r) | Err(r) => r }`).
#![no_std]
#![no_main]

mod clock;
mod lb;
mod log;
mod maps;
mod sock;
mod tc;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use proxy_common::Counter;

#[cgroup_sock_addr(connect4)]
pub fn proxy_connect4(ctx: SockAddrContext) -> i32 {
    match sock::forward(&ctx, sock::Forward::Connect) {
        Ok(r) | Err(r) => r,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn proxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    match sock::forward(&ctx, sock::Forward::Sendmsg) {
        Ok(r) | Err(r) => r,
    }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn proxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    match sock::reverse(&ctx, Counter::RecvmsgReversed) {
        Ok(r) | Err(r) => r,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn proxy_getpeername4(ctx: SockAddrContext) -> i32 {
    match sock::reverse(&ctx, Counter::GetpeernameReversed) {
        Ok(r) | Err(r) => r,
    }
}

#[classifier]
pub fn proxy_tc(ctx: TcContext) -> i32 {
    match tc::packet(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
