//! The same heartbeat server on tonic: the response stream is a body
//! polled by hyper's per-stream task, as in Tether's head.
use bytes::{Buf, BufMut, Bytes};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::Stream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};
use tonic::{Request, Response, Status};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static RECEIVED: AtomicU64 = AtomicU64::new(0);

#[derive(Default, Clone)]
struct BytesCodec;
impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}
impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

struct Body {
    inbound: Streaming<Bytes>,
    ticks: WatchStream<u64>,
    msg: Bytes,
}
impl Stream for Body {
    type Item = Result<Bytes, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(_))) => {
                    RECEIVED.fetch_add(1, Ordering::Relaxed);
                }
                Poll::Ready(_) => return Poll::Ready(None),
                Poll::Pending => break,
            }
        }
        match Pin::new(&mut this.ticks).poll_next(cx) {
            Poll::Ready(Some(_)) => Poll::Ready(Some(Ok(this.msg.clone()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[derive(Clone)]
struct Svc {
    phases: Arc<Vec<watch::Receiver<u64>>>,
    next: Arc<AtomicUsize>,
    msg: Bytes,
}
impl tonic::server::NamedService for Svc {
    const NAME: &'static str = "exp.Beat";
}
struct Handler(Svc);
impl tonic::server::StreamingService<Bytes> for Handler {
    type Response = Bytes;
    type ResponseStream = Body;
    type Future = std::future::Ready<Result<Response<Body>, Status>>;
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        let i = self.0.next.fetch_add(1, Ordering::Relaxed);
        let mut p = self.0.phases[i % self.0.phases.len()].clone();
        p.borrow_and_update();
        std::future::ready(Ok(Response::new(Body {
            inbound: req.into_inner(),
            ticks: WatchStream::from_changes(p),
            msg: self.0.msg.clone(),
        })))
    }
}
impl tower::Service<http::Request<tonic::body::Body>> for Svc {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let h = Handler(self.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(BytesCodec);
            Ok(grpc.streaming(h, req).await)
        })
    }
}

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:40002".into());
    let svc = Svc {
        phases: Arc::new(h2exp::ticks(std::time::Duration::from_secs(1))),
        next: Arc::new(AtomicUsize::new(0)),
        msg: Bytes::from(vec![7u8; 40]),
    };
    tonic::transport::Server::builder()
        .max_concurrent_streams(64)
        .tcp_nodelay(true)
        .add_service(svc)
        .serve(addr.parse().unwrap())
        .await
        .unwrap();
}
