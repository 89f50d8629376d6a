//! The PROXY protocol header an L4 balancer writes before the client's
//! first byte (HAProxy's spec, versions 1 and 2), so that the gateway sees
//! the client's address rather than the balancer's.
//!
//! The header is read whole before anything else is; the bytes after it
//! go back to the stream for TLS or HTTP. The grammar is `ppp`'s; this
//! module decides how much to read, which version the first bytes
//! announce, and what the header means for the connection.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use ppp::{v1, v2};
use serde::Deserialize;

/// `proxy_protocol` on a listener group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// Never read a header: the TCP peer is the client.
    #[default]
    Off,
    /// A trusted peer may send one; without it the TCP peer is the client.
    Optional,
    /// Every connection starts with one, from a trusted peer.
    Required,
}

/// The addresses allowed to send a PROXY header (`trusted_proxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses CIDRs (a bare address is a /32 or /128).
    pub fn parse(list: &[String]) -> Result<Self, String> {
        list.iter()
            .map(|s| {
                IpNet::from_str(s.trim())
                    .or_else(|_| IpAddr::from_str(s.trim()).map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not an address or a CIDR block"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A v4-mapped IPv6 peer is matched as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// What a complete header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client the balancer relayed.
    Client(SocketAddr),
    /// `LOCAL` (v2), `UNKNOWN` (v1), or a family without an IP address:
    /// the balancer's own connection, such as its health check. The TCP
    /// peer stays the client.
    Peer,
}

/// The first bytes of a connection, as far as they have arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes.
    Header { len: usize, source: Source },
    /// A header's beginning: read more.
    Partial,
    /// Not the start of any PROXY header.
    Absent,
    /// A header, but malformed: too long, a bad signature, version,
    /// length or address, or garbage inside the line.
    Invalid,
}

const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line the spec allows, CRLF included.
pub const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
/// Balancers' TLVs (AWS's endpoint id, GCP's PSC data, HAProxy's SSL
/// fields) take tens of bytes; a bigger header is refused rather than
/// read into memory.
pub const V2_MAX: usize = 4096;

/// Judges the bytes read so far from the start of a connection.
pub fn parse(buf: &[u8]) -> Parsed {
    if starts_like(buf, V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if starts_like(buf, V1_PREFIX) {
        return parse_v1(buf);
    }
    Parsed::Absent
}

/// How many bytes to read next from a connection that started with `buf`
/// (judged `Partial`), so as never to read past a header: at first enough
/// to tell the versions apart, then a v2 header's declared length, and a
/// v1 line byte by byte (reads are served from the stream's buffer).
pub fn next_read(buf: &[u8]) -> usize {
    const TELLS_APART: usize = V1_PREFIX.len();
    if buf.len() < TELLS_APART {
        TELLS_APART - buf.len()
    } else if !starts_like(buf, V2_SIGNATURE) {
        1
    } else if buf.len() < V2_FIXED {
        V2_FIXED - buf.len()
    } else {
        v2_len(buf).saturating_sub(buf.len()).max(1)
    }
}

/// A v2 header's whole length, from its fixed part (`buf` holds it).
fn v2_len(buf: &[u8]) -> usize {
    V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]))
}

