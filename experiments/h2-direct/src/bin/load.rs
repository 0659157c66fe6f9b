//! N connections, one bidi stream each, a 30-byte gRPC message a second
//! each way. Measures the server's CPU per worker-second over a window.
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let addr = a[1].clone();
    let n: usize = a[2].parse().unwrap();
    let secs: u64 = a[3].parse().unwrap();
    let pid: u32 = a[4].parse().unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let rss0 = h2exp::rss_kib(pid);
    for i in 0..n {
        let addr = addr.clone();
        let got = got.clone();
        tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let (mut client, conn) = h2::client::handshake(s).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = http::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}/exp.Beat/Beat"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (resp, mut send) = client.send_request(req, false).unwrap();
            let msg: Bytes = h2exp::framed(30);
            send.send_data(msg.clone(), false).unwrap();
            let mut body = resp.await.unwrap().into_body();
            let offset = Duration::from_micros((i as u64 * 1_000_000 / n as u64) % 1_000_000);
            let mut t = tokio::time::interval_at(
                tokio::time::Instant::now() + offset,
                Duration::from_secs(1),
            );
            loop {
                tokio::select! {
                    _ = t.tick() => {
                        send.reserve_capacity(msg.len());
                        if send.send_data(msg.clone(), false).is_err() { return; }
                    }
                    d = body.data() => match d {
                        Some(Ok(d)) => {
                            let _ = body.flow_control().release_capacity(d.len());
                            got.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => return,
                    }
                }
            }
        });
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c0 = h2exp::cpu_ticks(pid);
    let g0 = got.load(Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let c1 = h2exp::cpu_ticks(pid);
    let g1 = got.load(Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let cpu_s = (c1 - c0) as f64 / 100.0;
    println!(
        "workers={n} window={el:.1}s server_cpu={:.2}% cpu_per_worker_second={:.1}us beats_to_workers/s={:.0} rss_growth_per_worker={:.2}KiB",
        cpu_s / el * 100.0,
        cpu_s / el / n as f64 * 1e6,
        (g1 - g0) as f64 / el,
        (h2exp::rss_kib(pid) as f64 - rss0 as f64) / n as f64
    );
    std::process::exit(0);
}
