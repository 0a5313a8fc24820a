//! Turns Nagle's algorithm off on the process's TCP connections to a database port.
//!
//! sqlx 0.9.0 no longer sets `TCP_NODELAY` on its sockets (sqlx#4335), and gives no way
//! to reach them. With Nagle on, the tail of a large statement (a 1,024-row insert is
//! ~100 KiB) waits for the server's delayed ACK, ~40 ms on Linux: measured here as 4.6×
//! fewer durable orders per second on PostgreSQL over TCP than over its Unix socket.
//! Until sqlx sets it again, each new connection is followed by this sweep over the
//! process's descriptors: every connected TCP socket whose peer port is the database's
//! gets `TCP_NODELAY`, which is harmless on a socket that already has it.

/// Sets `TCP_NODELAY` on every TCP socket of this process connected to `port`; answers
/// how many it touched. Linux only (reads `/proc/self/fd`); elsewhere it does nothing.
pub(crate) fn set_on_connections_to(port: u16) -> usize {
    #[cfg(target_os = "linux")]
    {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return 0;
        };
        let mut n_set = 0;
        for entry in entries.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if peer_port(fd) == Some(port) {
                let one: libc::c_int = 1;
                // SAFETY: `fd` is an open socket of this process (getpeername succeeded);
                // the option value is a c_int that outlives the call.
                let rc = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::IPPROTO_TCP,
                        libc::TCP_NODELAY,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc == 0 {
                    n_set += 1;
                }
            }
        }
        n_set
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = port;
        0
    }
}

#[cfg(target_os = "linux")]
fn peer_port(fd: i32) -> Option<u16> {
    // SAFETY: sockaddr_storage is plain data, valid when zeroed; getpeername writes at
    // most `len` bytes into it and fails (rc != 0) on descriptors that are not sockets.
    unsafe {
        let mut address: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getpeername(
            fd,
            (&mut address as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return None;
        }
        match i32::from(address.ss_family) {
            libc::AF_INET => {
                let v4 = &*(&address as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Some(u16::from_be(v4.sin_port))
            }
            libc::AF_INET6 => {
                let v6 = &*(&address as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                Some(u16::from_be(v6.sin6_port))
            }
            _ => None,
        }
    }
}
