//! The floor under the gateway: Pingora proxying to a fixed upstream with
//! no policy at all, one worker thread. `bench/compare.sh` measures it next
//! to Portcullis so the cost of the policy path is separated from the cost
//! of Pingora itself.
//!
//!   cargo run --release --example pingora_floor -- LISTEN UPSTREAM

use async_trait::async_trait;
use pingora::prelude::*;

struct Floor(String);

#[async_trait]
impl ProxyHttp for Floor {
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
        eprintln!("usage: pingora_floor LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let mut server = Server::new(None).expect("server");
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Floor(upstream));
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
