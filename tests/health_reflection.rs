//! Both processes answer the standard gRPC health and reflection
//! services, so orchestrators and `grpcurl` work with them unchanged:
//! liveness (`""`) says the process runs, readiness (the service's own
//! name) says it can do its job right now.

mod common;

use common::*;
use prost::Message;
use std::net::SocketAddr;
use std::time::Duration;
use tether_testkit::localcluster::{channel, wait_serving, wait_until, Probe};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::{v1, v1alpha};

#[tokio::test]
async fn liveness_and_readiness_follow_registration_and_attachment() {
    let mut cluster = start_cluster(1, 1).await;
    let head = cluster.process("head-0").expect("a head").addr;
    let worker = cluster.process("worker-00").expect("a worker").addr;
    let mut probe = Probe::new();

    let check = async |probe: &mut Probe, addr: SocketAddr, service: &str| {
        probe
            .health(addr, service)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(
        check(&mut probe, head, "").await,
        ServingStatus::Serving,
        "head liveness"
    );
    assert_eq!(
        check(&mut probe, head, HEAD_SERVICE).await,
        ServingStatus::Serving,
        "head readiness once registered"
    );
    assert_eq!(
        check(&mut probe, worker, "").await,
        ServingStatus::Serving,
        "worker liveness"
    );
    assert_eq!(
        check(&mut probe, worker, WORKER_SERVICE).await,
        ServingStatus::Serving,
        "worker readiness while attached"
    );

    // A service nobody serves is NOT_FOUND, not a silent SERVING.
    let unknown = probe.health(head, "tether.v1.NoSuchService").await;
    assert!(
        matches!(
            &unknown,
            Err(tether_testkit::localcluster::HarnessError::Rpc {
                code: tonic::Code::NotFound,
                ..
            })
        ),
        "unknown service: {unknown:?}"
    );

    // With no head left, the worker is alive but not ready.
    ok(cluster.process_mut("head-0").expect("a head").kill());
    let mut last = ServingStatus::Unknown;
    let not_ready = wait_until(
        Duration::from_secs(3),
        Duration::from_millis(20),
        async || {
            last = check(&mut probe, worker, WORKER_SERVICE).await;
            last == ServingStatus::NotServing
        },
    )
    .await;
    assert!(not_ready, "worker readiness with no head left: {last:?}");
    assert_eq!(
        check(&mut probe, worker, "").await,
        ServingStatus::Serving,
        "worker liveness with no head"
    );
    let status = ok(probe.worker_status(worker).await);
    assert!(!status.attached, "Status with no head left: {status:?}");
}

/// The `file_descriptor_proto`s of a reflection answer, decoded.
fn decode_files(files: &[Vec<u8>]) -> Vec<prost_types::FileDescriptorProto> {
    files
        .iter()
        .map(|b| {
            prost_types::FileDescriptorProto::decode(b.as_slice()).expect("a valid descriptor")
        })
        .collect()
}

/// Asks reflection v1 one question and returns its one answer, or the
/// status the stream failed with.
async fn try_ask_v1(
    addr: SocketAddr,
    request: v1::server_reflection_request::MessageRequest,
) -> Result<v1::server_reflection_response::MessageResponse, tonic::Status> {
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel(addr));
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let call = async {
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await?
            .into_inner();
        answers.message().await
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| panic!("reflection v1 at {addr} did not answer"))?
        .unwrap_or_else(|| panic!("reflection v1 at {addr} closed without an answer"));
    Ok(answer.message_response.expect("an answer has a response"))
}

/// [`try_ask_v1`] for questions that must succeed.
async fn ask_v1(
    addr: SocketAddr,
    request: v1::server_reflection_request::MessageRequest,
) -> v1::server_reflection_response::MessageResponse {
    try_ask_v1(addr, request)
        .await
        .unwrap_or_else(|s| panic!("reflection v1 at {addr}: {s:?}"))
}

