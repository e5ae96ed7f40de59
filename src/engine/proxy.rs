//! The PROXY protocol header (versions 1 and 2), which an L4 load balancer (HAProxy's
//! `send-proxy`/`send-proxy-v2`, nginx, Envoy, AWS NLB) writes at the start of each connection
//! to say who the client really is. Read before anything else, TLS included, and bounded.
//!
//! ```text
//! v1: "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"       (text, at most 107 bytes)
//!     "PROXY UNKNOWN ...\r\n"                                  (the balancer's own check)
//!
//! v2: +--------------------------------------+---------+---------+-------------+
//!     | signature "\r\n\r\n\0\r\nQUIT\n" (12) | ver|cmd | fam|prot| length (BE) |
//!     +--------------------------------------+---------+---------+-------------+
//!     | addresses (IPv4: 12, IPv6: 36, Unix: 216 bytes), then TLVs (skipped)    |
//!     +--------------------------------------------------------------------------+
//! ```
//!
//! Written from the specification (haproxy.org/download/2.6/doc/proxy-protocol.txt) rather
//! than taken from a crate: the parser is small, and framesock needs its own bounds and its
//! own "need more bytes" answer to read it from a socket with a deadline.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// The v2 signature.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the specification's bound).
pub const V1_MAX: usize = 107;
/// The most a v2 header may declare after its 16 fixed bytes: addresses and TLVs. The
/// specification allows 65,535; nothing a balancer sends comes near 4 KiB.
pub const V2_MAX_BODY: usize = 4096;

/// Where a proxied connection really comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The client's and the address it connected to, as the balancer saw them.
    Inet {
        client: SocketAddr,
        server: SocketAddr,
    },
    /// Unix sockets at the balancer (v2 only): the client's path.
    Unix { client: PathBuf },
    /// v2 `LOCAL` or v1 `UNKNOWN`: the balancer speaking for itself (a health check); the
    /// connection's own addresses stand.
    Local,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError(pub String);

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad PROXY protocol header: {}", self.0)
    }
}

impl std::error::Error for ProxyError {}

fn refuse<T>(why: impl Into<String>) -> Result<T, ProxyError> {
    Err(ProxyError(why.into()))
}

/// Reads a header from the start of `input`: `Ok(None)` while more bytes are needed, else the
/// source and the header's length (the connection's own bytes start after it). Never reads
/// past a header's bound.
pub fn parse(input: &[u8]) -> Result<Option<(Source, usize)>, ProxyError> {
    let Some(&first) = input.first() else {
        return Ok(None);
    };
    if first == b'P' {
        return parse_v1(input);
    }
    if first == b'\r' {
        return parse_v2(input);
    }
    refuse("the connection did not start with one (PROXY protocol is required here)")
}

fn parse_v1(input: &[u8]) -> Result<Option<(Source, usize)>, ProxyError> {
    let seen = &input[..input.len().min(V1_MAX)];
    let prefix = b"PROXY ";
    if !prefix.starts_with(&seen[..seen.len().min(prefix.len())]) {
        return refuse("the connection did not start with one (PROXY protocol is required here)");
    }
    let Some(end) = seen.windows(2).position(|pair| pair == b"\r\n") else {
        if seen.len() >= V1_MAX {
            return refuse(format!("a v1 header longer than {V1_MAX} bytes"));
        }
        if seen.contains(&b'\n') || seen.contains(&0) {
            return refuse("a v1 header with a stray line end or NUL");
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&seen[prefix.len()..end])
        .or_else(|_| refuse("a v1 header that is not ASCII"))?;
    let length = end + 2;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["UNKNOWN", ..] => Ok(Some((Source::Local, length))),
        [family @ ("TCP4" | "TCP6"), client, server, client_port, server_port] => {
            let ip = |text: &str| -> Result<IpAddr, ProxyError> {
                let ip: IpAddr = text
                    .parse()
                    .or_else(|_| refuse(format!("not an IP address: {text:?}")))?;
                match (*family, ip) {
                    ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
                    _ => refuse(format!("{text} is not a {family} address")),
                }
            };
            let port = |text: &str| -> Result<u16, ProxyError> {
                // Decimal, no sign, no leading zeros (as the specification writes them).
                if text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
                    return refuse(format!("not a port: {text:?}"));
                }
                text.parse()
                    .or_else(|_| refuse(format!("not a port: {text:?}")))
            };
            let client = SocketAddr::new(ip(client)?, port(client_port)?);
            let server = SocketAddr::new(ip(server)?, port(server_port)?);
            Ok(Some((Source::Inet { client, server }, length)))
        }
        _ => refuse(format!("a v1 header of an unknown form: {line:?}")),
    }
}

