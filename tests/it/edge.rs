//! The edge behind an L4 balancer, over real sockets from two loopback
//! addresses: 127.0.0.1 plays the trusted balancer, which writes the PROXY
//! header itself here; 127.0.0.23 is a client reaching the gateway
//! directly. The header's source must become the client address for
//! `x-forwarded-for`, the auth-failure limit and the connection cap; bad
//! headers and slow handshakes are closed before any HTTP, counted, and
//! never reach the router.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use pingora::tls::ssl::{SslConnector, SslMethod};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_openssl::SslStream;

use crate::common::*;

const CHAT: &str = "/v1/chat/completions";
const BALANCER: &str = "127.0.0.1";
const DIRECT: &str = "127.0.0.23";

async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// A v1 line for a TCP4 client.
fn v1(client: &str) -> Vec<u8> {
    let (ip, port) = client.split_once(':').unwrap();
    format!("PROXY TCP4 {ip} 10.0.0.1 {port} 443\r\n").into_bytes()
}

/// A v2 header, written byte by byte as the spec lays it out: `PROXY`
/// over TCP4 from `client`, or `LOCAL` (the balancer's own connection).
fn v2(client: Option<&str>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match client {
        Some(c) => {
            let a: std::net::SocketAddrV4 = c.parse().unwrap();
            h.extend_from_slice(&[0x21, 0x11, 0, 12]);
            h.extend_from_slice(&a.ip().octets());
            h.extend_from_slice(&[10, 0, 0, 1]);
            h.extend_from_slice(&a.port().to_be_bytes());
            h.extend_from_slice(&443u16.to_be_bytes());
        }
        None => h.extend_from_slice(&[0x20, 0x00, 0, 0]),
    }
    h
}

fn chat(gw: &Gateway) -> Vec<u8> {
    post(CHAT, &chat_body())
        .bearer(&gw.keys.token("acme"))
        .build()
}

/// What the router was told the client was, for its latest request.
fn forwarded_for(gw: &Gateway) -> String {
    let reqs = gw.router().requests();
    let last = reqs.last().expect("the router got the request");
    last.header("x-forwarded-for")
        .unwrap_or_default()
        .to_string()
}

/// A connection `src` opens, sending `prefix` and then `request`.
async fn send_from(gw: &Gateway, src: &str, prefix: &[u8], request: &[u8]) -> Option<Response> {
    let mut s = connect_from(src, gw.addr).await;
    s.write_all(prefix).await.ok()?;
    send_on(s, request).await.ok()
}

/// Whether the gateway closes `s` without a byte, and how soon.
async fn closed_within(s: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = Vec::new();
    match tokio::time::timeout(limit, s.read_to_end(&mut buf)).await {
        Ok(_) if buf.is_empty() => Some(started.elapsed()),
        Ok(_) => panic!("answered: {:?}", String::from_utf8_lossy(&buf)),
        Err(_) => None,
    }
}