/// Services listed by reflection v1alpha.
async fn list_v1alpha(addr: SocketAddr) -> Vec<String> {
    use v1alpha::server_reflection_request::MessageRequest;
    use v1alpha::server_reflection_response::MessageResponse;
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel(addr));
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let call = async {
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await?
            .into_inner();
        answers.message().await
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| panic!("reflection v1alpha at {addr} did not answer"))
        .unwrap_or_else(|s| panic!("reflection v1alpha at {addr}: {s:?}"))
        .and_then(|a| a.message_response);
    match answer {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("v1alpha list_services at {addr} answered {other:?}"),
    }
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_describe_both_processes() {
    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;
    let mut cluster = cluster();
    let head = ok(cluster.spawn_head("head-0", HEAD_ARGS)).addr;
    let worker = ok(cluster.spawn_worker("worker-00", WORKER_ARGS)).addr;
    ok(wait_serving(head, "", START_TIMEOUT).await);
    ok(wait_serving(worker, "", START_TIMEOUT).await);

    for (addr, own) in [
        (head, "tether.v1.HeadService"),
        (worker, "tether.v1.WorkerService"),
    ] {
        let listed = match ask_v1(addr, MessageRequest::ListServices(String::new())).await {
            MessageResponse::ListServicesResponse(l) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("v1 list_services at {addr} answered {other:?}"),
        };
        // Each reflection version lists itself; both list the rest.
        for expected in [
            own,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(
                listed.iter().any(|s| s == expected),
                "v1 at the {own} process does not list {expected}: {listed:?}"
            );
        }
        // A process advertises only what it serves.
        let other = if own == "tether.v1.HeadService" {
            "tether.v1.WorkerService"
        } else {
            "tether.v1.HeadService"
        };
        assert!(
            !listed.iter().any(|s| s == other),
            "the {own} process advertises {other}, which it does not serve: {listed:?}"
        );
        let alpha = list_v1alpha(addr).await;
        for expected in [
            own,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                alpha.iter().any(|s| s == expected),
                "v1alpha at the {own} process does not list {expected}: {alpha:?}"
            );
        }

        // The descriptor of the service itself, with its methods.
        let files = match ask_v1(addr, MessageRequest::FileContainingSymbol(own.into())).await {
            MessageResponse::FileDescriptorResponse(f) => decode_files(&f.file_descriptor_proto),
            other => panic!("file_containing_symbol({own}) at {addr} answered {other:?}"),
        };
        let file = files
            .iter()
            .find(|f| f.name() == "tether/v1/tether.proto")
            .unwrap_or_else(|| {
                let names: Vec<_> = files.iter().map(|f| f.name()).collect();
                panic!("file_containing_symbol({own}) at {addr} returned {names:?}")
            });
        assert_eq!(file.package(), "tether.v1");
        let short = own.rsplit('.').next().expect("a dotted name");
        let service = file
            .service
            .iter()
            .find(|s| s.name() == short)
            .unwrap_or_else(|| panic!("tether.proto from {addr} has no {short}"));
        let methods: Vec<_> = service.method.iter().map(|m| m.name()).collect();
        let expected: &[&str] = if short == "HeadService" {
            &["Reassign", "Heartbeat", "ListWorkers"]
        } else {
            &["Status"]
        };
        for m in expected {
            assert!(
                methods.contains(m),
                "{own} at {addr} has methods {methods:?}, not {m}"
            );
        }

        // An unknown symbol is NOT_FOUND (tonic-reflection ends the stream
        // with it), not a hang or a crash.
        match try_ask_v1(
            addr,
            MessageRequest::FileContainingSymbol("tether.v1.Nope".into()),
        )
        .await
        {
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Ok(MessageResponse::ErrorResponse(e))
                if e.error_code == tonic::Code::NotFound as i32 => {}
            other => panic!("file_containing_symbol(tether.v1.Nope) at {addr} answered {other:?}"),
        }
    }
}

/// `Health/Watch` sends a message when readiness changes, not at every
/// lease refresh (every 200 ms here): a quiet head sends its SERVING once.
#[tokio::test]
async fn health_watch_on_a_quiet_head_sends_serving_once() {
    let cluster = start_cluster(1, 0).await;
    let head = cluster.process("head-0").expect("a head").addr;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel(head));
    let mut stream = client
        .watch(tonic_health::pb::HealthCheckRequest {
            service: HEAD_SERVICE.to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("Health/Watch: {s:?}"))
        .into_inner();
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(m) = tokio::time::timeout_at(until, stream.message()).await {
        match m {
            Ok(Some(answer)) => {
                seen.push(ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown))
            }
            end => panic!("the Watch stream ended: {end:?} after {seen:?}"),
        }
    }
    assert_eq!(
        seen,
        [ServingStatus::Serving],
        "3 s of Health/Watch on a quiet head (15 lease refreshes)"
    );
}

