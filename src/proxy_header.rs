//! The PROXY protocol header (HAProxy's, v1 text or v2 binary) that a
//! TCP load balancer sends before a connection's own bytes, naming the
//! client it accepted. Behind such a balancer (AWS NLB, HAProxy in TCP
//! mode, a Kubernetes service that rewrites addresses) every connection
//! comes from the balancer: without the header every citizen would share
//! its address, and with it one per-address budget of tickets.
//!
//! Read to the header's exact end and no further, so what follows (TLS,
//! HTTP) is left on the socket for the usual path; parsed by `ppp`.

use std::io;
use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// "PROXY UNKNOWN\r\n", the shortest v1 header.
const V1_MIN: usize = 15;
/// The longest v1 header, by the specification.
const V1_MAX: usize = 107;

/// What a balancer's header says of the connection it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The client; None when the balancer speaks for itself (v2 LOCAL:
    /// its own health checks) or does not know (v1 UNKNOWN, v2 UNSPEC):
    /// the peer's address then stands, as the specification says.
    pub client: Option<SocketAddr>,
    /// The client spoke TLS to the balancer, which ended it (a v2 header's
    /// PP2_TYPE_SSL with PP2_CLIENT_SSL, as HAProxy's
    /// `send-proxy-v2-ssl` writes): the person's browser is on HTTPS
    /// though the bytes reach varco in clear.
    pub tls: bool,
}

/// Reads a connection's PROXY header, to its exact end.
pub async fn read(stream: &mut TcpStream) -> io::Result<Accepted> {
    let header = read_header(stream).await?;
    parse(&header)
}

/// PP2_TYPE_SSL, and in its first byte PP2_CLIENT_SSL.
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_CLIENT_SSL: u8 = 0x01;

/// The header's bytes, exactly.
async fn read_header(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; V1_MIN];
    stream.read_exact(&mut head).await?;
    if head.starts_with(b"PROXY ") {
        if head.ends_with(b"\r\n") {
            return Ok(head);
        }
        // The rest of the line usually came in the same segment: peek at
        // it, then take exactly up to its end.
        let mut rest = [0u8; V1_MAX - V1_MIN];
        let seen = stream.peek(&mut rest).await?;
        let mut probe = Vec::with_capacity(V1_MAX);
        probe.push(head[V1_MIN - 1]);
        probe.extend_from_slice(&rest[..seen]);
        if let Some(at) = memchr::memmem::find(&probe, b"\r\n") {
            let mut tail = vec![0u8; at + 1];
            stream.read_exact(&mut tail).await?;
            head.extend_from_slice(&tail);
            return Ok(head);
        }
        // Split across segments: a byte at a time, to the line's end.
        while !head.ends_with(b"\r\n") {
            if head.len() >= V1_MAX {
                return Err(bad("a v1 PROXY header longer than 107 bytes"));
            }
            head.push(stream.read_u8().await?);
        }
        return Ok(head);
    }
    if head[..V2_SIGNATURE.len()] != V2_SIGNATURE[..] {
        return Err(bad("no PROXY protocol header"));
    }
    // v2: 16 fixed bytes, the last two the length of what follows.
    head.push(stream.read_u8().await?);
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut rest = vec![0u8; len];
    stream.read_exact(&mut rest).await?;
    head.extend_from_slice(&rest);
    Ok(head)
}

fn parse(header: &[u8]) -> io::Result<Accepted> {
    use ppp::{v1, v2, HeaderResult};
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(Accepted {
            client: match h.addresses {
                v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Unknown => None,
            },
            tls: false,
        }),
        HeaderResult::V2(Ok(h)) => {
            let client = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => Some((a.source_address, a.source_port).into()),
                (_, v2::Addresses::IPv6(a)) => Some((a.source_address, a.source_port).into()),
                (_, v2::Addresses::Unix(_) | v2::Addresses::Unspecified) => None,
            };
            // A TLV varco does not know (AWS's, a CRC) is passed over; a
            // malformed list only costs the TLS mark, never the client.
            let tls = client.is_some()
                && h.tlvs().map_while(Result::ok).any(|t| {
                    t.kind == PP2_TYPE_SSL
                        && t.value.first().is_some_and(|c| c & PP2_CLIENT_SSL != 0)
                });
            Ok(Accepted { client, tls })
        }
        HeaderResult::V1(Err(e)) => Err(bad(&format!("a bad v1 PROXY header: {e}"))),
        HeaderResult::V2(Err(e)) => Err(bad(&format!("a bad v2 PROXY header: {e}"))),
    }
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[test]
    fn each_form_names_its_client() {
        let v4: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:5000".parse().unwrap();
        let client = |h: &[u8]| parse(h).unwrap().client;
        assert_eq!(
            client(b"PROXY TCP4 198.51.100.7 10.0.0.1 5000 443\r\n"),
            Some(v4)
        );
        assert_eq!(
            client(b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 443\r\n"),
            Some(v6)
        );
        assert_eq!(client(b"PROXY UNKNOWN\r\n"), None);
        let mut a = vec![198, 51, 100, 7, 10, 0, 0, 1];
        a.extend_from_slice(&5000u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(client(&v2(1, 0x11, &a)), Some(v4));
        assert_eq!(client(&v2(0, 0x00, &[])), None, "LOCAL");
        assert!(parse(b"PROXY TCP4 nonsense\r\n").is_err());
        assert!(parse(&v2(1, 0x11, &a[..5])).is_err(), "short addresses");
    }

    #[test]
    fn the_ssl_tlv_says_the_client_spoke_tls() {
        let mut a = vec![198, 51, 100, 7, 10, 0, 0, 1];
        a.extend_from_slice(&5000u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        let tlv = |kind: u8, value: &[u8]| {
            let mut t = vec![kind];
            t.extend_from_slice(&(value.len() as u16).to_be_bytes());
            t.extend_from_slice(value);
            t
        };
        // client PP2_CLIENT_SSL, verify 0, a PP2_SUBTYPE_SSL_VERSION.
        let ssl = tlv(
            PP2_TYPE_SSL,
            &[
                1, 0, 0, 0, 0, 0x21, 0, 7, b'T', b'L', b'S', b'v', b'1', b'.', b'3',
            ],
        );
        let aws = tlv(0xEA, &[1, b'v', b'p', b'c', b'e']);
        let with = |tlvs: &[&[u8]]| {
            let mut body = a.clone();
            for t in tlvs {
                body.extend_from_slice(t);
            }
            parse(&v2(1, 0x11, &body)).unwrap()
        };
        assert!(with(&[&aws, &ssl]).tls, "after a TLV varco does not know");
        assert!(with(&[&ssl]).client.is_some());
        assert!(!with(&[&aws]).tls, "no SSL TLV");
        assert!(!with(&[]).tls);
        let not_tls = tlv(PP2_TYPE_SSL, &[0, 0, 0, 0, 0]);
        assert!(!with(&[&not_tls]).tls, "PP2_CLIENT_SSL not set");
        assert!(
            !parse(b"PROXY TCP4 198.51.100.7 10.0.0.1 5000 443\r\n")
                .unwrap()
                .tls
        );
    }
}
