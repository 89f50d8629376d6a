//! Pingora as its quick start sets it up: the system allocator, a
//! work-stealing runtime, and a peer built from a string per request,
//! proxying to a fixed upstream with no policy. `bench/compare.sh` keeps it
//! beside the fair floor (`pingora_floor.rs`) to show what the setup costs.
//!
//!   cargo run --release --example pingora_stock -- LISTEN UPSTREAM

use async_trait::async_trait;
use pingora::prelude::*;

struct Stock(String);

#[async_trait]
impl ProxyHttp for Stock {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.0.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: pingora_stock LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let mut server = Server::new(None).expect("server");
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Stock(upstream));
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
