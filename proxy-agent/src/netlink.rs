//! A netlink request socket: send one request, read its answer (a dump, or an ack). Used for
//! sock_diag ([`crate::sockets`]) and the tc filter dump ([`crate::tc`]). (The link-change
//! watch is a multicast listener: [`crate::tc::watch_links`].) Hand-written rather than a
//! netlink crate: two requests, and both fit in these few lines.

use std::io;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// A netlink message: the header, then `payload`.
pub fn message(ty: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + payload.len()) as u32;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    m.extend_from_slice(payload);
    m
}

pub struct Netlink(i32);

impl Drop for Netlink {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

impl Netlink {
    /// A socket of netlink family `protocol` (NETLINK_ROUTE, NETLINK_SOCK_DIAG).
    pub fn open(protocol: i32) -> io::Result<Self> {
        // SAFETY: plain socket call.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(Netlink(fd))
        }
    }

    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: sending our own buffer; the kernel is the default destination.
        if unsafe { libc::send(self.0, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads messages until NLMSG_DONE (dump) or the first NLMSG_ERROR (ack), calling `f`
    /// with each payload. Bounded by the kernel's dump, which ends.
    pub fn read(&self, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: reading into our own buffer.
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0;
            let n = n as usize;
            while off + NLMSG_HDRLEN <= n {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
                let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
                if len < NLMSG_HDRLEN || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                // Both carry an errno after the header (NLMSG_DONE's: a dump that failed).
                let errno = || {
                    buf.get(off + 16..off + 20)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                };
                match ty {
                    NLMSG_DONE if errno() < 0 => {
                        return Err(io::Error::from_raw_os_error(-errno()));
                    }
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = errno();
                        return if errno == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-errno))
                        };
                    }
                    _ => f(&buf[off + NLMSG_HDRLEN..off + len]),
                }
                off += (len + 3) & !3;
            }
        }
    }
}