fn parse_v2(input: &[u8]) -> Result<Option<(Source, usize)>, ProxyError> {
    let known = input.len().min(V2_SIGNATURE.len());
    if input[..known] != V2_SIGNATURE[..known] {
        return refuse("the connection did not start with one (PROXY protocol is required here)");
    }
    if input.len() < 16 {
        return Ok(None);
    }
    let (version, command) = (input[12] >> 4, input[12] & 0x0F);
    if version != 2 {
        return refuse(format!("version {version} (only 1 and 2 exist)"));
    }
    let declared = usize::from(u16::from_be_bytes([input[14], input[15]]));
    if declared > V2_MAX_BODY {
        return refuse(format!(
            "a v2 header declaring {declared} bytes (framesock takes at most {V2_MAX_BODY})"
        ));
    }
    let length = 16 + declared;
    if input.len() < length {
        return Ok(None);
    }
    let body = &input[16..length];
    match command {
        0 => return Ok(Some((Source::Local, length))),
        1 => {}
        other => return refuse(format!("a v2 command {other} (only LOCAL and PROXY exist)")),
    }
    let (family, transport) = (input[13] >> 4, input[13] & 0x0F);
    let short = |needed: usize| {
        refuse::<Option<(Source, usize)>>(format!(
            "a v2 header too short for its addresses ({declared} bytes, {needed} needed)"
        ))
    };
    if transport > 2 {
        return refuse(format!("a v2 transport {transport}"));
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let source = match family {
        // AF_UNSPEC: the receiver must ignore the addresses and use the connection's own.
        0 => Source::Local,
        1 => {
            if body.len() < 12 {
                return short(12);
            }
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[at],
                    body[at + 1],
                    body[at + 2],
                    body[at + 3],
                ))
            };
            Source::Inet {
                client: SocketAddr::new(ip(0), port(8)),
                server: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 => {
            if body.len() < 36 {
                return short(36);
            }
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Source::Inet {
                client: SocketAddr::new(ip(0), port(32)),
                server: SocketAddr::new(ip(16), port(34)),
            }
        }
        3 => {
            if body.len() < 216 {
                return short(216);
            }
            use std::os::unix::ffi::OsStrExt;
            let raw = &body[..108];
            let path = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
            Source::Unix {
                client: PathBuf::from(std::ffi::OsStr::from_bytes(path)),
            }
        }
        other => return refuse(format!("a v2 address family {other}")),
    };
    Ok(Some((source, length)))
}

