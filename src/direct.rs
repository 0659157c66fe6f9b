//! One streaming RPC served beside tonic's router instead of through it.
//!
//! A `Heartbeat` stream carries one small message each way per interval
//! for hours, so what each message passes through is the head's steady
//! cost. Through tonic's generated service and router, a `HeadBeat`
//! passes five boxed body layers and tonic's encoder, and a `WorkerBeat`
//! three boxed layers and tonic's decoder: at ten thousand workers the
//! layers' `poll_frame` calls alone were about a fifth of the head's
//! user-space samples (docs/BENCHMARKS.md, "Where the CPU goes"). Served
//! from [`crate::server::StreamsLayer`] instead, a `WorkerBeat` passes one
//! box (tonic's server's, around hyper's body) and a `HeadBeat` two (this
//! module's and tonic's server's), and is encoded straight into the frame
//! hyper sends.
//!
//! Only the stream's body is Tether's: the connection, TLS, the token
//! check, the stream count, `grpc-timeout` and shutdown stay tonic's and
//! hyper's, as for every other RPC, and the wire format is gRPC's own
//! (5-byte prefix, `grpc-status` trailers), so any gRPC client is served
//! the same as before.

use crate::server::OpenStream;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body as _, Frame};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;

/// The gRPC message prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

/// The response future of a [`DirectRpc`]: its headers (or a refusal).
pub(crate) type Reply = Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>;

/// A streaming RPC that [`crate::server::StreamsLayer`] serves itself
/// when a request's path is [`DirectRpc::path`], after the token check and
/// with the stream already counted.
pub(crate) trait DirectRpc: Send + Sync + 'static {
    /// The request path it serves, `/package.Service/Method`.
    fn path(&self) -> &'static str;

    /// Serves one call: `open` is the stream's place in its connection's
    /// count, held until the response body ends.
    fn call(&self, request: http::Request<Body>, open: Option<OpenStream>) -> Reply;
}