/// The head's HTTP/2 buffers start at a few hundred bytes (a 256-byte
/// read buffer, a 530-byte write buffer, a 256-byte HPACK scratch buffer:
/// vendor/h2/PATCHED.md), so a header block or a message larger than that
/// must make them grow, not stall or fail: a 12 KiB request header (one
/// HEADERS frame the head reads whole and HPACK-decodes), and a
/// reflection answer of several KiB (DATA the head writes).
#[tokio::test]
async fn header_blocks_and_messages_larger_than_the_http2_buffers_get_through() {
    let cluster = start_cluster(1, 0).await;
    let head = cluster.process("head-0").expect("a head").addr;

    let padding: String = (0..12 * 1024)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    request.metadata_mut().insert(
        "x-padding",
        padding.parse().expect("ASCII letters are valid metadata"),
    );
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel(head));
    let answer = tokio::time::timeout(Duration::from_secs(5), client.check(request))
        .await
        .unwrap_or_else(|_| panic!("the head at {head} did not answer a 12 KiB header block"))
        .unwrap_or_else(|s| panic!("the head at {head} refused a 12 KiB header block: {s:?}"));
    assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);

    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;
    let answer = ask_v1(
        head,
        MessageRequest::FileContainingSymbol(HEAD_SERVICE.to_owned()),
    )
    .await;
    let MessageResponse::FileDescriptorResponse(files) = answer else {
        panic!("reflection answered {answer:?}");
    };
    let size: usize = files.file_descriptor_proto.iter().map(Vec::len).sum();
    assert!(
        size > 4 * 1024,
        "the answer is {size} bytes; this test needs one larger than the head's buffers"
    );
}

/// The streams of one connection are served side by side: on one HTTP/2
/// connection, a `Heartbeat` keeps beating while a `Health.Watch` stays
/// open, 64 unary calls run at once, and the watch is cancelled in the
/// middle (a RST_STREAM the head must clean up without stalling the
/// rest). A guard for any change to how a connection's streams are
/// polled (experiments/hyper-conn-streams tried one to save CPU): it
/// would fail if one stream's wait blocked the others or a wake got lost.
#[tokio::test]
async fn streams_of_one_connection_are_served_side_by_side() {
    use tether::pb::head_service_client::HeadServiceClient;
    use tether::pb::{ReassignRequest, WorkerBeat};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    // The worker's silence bound is not what this tests: 3 s, so that a
    // loaded machine cannot end the stream between two of its beats.
    let cluster = start_cluster_with(1, &["--heartbeat-timeout", "3s"], 0).await;
    let head = cluster.process("head-0").expect("a head").addr;
    // A tonic channel is one HTTP/2 connection; every call below shares it.
    let connection = channel(head);
    let step = Duration::from_secs(10);

    let mut heads = HeadServiceClient::new(connection.clone());
    let adopt = ReassignRequest {
        worker_id: "w-one-connection".to_owned(),
        ..ReassignRequest::default()
    };
    let answer = tokio::time::timeout(step, heads.reassign(adopt))
        .await
        .expect("Reassign answered")
        .expect("Reassign adopted the worker")
        .into_inner();
    let beat = move |sequence| WorkerBeat {
        worker_id: "w-one-connection".to_owned(),
        epoch: answer.epoch,
        sequence,
        stream_secret: answer.stream_secret.clone(),
        ..WorkerBeat::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(beat(0)).await.expect("the receiver is alive");
    let mut beats = tokio::time::timeout(
        step,
        heads.heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("Heartbeat answered")
    .expect("Heartbeat accepted")
    .into_inner();
    // The worker's half: a beat every 100 ms, well inside the timeout.
    let worker = tokio::spawn(async move {
        for sequence in 1.. {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx.send(beat(sequence)).await.is_err() {
                return;
            }
        }
    });
    async fn next_beat(beats: &mut tonic::Streaming<tether::pb::HeadBeat>) {
        tokio::time::timeout(Duration::from_secs(10), beats.message())
            .await
            .expect("a HeadBeat within 10 s")
            .expect("the Heartbeat stream is healthy")
            .expect("the Heartbeat stream is open");
    }
    next_beat(&mut beats).await;

    let health = HealthClient::new(connection.clone());
    let mut watch = tokio::time::timeout(
        step,
        health.clone().watch(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("Health.Watch answered")
    .expect("Health.Watch accepted")
    .into_inner();
    let first = tokio::time::timeout(step, watch.message())
        .await
        .expect("Health.Watch sent its first status")
        .expect("the watch is healthy")
        .expect("the watch is open");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let checks = |n: usize| {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let mut h = health.clone();
            set.spawn(async move {
                h.check(HealthCheckRequest {
                    service: HEAD_SERVICE.to_owned(),
                })
                .await
            });
        }
        set
    };
    let mut set = checks(64);
    let mut answered = 0;
    while let Some(done) = tokio::time::timeout(step, set.join_next())
        .await
        .expect("64 unary calls on one connection answered within 10 s")
    {
        let answer = done.expect("the call's task").expect("Health.Check");
        assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);
        answered += 1;
    }
    assert_eq!(answered, 64);

    // Cancel the watch in the middle; the heartbeat and new calls go on.
    drop(watch);
    for _ in 0..5 {
        next_beat(&mut beats).await;
    }
    let mut set = checks(8);
    while let Some(done) = tokio::time::timeout(step, set.join_next())
        .await
        .expect("calls after the cancel answered within 10 s")
    {
        done.expect("the call's task")
            .expect("Health.Check after the cancel");
    }
    next_beat(&mut beats).await;
    worker.abort();
}
