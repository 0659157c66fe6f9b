//! Transport security and secrets: workers attach over TLS and mutual
//! TLS, a shared bearer token guards every RPC but health, a Redis
//! password in the URL works, and no secret (token, Redis password) ever
//! shows up in a log line or in `--help`.
//!
//! Certificates are made on the spot with rcgen (a CA, a server and a
//! client certificate, with the IP SAN 127.0.0.1).

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tether::pb::head_service_client::HeadServiceClient;
use tether::pb::worker_service_client::WorkerServiceClient;
use tether::pb::{DrainRequest, ListWorkersRequest, ReassignRequest, StatusRequest, WorkerBeat};
use tether_testkit::localcluster::{free_port, wait_until, Cluster, Probe};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The shared token of the auth tests: long enough, and unlike anything
/// else a log would hold.
const TOKEN: &str = "tok-3f9c1b7e5d2a4c6e8b0d";

/// A directory removed on drop, unless the test is failing (then its
/// logs are the evidence and its path is printed).
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "tether-security-{label}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("a temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A CA with a server and a client certificate it signed, and a client
/// certificate from another CA; all as PEM files.
struct Pki {
    dir: TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_ca: PathBuf,
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
}

fn authority(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = params.self_signed(&key).expect("a CA certificate");
    (cert, rcgen::Issuer::new(params, key))
}

/// A leaf for 127.0.0.1, good as a server and as a client certificate
/// (a worker with mutual TLS serves its own port with it too).
fn leaf(name: &str, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>) -> (String, String) {
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = params.signed_by(&key, issuer).expect("a leaf certificate");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Self {
        let dir = TempDir::new("pki");
        let (ca, issuer) = authority("tether test CA");
        let (server_cert, server_key) = leaf("tether head", &issuer);
        let (client_cert, client_key) = leaf("tether worker", &issuer);
        let (rogue_ca, rogue_issuer) = authority("someone else's CA");
        let (rogue_cert, rogue_key) = leaf("rogue", &rogue_issuer);
        Self {
            ca: dir.write("ca.pem", &ca.pem()),
            server_cert: dir.write("server.pem", &server_cert),
            server_key: dir.write("server.key", &server_key),
            client_cert: dir.write("client.pem", &client_cert),
            client_key: dir.write("client.key", &client_key),
            rogue_ca: dir.write("rogue-ca.pem", &rogue_ca.pem()),
            rogue_cert: dir.write("rogue.pem", &rogue_cert),
            rogue_key: dir.write("rogue.key", &rogue_key),
            dir,
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("a PEM file")
    }

    /// A TLS channel trusting `ca`, presenting `identity` if given.
    fn channel(addr: SocketAddr, ca: &Path, identity: Option<(&Path, &Path)>) -> Channel {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(Self::read(ca)));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(Self::read(cert), Self::read(key)));
        }
        Endpoint::from_shared(format!("https://{addr}"))
            .expect("a URI")
            .tls_config(tls)
            .expect("TLS settings")
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Health of `service` over `channel`, bounded.
async fn health(channel: Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let mut client = HealthClient::new(channel);
    let call = client.check(HealthCheckRequest {
        service: service.to_owned(),
    });
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(r) => r.map(|r| {
            ServingStatus::try_from(r.into_inner().status).unwrap_or(ServingStatus::Unknown)
        }),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 3s")),
    }
}

/// `ListWorkers` over `channel` with `token` (if any), bounded; the ids.
async fn list(channel: Channel, token: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    let mut request = tonic::Request::new(ListWorkersRequest::default());
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", t.parse().expect("ASCII"));
    }
    let mut client = HeadServiceClient::new(channel);
    let call = client.list_workers(request);
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(r) => r.map(|r| {
            r.into_inner()
                .workers
                .into_iter()
                .map(|w| w.worker_id)
                .collect()
        }),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 3s")),
    }
}

/// Waits until the heads behind `channels` list exactly `want` between
/// them; panics with what they listed.
async fn wait_listed(channels: &[Channel], token: Option<&str>, want: &[&str], within: Duration) {
    let mut last = Vec::new();
    let done = wait_until(within, Duration::from_millis(100), async || {
        last.clear();
        let mut ids = Vec::new();
        for c in channels {
            match list(c.clone(), token).await {
                Ok(l) => ids.extend(l),
                Err(e) => last.push(format!("{e:?}")),
            }
        }
        ids.sort();
        let ok = ids == want;
        last.push(format!("{ids:?}"));
        ok
    })
    .await;
    assert!(
        done,
        "heads did not list {want:?} within {within:?}; last: {last:?}"
    );
}