async fn rejections(gw: &Gateway, reason: &str) -> u64 {
    metric(
        gw,
        &format!("portcullis_connection_rejections_total{{reason=\"{reason}\"}}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_header_gives_the_client_address_everywhere() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [server]
            proxy_protocol = "required"
            trusted_proxies = ["127.0.0.1/32"]
            max_connections_per_ip = 2
            request_header_timeout_ms = 1500
            [limits]
            auth_failures_per_ip_per_minute = 2
        },
        ..Options::default()
    })
    .await;

    // Both versions: the header's source is what the router is told.
    let r = send_from(&gw, BALANCER, &v1("198.51.100.7:40000"), &chat(&gw)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
    assert_eq!(forwarded_for(&gw), "198.51.100.7");
    let r = send_from(&gw, BALANCER, &v2(Some("203.0.113.9:5000")), &chat(&gw)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
    assert_eq!(forwarded_for(&gw), "203.0.113.9");
    // LOCAL: the balancer's own connection keeps the TCP peer.
    let r = send_from(&gw, BALANCER, &v2(None), &chat(&gw)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
    assert_eq!(forwarded_for(&gw), BALANCER);
    let served = gw.router_count();

    // Header and request in one write, as a balancer sends them.
    let mut both = v2(Some("203.0.113.10:1"));
    both.extend_from_slice(&chat(&gw));
    let r = send_from(&gw, BALANCER, &both, b"").await;
    assert_eq!(r.map(|r| r.status), Some(200));
    assert_eq!(forwarded_for(&gw), "203.0.113.10");
    let served = served + 1;

    // Closed before any HTTP, each counted by its reason.
    let refused: [(&str, Vec<u8>, &str); 4] = [
        (BALANCER, Vec::new(), "missing_proxy_header"),
        (DIRECT, v1("198.51.100.7:1"), "untrusted_proxy"),
        (
            BALANCER,
            b"PROXY TCP4 198.51.100.7 10.0.0.1 1 443 extra\r\n".to_vec(),
            "invalid_proxy_header",
        ),
        (
            BALANCER,
            {
                let mut h = v2(Some("198.51.100.7:1"));
                h[12] = 0x31; // version 3
                h
            },
            "invalid_proxy_header",
        ),
    ];
    for (src, prefix, reason) in refused {
        let before = rejections(&gw, reason).await;
        let r = send_from(&gw, src, &prefix, &chat(&gw)).await;
        assert!(r.is_none(), "{reason}: answered {:?}", r.map(|r| r.status));
        assert_eq!(rejections(&gw, reason).await, before + 1, "{reason}");
    }
    assert_eq!(
        gw.router_count(),
        served,
        "nothing refused reached the router"
    );

    // Half a header, then silence: closed like a slowloris.
    let mut s = connect_from(BALANCER, gw.addr).await;
    s.write_all(&v1("198.51.100.7:1")[..20]).await.unwrap();
    let cut = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(
        cut.is_some_and(|d| d >= Duration::from_millis(1300)),
        "half a header closed after {cut:?}, deadline 1.5 s"
    );

    // The connection cap counts the header's source: two idle connections
    // from one client fill it, another client is still served.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from(BALANCER, gw.addr).await;
        s.write_all(&v1("198.51.100.50:1")).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = rejections(&gw, "per_ip_limit").await;
    let mut third = connect_from(BALANCER, gw.addr).await;
    third.write_all(&v1("198.51.100.50:2")).await.unwrap();
    let cut = closed_within(&mut third, Duration::from_secs(1)).await;
    assert!(
        cut.is_some(),
        "a third connection from one client is closed at once"
    );
    assert_eq!(rejections(&gw, "per_ip_limit").await, before + 1);
    let r = send_from(&gw, BALANCER, &v1("198.51.100.51:1"), &chat(&gw)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
    drop(held);

    // The auth-failure limit counts the header's source too.
    let guess = post(CHAT, &chat_body()).bearer("pcl_guess").build();
    for _ in 0..2 {
        let r = send_from(&gw, BALANCER, &v1("198.51.100.60:1"), &guess).await;
        assert_eq!(r.map(|r| r.code()), Some("invalid_api_key".into()));
    }
    let r = send_from(&gw, BALANCER, &v1("198.51.100.60:1"), &guess).await;
    assert_eq!(r.map(|r| r.code()), Some("auth_rate_limited".into()));
    let r = send_from(&gw, BALANCER, &v1("198.51.100.61:1"), &guess).await;
    assert_eq!(r.map(|r| r.code()), Some("invalid_api_key".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_header_is_read_only_from_a_trusted_peer() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [server]
            proxy_protocol = "optional"
            trusted_proxies = ["127.0.0.1"]
        },
        ..Options::default()
    })
    .await;
    let r = send_from(&gw, BALANCER, &v2(Some("203.0.113.9:5000")), &chat(&gw)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
    assert_eq!(forwarded_for(&gw), "203.0.113.9");
    // No header from the balancer: its own address.
    let r = send_from(&gw, BALANCER, b"", &chat(&gw)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
    assert_eq!(forwarded_for(&gw), BALANCER);
    // A direct client is itself, and its PROXY line is just bad HTTP.
    let r = send_from(&gw, DIRECT, b"", &chat(&gw)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
    assert_eq!(forwarded_for(&gw), DIRECT);
    let served = gw.router_count();
    let r = send_from(&gw, DIRECT, &v1("198.51.100.7:1"), &chat(&gw)).await;
    assert_ne!(r.map(|r| r.status), Some(200));
    assert_eq!(gw.router_count(), served);
    assert_eq!(rejections(&gw, "untrusted_proxy").await, 0);
}

/// A TLS client over `tcp`, trusting the dev CA.
async fn tls_on(gw: &Gateway, tcp: TcpStream) -> std::io::Result<SslStream<TcpStream>> {
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.set_ca_file(gw.dir.path().join("ca.crt")).unwrap();
    b.set_alpn_protos(b"\x08http/1.1").unwrap();
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    let mut s = SslStream::new(ssl, tcp).unwrap();
    Pin::new(&mut s)
        .connect()
        .await
        .map_err(std::io::Error::other)?;
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listeners_take_the_header_before_the_handshake_and_time_it() {
    let gw = Gateway::start_with(Options {
        tls: Some("none"),
        config: toml::toml! {
            [server]
            trusted_proxies = ["127.0.0.1"]
            max_connections_per_ip = 2
            [server.tls]
            proxy_protocol = "required"
            handshake_timeout_ms = 1000
        },
        ..Options::default()
    })
    .await;
    let tls_addr = gw.tls_addr.unwrap();

    // The header, then a real handshake: the source is the client.
    for header in [v1("198.51.100.7:1"), v2(Some("203.0.113.9:5000"))] {
        let mut tcp = connect_from(BALANCER, tls_addr).await;
        tcp.write_all(&header).await.unwrap();
        let s = tls_on(&gw, tcp).await.expect("handshake after the header");
        let r = send_on(s, &chat(&gw)).await.unwrap();
        assert_eq!(r.status, 200);
    }
    assert_eq!(forwarded_for(&gw), "203.0.113.9");
    let served = gw.router_count();

    // No header on a required listener: the ClientHello is refused.
    let before = rejections(&gw, "missing_proxy_header").await;
    let tcp = connect_from(BALANCER, tls_addr).await;
    assert!(tls_on(&gw, tcp).await.is_err());
    assert_eq!(rejections(&gw, "missing_proxy_header").await, before + 1);
    // A direct client may not send one at all.
    let before = rejections(&gw, "untrusted_proxy").await;
    let mut tcp = connect_from(DIRECT, tls_addr).await;
    tcp.write_all(&v1("198.51.100.7:1")).await.unwrap();
    assert!(tls_on(&gw, tcp).await.is_err());
    assert_eq!(rejections(&gw, "untrusted_proxy").await, before + 1);

    // The cap counts from accept: two connections that stall before their
    // handshake hold the client's slots, and a third is closed at once.
    let timeouts = rejections(&gw, "tls_handshake_timeout").await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut tcp = connect_from(BALANCER, tls_addr).await;
        tcp.write_all(&v1("198.51.100.50:1")).await.unwrap();
        stalled.push(tcp);
    }
    // And half a ClientHello (a record header promising 512 bytes).
    let mut half = connect_from(BALANCER, tls_addr).await;
    half.write_all(&v1("198.51.100.51:1")).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = connect_from(BALANCER, tls_addr).await;
    third.write_all(&v1("198.51.100.50:2")).await.unwrap();
    let cut = closed_within(&mut third, Duration::from_millis(800)).await;
    assert!(
        cut.is_some(),
        "the cap counts connections still in their handshake"
    );

    // The handshake deadline closes the stalled ones, and counts them.
    for s in stalled.iter_mut().chain([&mut half]) {
        let cut = closed_within(s, Duration::from_secs(4)).await;
        assert!(cut.is_some(), "a stalled handshake outlived its deadline");
    }
    assert_eq!(rejections(&gw, "tls_handshake_timeout").await, timeouts + 3);
    // Half a PROXY header on a TLS listener is timed by the same clock.
    let before = rejections(&gw, "header_timeout").await;
    let mut s = connect_from(BALANCER, tls_addr).await;
    s.write_all(b"PROXY TCP4 198.").await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(4))
        .await
        .is_some());
    assert_eq!(rejections(&gw, "header_timeout").await, before + 1);
    assert_eq!(gw.router_count(), served);

    // Their slots are free again.
    let mut tcp = connect_from(BALANCER, tls_addr).await;
    tcp.write_all(&v1("198.51.100.50:3")).await.unwrap();
    let s = tls_on(&gw, tcp).await.expect("a freed slot");
    assert_eq!(send_on(s, &chat(&gw)).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_cannot_hold_a_tls_connection_past_the_deadline() {
    let gw = Gateway::start_with(Options {
        tls: Some("none"),
        config: toml::toml! {
            [server.tls]
            handshake_timeout_ms = 1000
        },
        ..Options::default()
    })
    .await;
    let mut s = connect_from(DIRECT, gw.tls_addr.unwrap()).await;
    let cut = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(
        cut.is_some_and(|d| d >= Duration::from_millis(900)),
        "closed after {cut:?}, deadline 1 s"
    );
    assert_eq!(rejections(&gw, "tls_handshake_timeout").await, 1);
    // A real handshake from a direct client is unaffected.
    let tcp = connect_from(DIRECT, gw.tls_addr.unwrap()).await;
    let s = tls_on(&gw, tcp).await.expect("handshake");
    assert_eq!(send_on(s, &chat(&gw)).await.unwrap().status, 200);
    assert_eq!(forwarded_for(&gw), DIRECT);
}
