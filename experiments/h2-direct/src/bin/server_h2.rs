//! A heartbeat server on h2 directly: one task per connection serves the
//! connection and its streams; a beat is written from that task.
//!
//! With `--quiet-wakes`, the wake-ups that h2 raises for the task's own
//! calls (a frame queued by `send_data`, data handed to a stream while the
//! task reads) are dropped while the task is polling: the same poll reads
//! the streams and flushes the connection before it returns, so tokio need
//! not poll the task a second time. Wakes from elsewhere (the socket, the
//! beat timer) go through.
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use h2::{RecvStream, SendStream};
use std::cell::Cell;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::Stream;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static RECEIVED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The `Quiet` whose task this thread is polling, as an address; 0 when none.
    static POLLING: Cell<usize> = const { Cell::new(0) };
}

/// A connection task's waker that ignores wakes raised from inside its own poll.
struct Quiet {
    task: AtomicWaker,
}

impl Wake for Quiet {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if POLLING.with(|p| p.get()) == Arc::as_ptr(self) as usize {
            return;
        }
        self.task.wake();
    }
}

struct Beat {
    recv: RecvStream,
    send: SendStream<Bytes>,
    ticks: WatchStream<u64>,
}

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:40001".into());
    let l = TcpListener::bind(&addr).await.unwrap();
    let phases = h2exp::ticks(std::time::Duration::from_secs(1));
    let mut next = 0usize;
    let msg = h2exp::framed(40);
    loop {
        let (s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let phase = phases[next % phases.len()].clone();
        next += 1;
        let msg = msg.clone();
        tokio::spawn(async move {
            let _ = serve(s, phase, msg).await;
        });
    }
}

async fn serve(
    s: tokio::net::TcpStream,
    phase: watch::Receiver<u64>,
    msg: Bytes,
) -> Result<(), h2::Error> {
    let mut conn = h2::server::Builder::new()
        .max_concurrent_streams(64)
        .handshake::<_, Bytes>(s)
        .await?;
    let mut beats: Vec<Beat> = Vec::new();
    let quiet_wakes = std::env::args().any(|a| a == "--quiet-wakes");
    let quiet = Arc::new(Quiet {
        task: AtomicWaker::new(),
    });
    let quiet_waker = Waker::from(quiet.clone());
    poll_fn(|outer| {
        if !quiet_wakes {
            return serve_once(&mut conn, &mut beats, &phase, &msg, false, outer);
        }
        quiet.task.register(outer.waker());
        POLLING.with(|p| p.set(Arc::as_ptr(&quiet) as usize));
        let mut cx = Context::from_waker(&quiet_waker);
        let r = serve_once(&mut conn, &mut beats, &phase, &msg, true, &mut cx);
        POLLING.with(|p| p.set(0));
        r
    })
    .await
}

fn serve_once(
    conn: &mut h2::server::Connection<tokio::net::TcpStream, Bytes>,
    beats: &mut Vec<Beat>,
    phase: &watch::Receiver<u64>,
    msg: &Bytes,
    quiet: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<(), h2::Error>> {
    {
        // New streams, and the connection's I/O.
        loop {
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, mut respond)))) => {
                    let resp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    if let Ok(send) = respond.send_response(resp, false) {
                        let mut p = phase.clone();
                        p.borrow_and_update();
                        beats.push(Beat {
                            recv: req.into_body(),
                            send,
                            ticks: WatchStream::from_changes(p),
                        });
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        let mut i = 0;
        let mut sent = false;
        while i < beats.len() {
            let b = &mut beats[i];
            let mut done = false;
            loop {
                match b.recv.poll_data(cx) {
                    Poll::Ready(Some(Ok(d))) => {
                        let _ = b.recv.flow_control().release_capacity(d.len());
                        RECEIVED.fetch_add(1, Ordering::Relaxed);
                    }
                    Poll::Ready(_) => {
                        done = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            while let Poll::Ready(t) = Pin::new(&mut b.ticks).poll_next(cx) {
                match t {
                    Some(_) => {
                        // Capacity: a 45-byte beat against a 64 KiB window.
                        b.send.reserve_capacity(msg.len());
                        if b.send.send_data(msg.clone(), false).is_err() {
                            done = true;
                        }
                        sent = true;
                    }
                    None => done = true,
                }
                if done {
                    break;
                }
            }
            if done {
                beats.swap_remove(i);
            } else {
                i += 1;
            }
        }
        // Flush what was queued, in this same poll. With quiet wakes also
        // when nothing was sent: a window update queued by
        // `release_capacity` raised no wake-up.
        if sent || quiet {
            if let Poll::Ready(r) = conn.poll_closed(cx) {
                return Poll::Ready(r);
            }
        }
        Poll::Pending
    }
}
