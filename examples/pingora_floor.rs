//! The floor under the gateway: Pingora proxying to a fixed upstream with
//! no policy at all, one worker thread, set up the way Portcullis runs
//! Pingora (mimalloc, single-threaded runtimes, a peer built once), so the
//! difference to Portcullis is the gateway's own work. `bench/compare.sh`
//! measures it next to `pingora_stock` (Pingora's quick-start setup).
//!
//!   cargo run --release --example pingora_floor -- LISTEN UPSTREAM

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::{Opt, ServerConf};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Floor(HttpPeer);

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.0.clone()))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: pingora_floor LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let Ok(upstream) = upstream.parse::<std::net::SocketAddr>() else {
        eprintln!("UPSTREAM must be an IP address and port");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None::<Opt>, conf);
    server.bootstrap();
    let peer = HttpPeer::new(upstream, false, String::new());
    let mut proxy = http_proxy_service(&server.configuration, Floor(peer));
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
