//! Connections to an MX host through a relay, for egress sources whose addresses live
//! on another host: HAProxy's PROXY protocol (version 2, binary), or SOCKS5
//! (RFC 1928, with RFC 1929 username and password). Either way the caller gets a
//! plain connection that carries the SMTP session from the MX host's banner on.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::Conn;
use gannet_core::queue::EgressProxy;

/// Connects to `dest` through `proxy` within `limit`. `source`: for the PROXY
/// protocol, the address the relay is to connect from (the header's source); for
/// SOCKS5, the local address of the connection to the proxy.
pub async fn connect(
    proxy: &EgressProxy,
    dest: SocketAddr,
    source: Option<IpAddr>,
    limit: Duration,
) -> io::Result<Conn> {
    let started = std::time::Instant::now();
    let left = || limit.saturating_sub(started.elapsed());
    match proxy {
        EgressProxy::HaProxy { server } => {
            let source = source.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "no source address for the PROXY header",
                )
            })?;
            let header = proxy_v2(SocketAddr::new(source, 0), dest)?;
            let mut conn = Conn::connect(*server, None, limit).await?;
            conn.write_all(&header, left()).await?;
            Ok(conn)
        }
        EgressProxy::Socks5 { server, auth } => {
            let mut conn = Conn::connect(*server, source, limit).await?;
            socks5(&mut conn, dest, auth.as_ref(), left()).await?;
            Ok(conn)
        }
    }
}

/// The PROXY protocol v2 header of a TCP connection from `src` to `dst`.
pub fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> io::Result<Vec<u8>> {
    const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(SIGNATURE);
    // Version 2, command PROXY.
    out.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // TCP over IPv4
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.push(0x21); // TCP over IPv6
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the source {} and the MX host {} are not of one address family",
                    src.ip(),
                    dst.ip()
                ),
            ));
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    Ok(out)
}

/// Reads exactly `buf.len()` bytes (never more: what follows is the MX host's).
async fn read_exact(conn: &mut Conn, buf: &mut [u8], limit: Duration) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = conn.read(&mut buf[filled..], limit).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the SOCKS5 proxy closed the connection",
            ));
        }
        filled += n;
    }
    Ok(())
}

fn refused(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, what)
}

/// The SOCKS5 handshake: method negotiation, authentication, CONNECT `dest`.
async fn socks5(
    conn: &mut Conn,
    dest: SocketAddr,
    auth: Option<&(String, String)>,
    limit: Duration,
) -> io::Result<()> {
    // No authentication, or username/password when we have them.
    let greeting: &[u8] = if auth.is_some() {
        &[5, 2, 0, 2]
    } else {
        &[5, 1, 0]
    };
    conn.write_all(greeting, limit).await?;
    let mut choice = [0u8; 2];
    read_exact(conn, &mut choice, limit).await?;
    match (choice, auth) {
        ([5, 0], _) => {}
        ([5, 2], Some((user, password))) => {
            let (user, password) = (user.as_bytes(), password.as_bytes());
            let mut request = Vec::with_capacity(3 + user.len() + password.len());
            request.push(1);
            request.push(u8::try_from(user.len()).unwrap_or(u8::MAX));
            request.extend_from_slice(&user[..user.len().min(255)]);
            request.push(u8::try_from(password.len()).unwrap_or(u8::MAX));
            request.extend_from_slice(&password[..password.len().min(255)]);
            conn.write_all(&request, limit).await?;
            let mut status = [0u8; 2];
            read_exact(conn, &mut status, limit).await?;
            if status[1] != 0 {
                return Err(refused(
                    "the SOCKS5 proxy refused the username and password".into(),
                ));
            }
        }
        ([5, 0xff], _) | ([5, 2], None) => {
            return Err(refused(
                "the SOCKS5 proxy accepts none of our authentication methods".into(),
            ));
        }
        (other, _) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a SOCKS5 proxy (it answered {other:?})"),
            ));
        }
    }
    let mut request = vec![5, 1, 0];
    match dest.ip() {
        IpAddr::V4(ip) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
        }
    }
    request.extend_from_slice(&dest.port().to_be_bytes());
    conn.write_all(&request, limit).await?;
    let mut head = [0u8; 4];
    read_exact(conn, &mut head, limit).await?;
    if head[0] != 5 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a bad SOCKS5 reply",
        ));
    }
    if head[1] != 0 {
        let why = match head[1] {
            1 => "general failure",
            2 => "not allowed by its rules",
            3 => "network unreachable",
            4 => "host unreachable",
            5 => "connection refused",
            6 => "TTL expired",
            _ => "an error",
        };
        return Err(refused(format!(
            "the SOCKS5 proxy could not connect to {dest}: {why}"
        )));
    }
    // The address the proxy bound, which we do not need.
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            read_exact(conn, &mut len, limit).await?;
            usize::from(len[0]) + 2
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a bad SOCKS5 address type",
            ));
        }
    };
    let mut bound = [0u8; 258];
    read_exact(conn, &mut bound[..rest], limit).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_v2_headers_carry_both_ends() {
        let h = proxy_v2(
            "192.0.2.7:0".parse().unwrap(),
            "198.51.100.1:25".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 7]);
        assert_eq!(&h[20..24], &[198, 51, 100, 1]);
        assert_eq!(&h[24..], &[0, 0, 0, 25]);
        let h6 = proxy_v2(
            "[2001:db8::7]:0".parse().unwrap(),
            "[2001:db8::1]:25".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(h6.len(), 16 + 36);
        assert!(
            proxy_v2(
                "192.0.2.7:0".parse().unwrap(),
                "[2001:db8::1]:25".parse().unwrap()
            )
            .is_err()
        );
    }
}