/// A range of addresses a PROXY header is taken from: `10.0.0.0/8`, `2001:db8::/32`, or one
/// address (`192.0.2.7`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range; an IPv4 address seen as IPv6 (`::ffff:192.0.2.7`, as a
    /// dual-stack socket reports it) counts as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("not an address or a CIDR range: {text:?} (e.g. '10.0.0.0/8', '::1')");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| bad())?;
        let most = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => most,
            Some(prefix) => match prefix.trim().parse::<u8>() {
                Ok(prefix) if prefix <= most => prefix,
                _ => return Err(bad()),
            },
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cidr_ranges() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!(!all.contains("2001:db8::1".parse().unwrap()));
        assert!("::/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/", "::1/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(net.to_string(), "10.1.0.0/16");
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family << 4 | 1);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let header = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nrest";
        let (source, length) = parse(header).unwrap().unwrap();
        assert_eq!(length, header.len() - 4);
        assert_eq!(
            source,
            Source::Inet {
                client: "192.0.2.1:56324".parse().unwrap(),
                server: "198.51.100.2:443".parse().unwrap()
            }
        );
        let (source, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            source,
            Source::Inet {
                client: "[2001:db8::1]:1".parse().unwrap(),
                server: "[2001:db8::2]:2".parse().unwrap()
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((Source::Local, 15))
        );
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let endless = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 200]].concat();
        assert!(parse(&endless).is_err());
        assert_eq!(parse(b"PROXY TCP4 192.0").unwrap(), None);
    }

    #[test]
    fn v2_inet_inet6_unix_local() {
        let body = [192, 0, 2, 1, 198, 51, 100, 2, 0xDC, 0x04, 0x01, 0xBB];
        let header = v2(1, 1, &body);
        assert_eq!(
            parse(&header).unwrap(),
            Some((
                Source::Inet {
                    client: "192.0.2.1:56324".parse().unwrap(),
                    server: "198.51.100.2:443".parse().unwrap()
                },
                28
            ))
        );
        let mut body6 = vec![0u8; 36];
        body6[15] = 1;
        body6[31] = 2;
        body6[33] = 7;
        let (source, _) = parse(&v2(1, 2, &body6)).unwrap().unwrap();
        assert_eq!(
            source,
            Source::Inet {
                client: "[::1]:7".parse().unwrap(),
                server: "[::2]:0".parse().unwrap()
            }
        );
        let mut unix = vec![0u8; 216];
        unix[..9].copy_from_slice(b"/run/a.sk");
        let (source, _) = parse(&v2(1, 3, &unix)).unwrap().unwrap();
        assert_eq!(
            source,
            Source::Unix {
                client: "/run/a.sk".into()
            }
        );
        // LOCAL (HAProxy's own checks): no addresses, TLVs skipped all the same.
        assert_eq!(
            parse(&v2(0, 0, &[1, 0, 1, 9])).unwrap(),
            Some((Source::Local, 20))
        );
        // TLVs after the addresses are skipped.
        let with_tlv = v2(1, 1, &[body.as_slice(), &[0x04, 0, 1, 0]].concat());
        assert_eq!(parse(&with_tlv).unwrap().unwrap().1, with_tlv.len());
    }

    #[test]
    fn v2_refusals() {
        let mut wrong_version = v2(1, 1, &[0; 12]);
        wrong_version[12] = 0x11;
        assert!(parse(&wrong_version).is_err());
        assert!(parse(&v2(2, 1, &[0; 12])).is_err());
        assert!(parse(&v2(1, 1, &[0; 11])).is_err());
        assert!(parse(&v2(1, 2, &[0; 35])).is_err());
        assert!(parse(&v2(1, 4, &[0; 12])).is_err());
        let mut huge = v2(1, 1, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(parse(&huge).is_err());
    }

    fn valid_headers() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (
                any::<[u8; 4]>(),
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<u16>()
            )
                .prop_map(|(a, b, p, q)| {
                    format!(
                        "PROXY TCP4 {} {} {p} {q}\r\n",
                        Ipv4Addr::from(a),
                        Ipv4Addr::from(b)
                    )
                    .into_bytes()
                }),
            (
                any::<[u8; 16]>(),
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<u16>()
            )
                .prop_map(|(a, b, p, q)| {
                    format!(
                        "PROXY TCP6 {} {} {p} {q}\r\n",
                        Ipv6Addr::from(a),
                        Ipv6Addr::from(b)
                    )
                    .into_bytes()
                }),
            proptest::collection::vec(any::<u8>(), 12..64).prop_map(|body| v2(1, 1, &body)),
            proptest::collection::vec(any::<u8>(), 36..80).prop_map(|body| v2(1, 2, &body)),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|body| v2(0, 0, &body)),
        ]
    }

    proptest! {
        /// Any bytes: an answer, never a panic, and never a length past what was given.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, length))) = parse(&bytes) {
                prop_assert!(length <= bytes.len());
            }
        }

        /// A valid header cut anywhere asks for more; whole, it parses to its own length, and
        /// what follows it is left alone.
        #[test]
        fn valid_headers_cut_anywhere(header in valid_headers(), cut in 0usize..200, rest in proptest::collection::vec(any::<u8>(), 0..20)) {
            let cut = cut % header.len();
            prop_assert_eq!(parse(&header[..cut]), Ok(None));
            let whole = parse(&[header.as_slice(), &rest].concat()).unwrap().unwrap();
            prop_assert_eq!(whole.1, header.len());
        }

        /// Random bytes after a v2 signature: refused or parsed, within bounds.
        #[test]
        fn random_after_the_v2_signature(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
            let bytes = [V2_SIGNATURE.as_slice(), &tail].concat();
            if let Ok(Some((_, length))) = parse(&bytes) {
                prop_assert!(length <= bytes.len() && length <= 16 + V2_MAX_BODY);
            }
        }
    }
}