/// Asserts no log line of any process holds `secret`.
fn assert_not_logged(cluster: &Cluster, secret: &str) {
    for p in cluster.heads().chain(cluster.workers()) {
        let log = std::fs::read_to_string(p.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            lines.is_empty(),
            "{}'s log holds a secret:\n{}",
            p.id,
            lines.join("\n")
        );
    }
}

#[tokio::test]
async fn workers_attach_over_tls_and_plaintext_clients_are_refused() {
    let pki = Pki::new();
    let mut cluster = cluster();
    let mut args = HEAD_ARGS.to_vec();
    args.extend([
        "--tls-cert",
        s(&pki.server_cert),
        "--tls-key",
        s(&pki.server_key),
    ]);
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), &args));
    }
    let heads: Vec<SocketAddr> = cluster.heads().map(|h| h.addr).collect();
    let tls: Vec<Channel> = heads
        .iter()
        .map(|a| Pki::channel(*a, &pki.ca, None))
        .collect();
    for c in &tls {
        let mut last = None;
        let ready = wait_until(START_TIMEOUT, Duration::from_millis(50), async || {
            last = Some(health(c.clone(), HEAD_SERVICE).await);
            matches!(last, Some(Ok(ServingStatus::Serving)))
        })
        .await;
        assert!(ready, "a TLS head never got ready: {last:?}");
    }

    let mut wargs = WORKER_ARGS.to_vec();
    wargs.extend(["--tls-ca", s(&pki.ca)]);
    let ids = ["worker-00", "worker-01", "worker-02"];
    for id in ids {
        ok(cluster.spawn_worker(id, &wargs));
    }
    wait_listed(&tls, None, &ids, START_TIMEOUT).await;
    let mut probe = Probe::new();
    for w in cluster.workers() {
        let status = probe.worker_status(w.addr).await;
        assert!(
            status.as_ref().is_ok_and(|s| s.attached),
            "{} over TLS: {status:?}",
            w.id
        );
    }

    // Plaintext to a TLS port: refused, whatever the call.
    for addr in &heads {
        let plain = tether_testkit::localcluster::channel(*addr);
        let listed = list(plain.clone(), None).await;
        let checked = health(plain, "").await;
        eprintln!("plaintext to TLS head {addr}: ListWorkers {listed:?}; health {checked:?}");
        assert!(
            listed.is_err(),
            "plaintext ListWorkers on a TLS head answered {listed:?}"
        );
        assert!(
            checked.is_err(),
            "plaintext health on a TLS head answered {checked:?}"
        );
        // A client that trusts another CA refuses the head.
        let wrong_ca = list(Pki::channel(*addr, &pki.rogue_ca, None), None).await;
        assert!(
            wrong_ca.is_err(),
            "a client trusting another CA got {wrong_ca:?}"
        );
    }
    // None of that hurt the heads.
    for c in &tls {
        let live = health(c.clone(), "").await;
        assert!(matches!(live, Ok(ServingStatus::Serving)), "{live:?}");
    }
    wait_listed(&tls, None, &ids, Duration::from_secs(2)).await;
    drop(pki.dir);
}

