//! A fixed-rate HTTP/1.1 load generator for the isolation benchmark.
//!
//! wrk drives a closed loop (as fast as answers come back); measuring one
//! tenant's latency while another floods needs an open loop at a set rate.
//! Each connection sends on its own schedule and latency is measured from
//! the scheduled send time, so a stall is not hidden by coordinated
//! omission.
//!
//!   cargo run --release --example loadgen -- ADDR PATH TOKEN BODY_FILE RATE SECONDS CONNS
//!
//! Prints one JSON line: counts by status and latency percentiles in ms.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    request: Vec<u8>,
    rate: f64,
    duration: Duration,
    conns: usize,
}

fn args() -> Result<Args, String> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [addr, path, token, body_file, rate, secs, conns] = a.as_slice() else {
        return Err("usage: loadgen ADDR PATH TOKEN BODY_FILE RATE SECONDS CONNS".into());
    };
    let body = std::fs::read(body_file).map_err(|e| format!("{body_file}: {e}"))?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    Ok(Args {
        addr: addr.clone(),
        request,
        rate: rate.parse().map_err(|_| "RATE must be a number")?,
        duration: Duration::from_secs_f64(secs.parse().map_err(|_| "SECONDS must be a number")?),
        conns: conns.parse().map_err(|_| "CONNS must be a number")?,
    })
}

/// Reads one response; returns its status.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad response");
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(buf) {
            let status = resp.code.unwrap_or(0);
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .ok_or_else(bad)?;
            while buf.len() < head + len {
                let mut chunk = [0u8; 16384];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(bad());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..head + len);
            return Ok(status);
        }
        let mut chunk = [0u8; 16384];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn connection(args: &Args, offset: Duration) -> (Vec<f64>, BTreeMap<u16, u64>) {
    let interval = Duration::from_secs_f64(args.conns as f64 / args.rate);
    let mut latencies = Vec::new();
    let mut statuses = BTreeMap::new();
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::new();
    let start = Instant::now() + offset;
    let mut i = 0u32;
    loop {
        let scheduled = start + interval * i;
        if scheduled > start + args.duration {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        // A gateway closes the connection after refusing a request whose
        // body it did not read: reconnect, as a real client would.
        if conn.is_none() {
            conn = TcpStream::connect(&args.addr).await.ok();
            if let Some(s) = &conn {
                let _ = s.set_nodelay(true);
            }
            buf.clear();
        }
        let status = match conn.as_mut() {
            Some(s) => match s.write_all(&args.request).await {
                Ok(()) => read_response(s, &mut buf).await.unwrap_or(0),
                Err(_) => 0,
            },
            None => 0,
        };
        latencies.push(scheduled.elapsed().as_secs_f64() * 1e3);
        *statuses.entry(status).or_default() += 1;
        if status == 0 || status >= 400 {
            conn = None;
        }
        i += 1;
    }
    (latencies, statuses)
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args: &'static Args = Box::leak(Box::new(args()?));
    let spread = Duration::from_secs_f64(1.0 / args.rate);
    let tasks: Vec<_> = (0..args.conns)
        .map(|c| tokio::spawn(connection(args, spread * c as u32)))
        .collect();
    let mut latencies = Vec::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for t in tasks {
        let (l, s) = t.await.map_err(|e| e.to_string())?;
        latencies.extend(l);
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let counts: BTreeMap<String, u64> = statuses
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    println!(
        "{}",
        serde_json::json!({"sent": latencies.len(), "statuses": counts,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "p999_ms": pct(0.999)})
    );
    Ok(())
}
