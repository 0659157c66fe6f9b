//! A head refuses malformed and out-of-date requests with the status code
//! the protocol documents and a message naming the problem, and records
//! nothing for them. The requests are made by hand, as a buggy or
//! malicious client would.

mod common;

use common::*;
use std::time::Duration;
use tether::pb::{ReassignRequest, WorkerBeat};
use tether_testkit::localcluster::{head_client, wait_serving, Cluster, Probe, Reply};
use tonic::Code;

/// A Redis and two registered heads, without workers.
async fn two_heads() -> Cluster {
    let mut cluster = cluster();
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), HEAD_ARGS));
    }
    for h in cluster.heads() {
        ok(wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
    cluster
}

fn reassign_request(worker_id: &str) -> ReassignRequest {
    ReassignRequest {
        worker_id: worker_id.to_owned(),
        ..ReassignRequest::default()
    }
}

/// Calls `Reassign` on `head` and returns the epoch and stream secret, or
/// the status.
async fn reassign(
    cluster: &Cluster,
    head: &str,
    worker_id: &str,
) -> Result<(u64, String), tonic::Status> {
    let mut client = head_client(cluster.process(head).expect("a head").addr);
    let call = client.reassign(reassign_request(worker_id));
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(r) => r.map(|r| {
            let r = r.into_inner();
            (r.epoch, r.stream_secret)
        }),
        Err(_) => panic!("Reassign on {head} did not answer"),
    }
}

/// Opens `Heartbeat` on `head` with `first` as its first beat and keeps
/// the request stream open; returns the response stream or the status.
async fn heartbeat(
    cluster: &Cluster,
    head: &str,
    first: WorkerBeat,
) -> (
    Result<tonic::Streaming<tether::pb::HeadBeat>, tonic::Status>,
    tokio::sync::mpsc::Sender<WorkerBeat>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.expect("the receiver is alive");
    let mut client = head_client(cluster.process(head).expect("a head").addr);
    let call = client.heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx));
    let result = match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(r) => r.map(|r| r.into_inner()),
        Err(_) => panic!("Heartbeat on {head} did not answer"),
    };
    (result, tx)
}

fn beat(worker_id: &str, epoch: u64, secret: &str) -> WorkerBeat {
    WorkerBeat {
        worker_id: worker_id.to_owned(),
        epoch,
        sequence: 0,
        load: None,
        stream_secret: secret.to_owned(),
        reassign: None,
    }
}

/// Asserts that a call failed with `code` and a message containing `words`.
fn assert_refused<T: std::fmt::Debug>(
    what: &str,
    result: &Result<T, tonic::Status>,
    code: Code,
    words: &str,
) {
    match result {
        Err(s) if s.code() == code && s.message().contains(words) => {}
        other => panic!("{what}: expected {code:?} mentioning {words:?}, got {other:?}"),
    }
}