#[tokio::test]
async fn mutual_tls_admits_only_workers_with_a_client_certificate() {
    let pki = Pki::new();
    let mut cluster = cluster();
    let mut args = HEAD_ARGS.to_vec();
    args.extend([
        "--tls-cert",
        s(&pki.server_cert),
        "--tls-key",
        s(&pki.server_key),
        "--tls-client-ca",
        s(&pki.ca),
    ]);
    ok(cluster.spawn_head("head-0", &args));
    let head = cluster.process("head-0").expect("a head").addr;
    let with_cert = Pki::channel(head, &pki.ca, Some((&pki.client_cert, &pki.client_key)));
    let mut last = None;
    let ready = wait_until(START_TIMEOUT, Duration::from_millis(50), async || {
        last = Some(health(with_cert.clone(), HEAD_SERVICE).await);
        matches!(last, Some(Ok(ServingStatus::Serving)))
    })
    .await;
    assert!(ready, "the mTLS head never got ready: {last:?}");

    // Without a client certificate, or with one from another CA: refused.
    let anonymous = list(Pki::channel(head, &pki.ca, None), None).await;
    let rogue = list(
        Pki::channel(head, &pki.ca, Some((&pki.rogue_cert, &pki.rogue_key))),
        None,
    )
    .await;
    eprintln!("mTLS head: no client cert -> {anonymous:?}; rogue cert -> {rogue:?}");
    assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");
    assert!(
        rogue.is_err(),
        "a client certificate from another CA: {rogue:?}"
    );

    // A worker without a certificate never attaches; one with it does.
    let mut anon_args = WORKER_ARGS.to_vec();
    anon_args.extend(["--tls-ca", s(&pki.ca)]);
    ok(cluster.spawn_worker("anonymous", &anon_args));
    let mut cert_args = anon_args.clone();
    cert_args.extend([
        "--tls-cert",
        s(&pki.client_cert),
        "--tls-key",
        s(&pki.client_key),
    ]);
    ok(cluster.spawn_worker("holder", &cert_args));
    wait_listed(
        std::slice::from_ref(&with_cert),
        None,
        &["holder"],
        START_TIMEOUT,
    )
    .await;
    // The worker with a certificate serves its own port over TLS with it.
    let holder = cluster.process("holder").expect("a worker").addr;
    let status = WorkerServiceClient::new(Pki::channel(holder, &pki.ca, None))
        .status(StatusRequest {})
        .await
        .map(|r| r.into_inner());
    assert!(
        status
            .as_ref()
            .is_ok_and(|s| s.attached && s.head_id == "head-0"),
        "holder: {status:?}"
    );
    // Three more seconds: the anonymous worker is still not attached.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let anon = cluster.process("anonymous").expect("a worker");
    let status = Probe::new().worker_status(anon.addr).await;
    assert!(
        status.as_ref().is_ok_and(|s| !s.attached && s.epoch == 0),
        "a worker without a client certificate: {status:?}\nlog:\n{}",
        anon.log_tail(10)
    );
    wait_listed(
        std::slice::from_ref(&with_cert),
        None,
        &["holder"],
        Duration::from_secs(1),
    )
    .await;
    eprintln!("anonymous worker's log ends with:\n{}", anon.log_tail(3));
    drop(pki.dir);
}

/// A request carrying `authorization: VALUE`, or nothing.
fn request<T>(message: T, authorization: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(v) = authorization {
        r.metadata_mut()
            .insert("authorization", v.parse().expect("ASCII"));
    }
    r
}

