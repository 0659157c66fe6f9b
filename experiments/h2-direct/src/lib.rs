//! Shared bits: the beat timer (8 phases a second, as Tether's head) and CPU reading.
use std::time::Duration;
use tokio::sync::watch;

pub const PHASES: usize = 8;

/// One watch per phase; a stream takes phase i % 8.
pub fn ticks(interval: Duration) -> Vec<watch::Receiver<u64>> {
    let (tx, rx): (Vec<_>, Vec<_>) = (0..PHASES).map(|_| watch::channel(0u64)).unzip();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(interval / PHASES as u32);
        let mut n: u64 = 0;
        loop {
            t.tick().await;
            let _ = tx[(n % PHASES as u64) as usize].send(n / PHASES as u64 + 1);
            n += 1;
        }
    });
    rx
}

/// utime+stime of a process in clock ticks (100 Hz).
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// A gRPC message: 5-byte prefix + payload.
pub fn framed(len: usize) -> bytes::Bytes {
    let mut v = vec![0u8; 5 + len];
    v[1..5].copy_from_slice(&(len as u32).to_be_bytes());
    for (i, b) in v[5..].iter_mut().enumerate() {
        *b = i as u8;
    }
    v.into()
}