/// Every worker id either head lists right now.
async fn listed(cluster: &Cluster) -> Vec<String> {
    let mut probe = Probe::new();
    let mut ids = Vec::new();
    for h in cluster.heads() {
        let l = probe
            .list_workers(h.addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        ids.extend(
            l.workers
                .into_iter()
                .map(|w| format!("{}@{}", w.worker_id, h.id)),
        );
    }
    ids
}

#[tokio::test]
async fn reassign_refuses_bad_worker_ids_and_records_nothing() {
    let cluster = two_heads().await;
    let long = "w".repeat(129);
    for (id, words) in [
        ("", "empty"),
        (long.as_str(), "129 bytes"),
        ("bad\u{7}id", "non-printable"),
        ("bad id", "non-printable"),
    ] {
        let result = reassign(&cluster, "head-0", id).await;
        assert_refused(
            &format!("Reassign({id:?})"),
            &result,
            Code::InvalidArgument,
            words,
        );
    }
    // 128 bytes is still allowed: the limit is where the protocol says.
    let at_limit = "w".repeat(128);
    let result = reassign(&cluster, "head-0", &at_limit).await;
    assert!(result.is_ok(), "Reassign with a 128-byte id: {result:?}");

    let fields = ok(cluster
        .redis()
        .command(&["HKEYS", "{tether}:assigned:head-0"]));
    assert_eq!(
        fields,
        Reply::Array(Some(vec![Reply::Bulk(Some(at_limit.into_bytes()))])),
        "only the valid Reassign may leave an assignment in Redis"
    );
}

#[tokio::test]
async fn heartbeat_refuses_a_bad_worker_id() {
    let cluster = two_heads().await;
    for (id, words) in [
        ("", "empty"),
        (&*"w".repeat(129), "129 bytes"),
        ("a\tb", "non-printable"),
    ] {
        let (result, _tx) = heartbeat(&cluster, "head-0", beat(id, 1, "")).await;
        assert_refused(
            &format!("Heartbeat({id:?})"),
            &result,
            Code::InvalidArgument,
            words,
        );
    }
    let seen = listed(&cluster).await;
    assert!(
        seen.is_empty(),
        "heads list workers after refused streams: {seen:?}"
    );
}

#[tokio::test]
async fn heartbeat_refuses_unknown_worker_stale_epoch_and_wrong_head() {
    let cluster = two_heads().await;

    // A worker that never called Reassign.
    let (result, _tx) = heartbeat(&cluster, "head-0", beat("stranger", 1, "")).await;
    assert_refused(
        "Heartbeat of an unknown worker",
        &result,
        Code::PermissionDenied,
        "stream_secret",
    );

    // A stale epoch: the second Reassign superseded the first, and with it
    // the first one's secret.
    let (first, first_secret) = reassign(&cluster, "head-0", "twice")
        .await
        .expect("Reassign");
    let (second, second_secret) = reassign(&cluster, "head-0", "twice")
        .await
        .expect("Reassign");
    assert!(second > first, "epochs must grow: {first} then {second}");
    let (result, _tx) = heartbeat(&cluster, "head-0", beat("twice", first, &first_secret)).await;
    assert_refused(
        "Heartbeat with a stale epoch",
        &result,
        Code::PermissionDenied,
        "stream_secret",
    );

    // Adopted here, then by another head before the stream opened: the
    // registry, not the head's memory, decides.
    let (moved_epoch, moved_secret) = reassign(&cluster, "head-0", "moved")
        .await
        .expect("Reassign");
    reassign(&cluster, "head-1", "moved")
        .await
        .expect("Reassign elsewhere");
    let (result, _tx) = heartbeat(
        &cluster,
        "head-0",
        beat("moved", moved_epoch, &moved_secret),
    )
    .await;
    assert_refused(
        "Heartbeat after another head adopted the worker",
        &result,
        Code::FailedPrecondition,
        "Reassign",
    );

    // The right worker, epoch and secret, at the wrong head.
    let (epoch, secret) = reassign(&cluster, "head-0", "elsewhere")
        .await
        .expect("Reassign");
    let (result, _tx) = heartbeat(&cluster, "head-1", beat("elsewhere", epoch, &secret)).await;
    assert_refused(
        "Heartbeat at the wrong head",
        &result,
        Code::PermissionDenied,
        "stream_secret",
    );

    // Refused streams leave nothing behind.
    let seen = listed(&cluster).await;
    assert!(
        seen.is_empty(),
        "heads list workers after refused streams: {seen:?}"
    );

    // And the same worker at the right head with its current epoch and
    // secret is accepted: the refusals above were about the beats.
    let (result, tx) = heartbeat(&cluster, "head-0", beat("twice", second, &second_secret)).await;
    let mut stream = result.unwrap_or_else(|s| panic!("Heartbeat with the current epoch: {s:?}"));
    let head_beat = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("a HeadBeat within 2s")
        .expect("no stream error")
        .expect("the stream is open");
    assert_eq!(
        (head_beat.head_id.as_str(), head_beat.epoch),
        ("head-0", second),
        "{head_beat:?}"
    );
    let seen = listed(&cluster).await;
    assert_eq!(
        seen,
        vec!["twice@head-0".to_owned()],
        "after one accepted stream"
    );
    drop(tx);
}

/// Adopt on open (`WorkerBeat.reassign`): the head answers as `Reassign`
/// would. A bad request or a first beat naming another worker is refused
/// and records nothing; an accepted one is recorded streaming in the same
/// registry call (no `Reassign`, no `CLAIM`), its first `HeadBeat` carries
/// the assignment, and a later adoption elsewhere takes a larger epoch.
#[tokio::test]
async fn adopt_on_open_answers_as_reassign_would_and_records_the_worker_streaming() {
    let cluster = two_heads().await;
    let adopt = |worker_id: &str, named: &str| WorkerBeat {
        worker_id: named.to_owned(),
        reassign: Some(reassign_request(worker_id)),
        ..WorkerBeat::default()
    };

    let (result, _tx) = heartbeat(&cluster, "head-0", adopt("bad id", "bad id")).await;
    assert_refused(
        "adopt on open with a bad worker id",
        &result,
        Code::InvalidArgument,
        "non-printable",
    );
    let (result, _tx) = heartbeat(&cluster, "head-0", adopt("one", "another")).await;
    assert_refused(
        "adopt on open naming two workers",
        &result,
        Code::InvalidArgument,
        "reassign names",
    );
    let fields = ok(cluster
        .redis()
        .command(&["HLEN", "{tether}:assigned:head-0"]));
    assert_eq!(fields, Reply::Integer(0), "refusals must record nothing");

    let (result, tx) = heartbeat(&cluster, "head-0", adopt("fast", "")).await;
    let mut stream = result.unwrap_or_else(|s| panic!("adopt on open: {s:?}"));
    let first = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("a HeadBeat within 2s")
        .expect("no stream error")
        .expect("the stream is open");
    let assignment = first
        .assignment
        .clone()
        .unwrap_or_else(|| panic!("the first HeadBeat carries no assignment: {first:?}"));
    assert_eq!(
        (assignment.head_id.as_str(), assignment.epoch),
        ("head-0", first.epoch),
        "{first:?}"
    );
    assert_eq!(assignment.stream_secret.len(), 32, "{assignment:?}");
    let value = ok(cluster
        .redis()
        .command(&["HGET", "{tether}:assigned:head-0", "fast"]));
    let Reply::Bulk(Some(value)) = value else {
        panic!("no assignment of the worker adopted on open: {value:?}");
    };
    let value = String::from_utf8_lossy(&value).into_owned();
    assert_eq!(
        value,
        format!("{}||s|", first.epoch),
        "recorded streaming under the epoch of the first HeadBeat"
    );
    assert_eq!(listed(&cluster).await, vec!["fast@head-0".to_owned()]);

    // Later beats carry no assignment; a new adoption elsewhere is newer.
    tx.send(WorkerBeat {
        sequence: 1,
        ..WorkerBeat::default()
    })
    .await
    .expect("the stream is open");
    let (moved, _) = reassign(&cluster, "head-1", "fast")
        .await
        .expect("Reassign elsewhere");
    assert!(
        moved > first.epoch,
        "epochs must grow: {} then {moved}",
        first.epoch
    );
    drop(tx);
}