#[tokio::test]
async fn the_bearer_token_guards_every_rpc_but_health() {
    let dir = TempDir::new("token");
    let token_file = dir.write("token", &format!("{TOKEN}\n"));
    let mut cluster = cluster();
    let mut args = HEAD_ARGS.to_vec();
    args.extend(["--auth-token-file", s(&token_file)]);
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), &args));
    }
    // Health needs no token: this is how probes see readiness.
    for h in cluster.heads() {
        ok(tether_testkit::localcluster::wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
    let mut wargs = WORKER_ARGS.to_vec();
    wargs.extend(["--auth-token-file", s(&token_file)]);
    let ids = ["worker-00", "worker-01", "worker-02"];
    for id in ids {
        ok(cluster.spawn_worker(id, &wargs));
    }
    let bearer = format!("Bearer {TOKEN}");
    let heads: Vec<Channel> = cluster
        .heads()
        .map(|h| tether_testkit::localcluster::channel(h.addr))
        .collect();
    wait_listed(&heads, Some(&bearer), &ids, START_TIMEOUT).await;

    let head = cluster.process("head-0").expect("a head").addr;
    let worker = cluster.process("worker-00").expect("a worker").addr;
    let mut client = HeadServiceClient::new(tether_testkit::localcluster::channel(head));
    let mut wclient = WorkerServiceClient::new(tether_testkit::localcluster::channel(worker));
    let wrong = format!("Bearer {}x", &TOKEN[..TOKEN.len() - 1]);
    for (what, auth) in [
        ("no token", None),
        ("a wrong token", Some(wrong.as_str())),
        ("the token without `Bearer `", Some(TOKEN)),
        ("an empty bearer", Some("Bearer ")),
        ("the token as Basic", Some(&*format!("Basic {TOKEN}"))),
    ] {
        let reassign = client
            .reassign(request(
                ReassignRequest {
                    worker_id: "intruder".into(),
                    ..ReassignRequest::default()
                },
                auth,
            ))
            .await;
        let listing = client
            .list_workers(request(ListWorkersRequest::default(), auth))
            .await;
        let drain = client.drain(request(DrainRequest {}, auth)).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(WorkerBeat {
            worker_id: "intruder".into(),
            epoch: 1,
            ..WorkerBeat::default()
        })
        .await
        .expect("the receiver is alive");
        let beat = client
            .heartbeat(request(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                auth,
            ))
            .await;
        let status = wclient.status(request(StatusRequest {}, auth)).await;
        for (call, code, message) in [
            (
                "Reassign",
                reassign.as_ref().err().map(|s| s.code()),
                reassign.as_ref().err().map(|s| s.message().to_owned()),
            ),
            (
                "ListWorkers",
                listing.as_ref().err().map(|s| s.code()),
                listing.as_ref().err().map(|s| s.message().to_owned()),
            ),
            (
                "Drain",
                drain.as_ref().err().map(|s| s.code()),
                drain.as_ref().err().map(|s| s.message().to_owned()),
            ),
            (
                "Heartbeat",
                beat.as_ref().err().map(|s| s.code()),
                beat.as_ref().err().map(|s| s.message().to_owned()),
            ),
            (
                "WorkerService.Status",
                status.as_ref().err().map(|s| s.code()),
                status.as_ref().err().map(|s| s.message().to_owned()),
            ),
        ] {
            assert_eq!(
                code,
                Some(Code::Unauthenticated),
                "{call} with {what}: {message:?}"
            );
            let message = message.unwrap_or_default();
            assert!(
                !message.contains(TOKEN),
                "{call}'s refusal repeats the token: {message}"
            );
        }
    }

    // Nothing the refused calls asked for happened: no drain, no intruder.
    let mut probe = Probe::new();
    for h in cluster.heads() {
        let ready = probe.health(h.addr, HEAD_SERVICE).await;
        assert!(
            matches!(ready, Ok(ServingStatus::Serving)),
            "{} readiness after refused calls (a refused Drain must not drain): {ready:?}",
            h.id
        );
        let live = probe.health(h.addr, "").await;
        assert!(
            matches!(live, Ok(ServingStatus::Serving)),
            "{} liveness: {live:?}",
            h.id
        );
    }
    for h in cluster.heads() {
        let intruder = ok(cluster.redis().command(&[
            "HEXISTS",
            &format!("{{tether}}:assigned:{}", h.id),
            "intruder",
        ]));
        assert_eq!(
            intruder,
            tether_testkit::localcluster::Reply::Integer(0),
            "a refused Reassign left an assignment on {}",
            h.id
        );
    }
    wait_listed(&heads, Some(&bearer), &ids, Duration::from_secs(2)).await;
    // With the token, the worker answers too.
    let status = wclient
        .status(request(StatusRequest {}, Some(&bearer)))
        .await;
    assert!(
        status.as_ref().is_ok_and(|s| s.get_ref().attached),
        "Status with the token: {status:?}"
    );
    assert_not_logged(&cluster, TOKEN);
    drop(dir);
}

#[test]
fn secrets_stay_out_of_help_and_configuration_errors() {
    let dir = TempDir::new("help");
    let token_file = dir.write("token", TOKEN);
    let weak_file = dir.write("weak", "weak-secret-9");
    let password = "pw-7d1e0c95b2";
    let url = format!("redis://:{password}@127.0.0.1:1");
    let bins = binaries();
    for program in [&bins.head, &bins.worker] {
        let name = program
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        // Secrets from the environment, and --help.
        let out = Command::new(program)
            .arg("--help")
            .env("TETHER_REDIS_URL", &url)
            .env("TETHER_AUTH_TOKEN_FILE", &token_file)
            .stdin(Stdio::null())
            .output()
            .expect("runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{name} --help: {:?}\n{text}",
            out.status
        );
        assert!(
            text.contains("--redis-url"),
            "{name} --help lists its flags:\n{text}"
        );
        for secret in [password, TOKEN] {
            assert!(
                !text.contains(secret),
                "{name} --help shows a secret:\n{text}"
            );
        }
        // A token too weak to use: refused without echoing it.
        let out = Command::new(program)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--auth-token-file",
                s(&weak_file),
            ])
            .args(["--redis-url", &url])
            .stdin(Stdio::null())
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name} with a weak token:\n{text}"
        );
        assert!(
            text.contains("16"),
            "{name} says what is wrong with the token:\n{text}"
        );
        for secret in ["weak-secret-9", password] {
            assert!(
                !text.contains(secret),
                "{name}'s error shows a secret:\n{text}"
            );
        }
    }
}