/// The response to a call: the stream's messages as gRPC frames, or,
/// when the call was refused before its first message, a trailers-only
/// response with the status (as tonic sends it).
pub(crate) fn respond<S, M>(
    stream: Result<S, Status>,
    open: Option<OpenStream>,
    max_message_bytes: usize,
) -> http::Response<Body>
where
    S: Stream<Item = Result<M, Status>> + Unpin + Send + 'static,
    M: prost::Message + 'static,
{
    match stream {
        Err(status) => status.into_http(),
        Ok(stream) => {
            let mut response = http::Response::new(Body::new(Outbound {
                stream: Some(stream),
                open,
                max_message_bytes,
            }));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
    }
}

/// A response body: each message of `stream` as one DATA frame, then the
/// `grpc-status` trailers.
struct Outbound<S> {
    /// `None` once the trailers went out.
    stream: Option<S>,
    /// Dropped with the stream's end, so that the connection's count of
    /// open streams falls when the call ends, not when hyper drops it.
    open: Option<OpenStream>,
    max_message_bytes: usize,
}

impl<S, M> Outbound<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: prost::Message,
{
    /// Ends the body with `status` in its trailers.
    fn end(&mut self, status: &Status) -> Frame<Bytes> {
        self.stream = None;
        self.open = None;
        let mut trailers = http::HeaderMap::with_capacity(3);
        if status.add_header(&mut trailers).is_err() {
            // Only a status whose metadata cannot be a header gets here.
            trailers.insert(Status::GRPC_STATUS, (tonic::Code::Internal as i32).into());
        }
        Frame::trailers(trailers)
    }
}

impl<S, M> http_body::Body for Outbound<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: prost::Message,
{
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match std::task::ready!(Pin::new(stream).poll_next(cx)) {
            Some(Ok(message)) => {
                let len = message.encoded_len();
                if len > this.max_message_bytes {
                    this.end(&Status::out_of_range(format!(
                        "a response message of {len} bytes is too large: the limit is {} bytes",
                        this.max_message_bytes
                    )))
                } else {
                    let mut buf = BytesMut::with_capacity(PREFIX + len);
                    buf.put_u8(0);
                    buf.put_u32(len as u32);
                    // Cannot fail: the buffer has room for `len` bytes.
                    let _ = message.encode(&mut buf);
                    Frame::data(buf.freeze())
                }
            }
            Some(Err(status)) => this.end(&status),
            None => this.end(&Status::ok("")),
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none()
    }
}

/// The request's messages, decoded from its body as they arrive. A
/// message that fits in one DATA frame (every beat) is decoded from the
/// frame itself; only one split over frames is copied, into a buffer
/// bounded by the message limit.
pub(crate) struct Inbound<M> {
    body: Body,
    /// What is left of the last DATA frame.
    chunk: Bytes,
    /// A message split over frames, gathered; empty otherwise.
    partial: BytesMut,
    /// The body ended (or failed): no frame will come.
    ended: bool,
    max_message_bytes: usize,
    message: PhantomData<fn() -> M>,
}

impl<M: prost::Message + Default> Inbound<M> {
    /// The messages of `body`, none larger than `max_message_bytes`.
    pub(crate) fn new(body: Body, max_message_bytes: usize) -> Self {
        Self {
            body,
            chunk: Bytes::new(),
            partial: BytesMut::new(),
            ended: false,
            max_message_bytes,
            message: PhantomData,
        }
    }

    /// The length of the message that `prefix` starts, if it may be read.
    fn length(&self, prefix: &[u8]) -> Result<usize, Status> {
        if prefix[0] != 0 {
            return Err(Status::unimplemented(
                "a compressed message, but this server accepts no compression (send without grpc-encoding)",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max_message_bytes {
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes is too large: the limit is {} bytes",
                self.max_message_bytes
            )));
        }
        Ok(len)
    }

    /// The next whole message among the bytes received, if there is one.
    fn next_message(&mut self) -> Result<Option<M>, Status> {
        let decode = |bytes: &[u8]| {
            M::decode(bytes)
                .map(Some)
                .map_err(|e| Status::internal(format!("a message that is not valid protobuf: {e}")))
        };
        if self.partial.is_empty() && self.chunk.len() >= PREFIX {
            let len = self.length(&self.chunk[..PREFIX])?;
            if self.chunk.len() >= PREFIX + len {
                let message = decode(&self.chunk[PREFIX..PREFIX + len]);
                self.chunk.advance(PREFIX + len);
                return message;
            }
        }
        // Split over frames: gather it.
        if !self.chunk.is_empty() {
            self.partial.extend_from_slice(&self.chunk);
            self.chunk = Bytes::new();
        }
        if self.partial.len() < PREFIX {
            return Ok(None);
        }
        let len = self.length(&self.partial[..PREFIX])?;
        if self.partial.len() < PREFIX + len {
            return Ok(None);
        }
        let whole = self.partial.split_to(PREFIX + len);
        // The rest of the frame, if any, is read like a new frame, and the
        // buffer let go of once empty: a worker's stream lives for hours.
        self.chunk = self.partial.split().freeze();
        self.partial = BytesMut::new();
        decode(&whole[PREFIX..])
    }
}

impl<M: prost::Message + Default> Stream for Inbound<M> {
    type Item = Result<M, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.next_message() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(status) => {
                    this.ended = true;
                    this.chunk = Bytes::new();
                    this.partial = BytesMut::new();
                    return Poll::Ready(Some(Err(status)));
                }
            }
            if this.ended {
                if this.partial.is_empty() && this.chunk.is_empty() {
                    return Poll::Ready(None);
                }
                this.chunk = Bytes::new();
                this.partial = BytesMut::new();
                return Poll::Ready(Some(Err(Status::internal(
                    "the request ended in the middle of a message",
                ))));
            }
            match std::task::ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers from a client carry nothing for us.
                    if let Ok(data) = frame.into_data() {
                        if this.chunk.is_empty() {
                            this.chunk = data;
                        } else {
                            // Cannot happen: a frame is read only once the
                            // last one was used up or gathered.
                            this.partial.extend_from_slice(&data);
                        }
                    }
                }
                Some(Err(status)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(status)));
                }
                None => this.ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{HeadBeat, WorkerBeat};
    use prost::Message;
    use tokio_stream::StreamExt;

    fn framed(beat: &WorkerBeat) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(beat.encoded_len() as u32).to_be_bytes());
        out.extend_from_slice(&beat.encode_to_vec());
        out
    }

    /// A request body that delivers `chunks` as its DATA frames.
    fn body_of(chunks: Vec<Vec<u8>>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c))));
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    fn beat(sequence: u64) -> WorkerBeat {
        WorkerBeat {
            worker_id: "w-1".into(),
            sequence,
            ..WorkerBeat::default()
        }
    }

    #[tokio::test]
    async fn messages_are_read_whatever_the_frames_cut() {
        let mut wire = Vec::new();
        for s in 1..=3 {
            wire.extend(framed(&beat(s)));
        }
        // Every way of cutting the bytes into two or three frames.
        for a in 0..=wire.len() {
            for b in a..=wire.len() {
                let chunks = vec![wire[..a].to_vec(), wire[a..b].to_vec(), wire[b..].to_vec()];
                let got: Vec<_> = Inbound::<WorkerBeat>::new(body_of(chunks), 1024)
                    .collect::<Vec<_>>()
                    .await;
                let got: Vec<u64> = got.into_iter().map(|m| m.unwrap().sequence).collect();
                assert_eq!(got, vec![1, 2, 3], "cut at {a} and {b}");
            }
        }
    }

    #[tokio::test]
    async fn bad_messages_end_the_stream_with_a_status() {
        let big = framed(&WorkerBeat {
            worker_id: "w".repeat(200),
            ..WorkerBeat::default()
        });
        let cases = [
            (
                vec![big],
                tonic::Code::OutOfRange,
                "too large: the limit is 64 bytes",
            ),
            (
                vec![vec![1, 0, 0, 0, 1, 0]],
                tonic::Code::Unimplemented,
                "compressed",
            ),
            (
                vec![vec![0, 0, 0, 0, 2, 0xff, 0xff]],
                tonic::Code::Internal,
                "not valid protobuf",
            ),
            (
                vec![vec![0, 0, 0, 0, 9, 8]],
                tonic::Code::Internal,
                "middle of a message",
            ),
        ];
        for (chunks, code, says) in cases {
            let mut inbound = Inbound::<WorkerBeat>::new(body_of(chunks), 64);
            let status = inbound.next().await.expect("an item").unwrap_err();
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(says), "{status:?}");
            assert!(
                inbound.next().await.is_none(),
                "the stream ends after an error"
            );
        }
    }

    #[tokio::test]
    async fn a_response_is_grpc_frames_then_its_status() {
        use http_body_util::BodyExt;
        let beats = tokio_stream::iter(vec![
            Ok(HeadBeat {
                sequence: 7,
                ..HeadBeat::default()
            }),
            Err(Status::unavailable("going away")),
        ]);
        let response = respond(Ok(beats), None, 1024);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let decoded: HeadBeat = HeadBeat::decode(&first[PREFIX..]).unwrap();
        assert_eq!((first[0], decoded.sequence), (0, 7));
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "going away");
        assert!(body.frame().await.is_none());

        let refused = respond::<tokio_stream::Iter<std::vec::IntoIter<Result<HeadBeat, Status>>>, _>(
            Err(Status::permission_denied("no")),
            None,
            1024,
        );
        let status = Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }
}
