//! Slow and greedy clients over raw sockets: a head trickled byte by byte
//! (slowloris), a body below the minimum rate, and more connections from
//! one address than it may hold. None may reach the router.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Reads until the gateway closes (or 10 s pass); returns what arrived.
async fn read_until_closed(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await {
        Ok(_) => Some(buf),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_head_is_cut_at_the_header_deadline() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [server]
            request_header_timeout_ms = 1000
        },
        ..Options::default()
    })
    .await;
    let models = format!(
        "GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: {}\r\n\r\n",
        gw.keys.acme_key
    );

    // Slowloris: every byte arrives well inside Pingora's per-read timeout,
    // yet the head as a whole never completes.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let mut cut = None;
    for b in models.bytes().take(60) {
        if s.write_all(&[b]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(150), s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = Some(started.elapsed());
                break;
            }
            Ok(Ok(n)) => panic!("answered a partial head: {:?}", &probe[..n]),
            Err(_) => {}
        }
    }
    let cut = cut.expect("a trickled head was still open after 60 bytes (9 s)");
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_secs(3),
        "cut after {cut:?}, deadline 1 s"
    );

    // A connection that never sends a byte is closed too.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    assert!(read_until_closed(&mut s)
        .await
        .is_some_and(|b| b.is_empty()));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        metric(
            &gw,
            "portcullis_connection_rejections_total{reason=\"header_timeout\"}"
        )
        .await
            >= 2
    );

    // A slow but whole head in time is served, and a kept-alive connection
    // may idle past the deadline: the next head's clock starts with its
    // first byte.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let (a, b) = models.as_bytes().split_at(20);
    s.write_all(a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(b).await.unwrap();
    assert_eq!(read_keep_alive(&mut s).await, Some((200, false)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(models.as_bytes()).await.unwrap();
    assert_eq!(read_keep_alive(&mut s).await, Some((200, false)));
    // ... and the second head gets the same deadline.
    s.write_all(b"GET /v1/models HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    assert!(read_until_closed(&mut s)
        .await
        .is_some_and(|b| b.is_empty()));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(gw.router_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_below_the_minimum_rate_gets_408_and_reaches_nothing() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [body]
            min_bytes_per_second = 1000
        },
        ..Options::default()
    })
    .await;
    let content = format!(
        r#"{{"model":"m-small","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(3900)
    );
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nx-api-key: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        gw.keys.acme_key,
        content.len()
    );

    // 100 bytes every 300 ms is about 330 B/s: cut once the first second
    // of grace and the bytes it earned are spent.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    for part in content.as_bytes().chunks(100) {
        if s.write_all(part).await.is_err() {
            break;
        }
        let mut probe = [0u8; 1];
        if let Ok(Ok(1)) =
            tokio::time::timeout(Duration::from_millis(300), s.peek(&mut probe)).await
        {
            break;
        }
    }
    let elapsed = started.elapsed();
    let answer = read_until_closed(&mut s).await.expect("closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"request_timeout\""), "{text}");
    assert!(text.contains("too slowly"), "{text}");
    assert!(elapsed < Duration::from_secs(4), "cut after {elapsed:?}");

    // A body with a pause, but ahead of the rate, is forwarded.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let (a, b) = content.as_bytes().split_at(2000);
    s.write_all(a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b).await.unwrap();
    assert_eq!(read_keep_alive(&mut s).await.map(|r| r.0), Some(200));
    assert_eq!(
        gw.router_count(),
        1,
        "only the request in time reached the router"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_client_address_are_capped() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [server]
            max_connections_per_ip = 3
        },
        ..Options::default()
    })
    .await;
    let models = format!(
        "GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: {}\r\n\r\n",
        gw.keys.acme_key
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(models.as_bytes()).await.unwrap();
        assert_eq!(read_keep_alive(&mut s).await, Some((200, false)));
        held.push(s);
    }
    // The fourth is closed without an answer, and stays refused while the
    // others are open.
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let _ = s.write_all(models.as_bytes()).await;
        let got = read_until_closed(&mut s).await;
        assert!(
            got.as_ref().is_some_and(|b| b.is_empty()),
            "a fourth connection was served: {got:?}"
        );
    }
    assert_eq!(
        metric(
            &gw,
            "portcullis_connection_rejections_total{reason=\"per_ip_limit\"}"
        )
        .await,
        2
    );
    // Closing one frees its slot.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(models.as_bytes()).await.unwrap();
        if read_keep_alive(&mut s).await == Some((200, false)) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