/// A `redis-server` with a password, on a free port, killed on drop.
struct PasswordRedis {
    child: Child,
    port: u16,
    password: &'static str,
}

impl PasswordRedis {
    fn start(dir: &TempDir, password: &'static str) -> Self {
        let port = ok(free_port());
        let log = std::fs::File::create(dir.0.join("redis.log")).expect("a log");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                password,
            ])
            .arg("--dir")
            .arg(&dir.0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", tether_testkit::localcluster::REDIS_MISSING));
        let redis = Self {
            child,
            port,
            password,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.command(&["PING"]) != "+PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server with a password did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self, password: Option<&str>) -> String {
        match password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Authenticates, runs one command, returns the first line of its
    /// reply (or the connection error).
    fn command(&self, args: &[&str]) -> String {
        use std::io::{BufRead, BufReader, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return "(no connection)".into();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut wire = String::new();
        for cmd in [&["AUTH", self.password][..], args] {
            wire.push_str(&format!("*{}\r\n", cmd.len()));
            for a in cmd {
                wire.push_str(&format!("${}\r\n{a}\r\n", a.len()));
            }
        }
        if stream.write_all(wire.as_bytes()).is_err() {
            return "(write failed)".into();
        }
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        line.clear();
        let _ = reader.read_line(&mut line);
        if line.starts_with('$') && !line.starts_with("$-") {
            // A bulk string: its value is on the next line.
            line.clear();
            let _ = reader.read_line(&mut line);
        }
        line.trim_end().to_owned()
    }
}

impl Drop for PasswordRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A head or worker started by hand (the harness always passes its own
/// `--redis-url`), killed on drop.
struct Service {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Service {
    fn start(program: &Path, dir: &TempDir, id: &str, redis_url: &str, extra: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", ok(free_port()))
            .parse()
            .expect("an address");
        let log = dir.0.join(format!("{id}.log"));
        let out = std::fs::File::create(&log).expect("a log");
        let child = Command::new(program)
            .args([
                "--id",
                id,
                "--listen",
                &addr.to_string(),
                "--redis-url",
                redis_url,
            ])
            .args(extra)
            // Debug level: a secret must not leak even there.
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("a log"))
            .stderr(out)
            .spawn()
            .expect("starts");
        let service = Self { child, addr, log };
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "{id} did not listen; log:\n{}",
                service.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        service
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_redis_password_in_the_url_works_and_stays_out_of_the_logs() {
    let dir = TempDir::new("redis-auth");
    let password = "rpw-51c0ffee9a7b";
    let redis = PasswordRedis::start(&dir, password);
    let bins = binaries();
    let url = redis.url(Some(password));
    let head = Service::start(&bins.head, &dir, "head-pw", &url, HEAD_ARGS);
    if let Err(e) =
        tether_testkit::localcluster::wait_serving(head.addr, HEAD_SERVICE, START_TIMEOUT).await
    {
        panic!("{e}\nlog:\n{}", head.log_text());
    }
    assert_eq!(
        redis.command(&["EXISTS", "{tether}:head:head-pw"]),
        ":1",
        "the head's lease"
    );
    let worker = Service::start(&bins.worker, &dir, "worker-pw", &url, WORKER_ARGS);
    let mut probe = Probe::new();
    let mut last = None;
    let attached = wait_until(START_TIMEOUT, Duration::from_millis(50), async || {
        last = Some(
            probe
                .worker_status(worker.addr)
                .await
                .map_err(|e| e.to_string()),
        );
        matches!(&last, Some(Ok(s)) if s.attached && s.head_id == "head-pw")
    })
    .await;
    assert!(
        attached,
        "worker through a password-protected Redis: {last:?}\nlog:\n{}",
        worker.log_text()
    );
    assert_eq!(
        redis.command(&["HEXISTS", "{tether}:assigned:head-pw", "worker-pw"]),
        ":1"
    );

    for (who, log) in [("head", head.log_text()), ("worker", worker.log_text())] {
        let leaks: Vec<&str> = log.lines().filter(|l| l.contains(password)).collect();
        assert!(
            leaks.is_empty(),
            "the {who}'s debug log holds the Redis password:\n{}",
            leaks.join("\n")
        );
    }
}

#[tokio::test]
async fn a_wrong_redis_password_keeps_the_head_unready_and_says_why() {
    let dir = TempDir::new("redis-badauth");
    let password = "rpw-0ddba11c0de5";
    let wrong = "rpw-not-this-one-4e2";
    let redis = PasswordRedis::start(&dir, password);
    let bins = binaries();
    let bad = Service::start(
        &bins.head,
        &dir,
        "head-wrong",
        &redis.url(Some(wrong)),
        HEAD_ARGS,
    );
    let none = Service::start(&bins.head, &dir, "head-none", &redis.url(None), HEAD_ARGS);

    // For two seconds (ten lease refreshes): alive, never ready.
    let mut probe = Probe::new();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for (id, head) in [("head-wrong", &bad), ("head-none", &none)] {
            let live = probe.health(head.addr, "").await;
            let ready = probe.health(head.addr, HEAD_SERVICE).await;
            assert!(
                matches!(live, Ok(ServingStatus::Serving))
                    && matches!(ready, Ok(ServingStatus::NotServing)),
                "{id}: liveness {live:?}, readiness {ready:?}\nlog:\n{}",
                head.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(redis.command(&["EXISTS", "{tether}:head:head-wrong"]), ":0");

    // The log says the registry refused the credentials, at the default
    // level too, and never shows either password.
    for (id, head) in [("head-wrong", &bad), ("head-none", &none)] {
        let log = head.log_text();
        let reason = log
            .lines()
            .find(|l| l.contains("ERROR") || l.contains("WARN"))
            .unwrap_or_else(|| panic!("{id} logged no error:\n{log}"));
        eprintln!("{id}: {reason}");
        let lower = reason.to_lowercase();
        assert!(
            lower.contains("auth") || lower.contains("password") || lower.contains("wrongpass"),
            "{id}'s first error does not say the credentials were refused: {reason}"
        );
        for secret in [password, wrong] {
            let leaks: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
            assert!(
                leaks.is_empty(),
                "{id}'s log holds a password:\n{}",
                leaks.join("\n")
            );
        }
    }
}

/// Over TLS the stream count reaches the idle timeout too: a worker's
/// Heartbeat stream keeps its TLS connection open well past
/// `--idle-connection-timeout`, while an idle TLS channel's connection is
/// closed and its next call opens a new one.
#[tokio::test]
async fn tls_heartbeat_streams_outlive_the_idle_connection_timeout() {
    let pki = Pki::new();
    let mut cluster = cluster();
    let mut args = HEAD_ARGS.to_vec();
    args.extend([
        "--tls-cert",
        s(&pki.server_cert),
        "--tls-key",
        s(&pki.server_key),
        "--idle-connection-timeout",
        "1s",
    ]);
    ok(cluster.spawn_head(&head_id(0), &args));
    let head = cluster.process("head-0").expect("a head");
    let (addr, pid) = (head.addr, head.pid());
    let tls = [Pki::channel(addr, &pki.ca, None)];
    let mut wargs = WORKER_ARGS.to_vec();
    wargs.extend(["--tls-ca", s(&pki.ca)]);
    ok(cluster.spawn_worker("worker-00", &wargs));
    wait_listed(&tls, None, &["worker-00"], START_TIMEOUT).await;
    let worker = cluster.process("worker-00").expect("a worker").addr;
    let before = Probe::new().worker_status(worker).await;
    let before = before.unwrap_or_else(|e| panic!("worker status: {e}"));
    assert!(before.attached, "{before:?}");
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let fds_busy = fds();

    tokio::time::sleep(Duration::from_millis(3500)).await;
    // The channel's idle connection is gone; the worker's is not.
    let fds_idle = fds();
    assert!(
        fds_idle < fds_busy,
        "head fds {fds_busy} -> {fds_idle}: the idle TLS connection was not closed"
    );
    let after = Probe::new().worker_status(worker).await;
    let after = after.unwrap_or_else(|e| panic!("worker status: {e}"));
    assert_eq!(
        (after.attached, after.epoch, after.reassignments),
        (true, before.epoch, before.reassignments),
        "the worker's TLS Heartbeat stream was closed by the idle timeout"
    );
    let live = health(tls[0].clone(), "").await;
    assert!(matches!(live, Ok(ServingStatus::Serving)), "{live:?}");
    eprintln!(
        "TLS head fds {fds_busy} -> {fds_idle} after 3.5 s idle; worker epoch {} kept",
        after.epoch
    );
    drop(pki.dir);
}
