//! The cap on open connections per client address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Open connections per client address. IPv6 clients are counted per /64,
/// the smallest block a site is usually given, so one host cannot spread
/// its connections over its own prefix.
#[derive(Clone)]
pub struct PerIp {
    max: u32,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl PerIp {
    pub fn new(max: u32) -> Self {
        PerIp {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more connection from `ip`, or `None` at the limit.
    /// With no limit there is nothing to count.
    pub fn acquire(&self, ip: IpAddr) -> Option<Option<Slot>> {
        if self.max == 0 {
            return Some(None);
        }
        let key = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Some(Slot {
            key,
            open: self.open.clone(),
        }))
    }
}

fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// One counted connection; dropping it (the connection ended, whichever
/// way) gives the slot back.
pub struct Slot {
    key: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_counts_and_releases() {
        let l = PerIp::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = l.acquire(ip).unwrap();
        let b = l.acquire(ip).unwrap();
        assert!(l.acquire(ip).is_none(), "third connection refused");
        assert!(l.acquire("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(
            l.acquire(ip).is_some(),
            "a closed connection frees its slot"
        );
        drop(b);
        assert!(l.open.lock().unwrap().len() <= 1);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = PerIp::new(1);
        let _a = l.acquire("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(l.acquire("2001:db8:1:2::ffff".parse().unwrap()).is_none());
        assert!(l.acquire("2001:db8:1:3::1".parse().unwrap()).is_some());
        let _v4 = l.acquire("192.0.2.1".parse().unwrap()).unwrap();
        assert!(
            l.acquire("::ffff:192.0.2.1".parse().unwrap()).is_none(),
            "a v4-mapped address is the v4 client"
        );
        assert!(PerIp::new(0)
            .acquire("192.0.2.1".parse().unwrap())
            .is_some());
    }
}