/// Whether `buf` and `prefix` agree on their common length (an empty
/// `buf` agrees with everything).
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < V2_FIXED {
        return Parsed::Partial;
    }
    let len = v2_len(buf);
    if len > V2_MAX {
        return Parsed::Invalid;
    }
    if buf.len() < len {
        return Parsed::Partial;
    }
    let Ok(header) = v2::Header::try_from(&buf[..len]) else {
        return Parsed::Invalid;
    };
    let source = match (header.command, header.protocol, header.addresses) {
        (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv4(a)) => {
            Source::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv6(a)) => {
            Source::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        _ => Source::Peer,
    };
    Parsed::Header { len, source }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    if buf.len() < V1_PREFIX.len() {
        return Parsed::Partial;
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = memchr::memchr(b'\n', window) else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid
        } else {
            Parsed::Partial
        };
    };
    let line = &buf[..=end];
    match v1::Header::try_from(line) {
        // ppp stops at the first CR: the line must end there.
        Ok(h) if h.header.len() == line.len() => Parsed::Header {
            len: line.len(),
            source: match h.addresses {
                v1::Addresses::Tcp4(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                v1::Addresses::Tcp6(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                v1::Addresses::Unknown => Source::Peer,
            },
        },
        _ => Parsed::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(s: &str) -> Source {
        Source::Client(s.parse().unwrap())
    }

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        let len = (addresses.len() + tlvs.len()) as u16;
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    #[test]
    fn v1_lines_give_their_source() {
        let line = b"PROXY TCP4 127.0.0.23 10.0.0.1 40000 443\r\nGET /";
        assert_eq!(
            parse(line),
            Parsed::Header {
                len: line.len() - 5,
                source: client("127.0.0.23:40000")
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        assert_eq!(
            parse(v6),
            Parsed::Header {
                len: v6.len(),
                source: client("[2001:db8::1]:1")
            }
        );
        let unknown = b"PROXY UNKNOWN\r\n";
        assert_eq!(
            parse(unknown),
            Parsed::Header {
                len: unknown.len(),
                source: Source::Peer
            }
        );
    }

    #[test]
    fn v1_partial_long_and_garbled_lines() {
        let line = b"PROXY TCP4 127.0.0.23 10.0.0.1 40000 443\r\n";
        for cut in 0..line.len() - 1 {
            assert_eq!(parse(&line[..cut]), Parsed::Partial, "cut at {cut}");
        }
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(V1_MAX, b'1');
        assert_eq!(parse(&long), Parsed::Invalid, "no CRLF within 107 bytes");
        for bad in [
            &b"PROXY TCP4 127.0.0.23 10.0.0.1 40000 443 extra\r\n"[..],
            b"PROXY TCP4 127.0.0.23 10.0.0.1 40000\r\n",
            b"PROXY TCP4 300.0.0.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP5 127.0.0.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 127.0.0.1 10.0.0.1 1 2\n",
            b"PROXY TCP4 127.0.0.1 10.0.0.1 1 2\rX\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Parsed::Invalid,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn v2_headers_give_their_source() {
        let v4 = [127, 0, 0, 23, 10, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb];
        let h = v2(1, 0x11, &v4, &[]);
        assert_eq!(
            parse(&h),
            Parsed::Header {
                len: 28,
                source: client("127.0.0.23:40000")
            }
        );
        // A TLV (AWS's endpoint id) is skipped over.
        let tlv = [0xea, 0x00, 0x04, 0x01, b'v', b'p', b'c'];
        let h = v2(1, 0x11, &v4, &tlv);
        assert!(matches!(parse(&h), Parsed::Header { len: 35, .. }));
        let mut v6 = [0u8; 36];
        v6[..16].copy_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        v6[32..34].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &v6, &[])),
            Parsed::Header {
                len: 52,
                source: client("[2001:db8::1]:1")
            }
        );
        let local = v2(0, 0x00, &[], &[]);
        assert_eq!(
            parse(&local),
            Parsed::Header {
                len: 16,
                source: Source::Peer
            }
        );
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Parsed::Partial, "cut at {cut}");
        }
    }

    #[test]
    fn v2_bad_version_command_length_or_addresses() {
        let v4 = [127, 0, 0, 1, 10, 0, 0, 1, 0, 1, 0, 2];
        let mut bad_version = v2(1, 0x11, &v4, &[]);
        bad_version[12] = 0x11;
        assert_eq!(parse(&bad_version), Parsed::Invalid);
        let mut bad_command = v2(1, 0x11, &v4, &[]);
        bad_command[12] = 0x2f;
        assert_eq!(parse(&bad_command), Parsed::Invalid);
        // IPv4 needs 12 address bytes.
        assert_eq!(parse(&v2(1, 0x11, &v4[..6], &[])), Parsed::Invalid);
        let mut huge = v2(1, 0x11, &v4, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&huge), Parsed::Invalid, "over V2_MAX is not read");
    }

    #[test]
    fn reads_never_go_past_a_header() {
        let tlv = [0xea, 0x00, 0x04, 0x01, b'v', b'p', b'c'];
        let v4 = [127, 0, 0, 23, 10, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb];
        let shortest_v1 = b"PROXY UNKNOWN\r\n".to_vec();
        for header in [
            v2(1, 0x11, &v4, &tlv),
            v2(0, 0x00, &[], &[]),
            shortest_v1,
            b"PROXY TCP4 127.0.0.23 10.0.0.1 40000 443\r\n".to_vec(),
        ] {
            let mut wire = header.clone();
            wire.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            let mut at = 0;
            while parse(&wire[..at]) == Parsed::Partial {
                at += next_read(&wire[..at]);
            }
            assert_eq!(at, header.len(), "{:?}", String::from_utf8_lossy(&header));
        }
    }

    #[test]
    fn anything_else_is_not_a_header() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Absent);
        assert_eq!(parse(&[0x16, 0x03, 0x01]), Parsed::Absent, "a ClientHello");
        assert_eq!(parse(b"PROXZ"), Parsed::Absent);
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Parsed::Absent);
        assert_eq!(parse(b""), Parsed::Partial);
        assert_eq!(parse(b"PRO"), Parsed::Partial);
    }

    #[test]
    fn trusted_proxies_match_cidrs_and_mapped_addresses() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "127.0.0.1".into()]).unwrap();
        assert!(t.contains("10.200.0.1".parse().unwrap()));
        assert!(t.contains("127.0.0.1".parse().unwrap()));
        assert!(t.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!t.contains("127.0.0.23".parse().unwrap()));
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["nope".into()]).is_err());
    }
}
