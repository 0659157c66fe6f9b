//! The dashboard (issue 15) in a real browser against a live cluster of
//! real processes: headless Chromium, driven over the Chrome DevTools
//! Protocol from this test (a websocket, `Runtime.evaluate` polling the
//! page's DOM), shows the heads and their loads; after a head is killed
//! with SIGKILL its workers' moves appear in the feed and the head
//! disappears; after SIGTERM a head shows as draining, then goes; when
//! the head serving the page dies, the page lists the other heads'
//! dashboards. The heads require a token, which the page asks for or
//! takes from the URL fragment. Screenshots go to `target/dashboard/`.
//!
//! Chromium comes from Debian's `chromium` package, which
//! `scripts/ensure-test-deps.sh` installs (`make test` runs it). Without
//! it the test prints why and skips.

mod common;

use base64::Engine as _;
use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tether_testkit::localcluster::{free_port, wait_serving};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// The token every head and worker of the test cluster shares.
const TOKEN: &str = "dashboard-test-token-0123456789";

/// Bound on anything the page should show: generous, for a debug build
/// and a browser on a loaded two-core machine.
const SHOW_WITHIN: Duration = Duration::from_secs(30);

/// How often the DOM is polled while waiting.
const POLL: Duration = Duration::from_millis(50);

/// Where Chromium is, if installed.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TETHER_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
}

/// A headless Chromium with remote debugging; killed when dropped.
struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    /// Starts Chromium and returns it with the DevTools websocket URL,
    /// which Chromium writes to `DevToolsActivePort` in its profile.
    async fn start(program: &Path, profile: PathBuf) -> (Browser, String) {
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("profile directory");
        let log = std::fs::File::create(profile.with_extension("log")).expect("browser log");
        let child = Command::new(program)
            .args([
                "--headless=new",
                // Root in containers and CI cannot use the setuid sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "--window-size=1360,1100",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let browser = Browser { child, profile };
        let port_file = browser.profile.join("DevToolsActivePort");
        let deadline = Instant::now() + SHOW_WITHIN;
        loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    let url = format!("ws://127.0.0.1:{port}{path}");
                    return (browser, url);
                }
            }
            assert!(
                Instant::now() < deadline,
                "Chromium did not open its DevTools port within {SHOW_WITHIN:?}; its log:\n{}",
                std::fs::read_to_string(browser.profile.with_extension("log")).unwrap_or_default()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools Protocol session on one page.
struct Page {
    socket: Socket,
    next_id: u64,
    session: String,
}

impl Page {
    /// Opens a new tab and attaches to it.
    async fn open(ws_url: &str) -> Page {
        let (socket, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("connecting to Chromium's DevTools websocket");
        let mut page = Page {
            socket,
            next_id: 0,
            session: String::new(),
        };
        let target = page
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target_id = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = page
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        page.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1360, "height": 1100, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        page
    }

    /// Calls a DevTools method (on the page once attached) and returns
    /// its result; events in between are skipped.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .expect("sending to Chromium");
        let answer = tokio::time::timeout(SHOW_WITHIN, async {
            loop {
                let Some(frame) = self.socket.next().await else {
                    panic!("Chromium closed the DevTools connection during {method}");
                };
                let Ok(Message::Text(text)) = frame else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
                if value["id"] == json!(id) {
                    return value;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("Chromium did not answer {method} within {SHOW_WITHIN:?}"));
        assert!(
            answer.get("error").is_none(),
            "{method} failed: {}",
            answer["error"]
        );
        answer["result"].clone()
    }

    async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(e) = result.get("exceptionDetails") {
            return json!({ "exception": e.to_string() });
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until `done` accepts its value; panics after
    /// `within` with the last value seen.
    async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let value = self.eval(expression).await;
            if done(&value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page did not show {what} within {within:?}; last seen: {value}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Saves a PNG of the whole page.
    async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        std::fs::create_dir_all(path.parent().expect("a directory")).expect("screenshot dir");
        std::fs::write(path, png).expect("writing the screenshot");
        println!("screenshot: {}", path.display());
    }
}

/// One plain HTTP/1.1 GET; returns the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        socket.read_to_string(&mut response),
    )
    .await
    .expect("an answer in time")
    .expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The heads the page lists: id -> (state, load).
const HEADS_JS: &str = r#"JSON.stringify(Object.fromEntries([...document.querySelectorAll('#heads tbody tr[data-head]')].map(r => [r.dataset.head, [r.dataset.state, Number(r.dataset.load)]])))"#;

fn heads_shown(v: &Value) -> BTreeMap<String, (String, u64)> {
    let Some(text) = v.as_str() else {
        return BTreeMap::new();
    };
    let parsed: BTreeMap<String, (String, u64)> = serde_json::from_str(text).unwrap_or_default();
    parsed
}

/// Workers whose move away from `head`, lost, the feed shows.
fn moved_from_js(head: &str) -> String {
    format!(
        r#"JSON.stringify([...document.querySelectorAll('#feed li[data-kind="moved"][data-previous="{head}"][data-detail="REASSIGN_REASON_HEAD_LOST"]')].map(li => li.dataset.worker))"#
    )
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_str()
        .and_then(|t| serde_json::from_str::<Vec<String>>(t).ok())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_heads_loads_moves_drains_and_survives_its_head() {
    let Some(program) = chromium() else {
        println!(
            "SKIPPED: no Chromium found (chromium, chromium-browser or google-chrome on PATH, or TETHER_CHROMIUM); \
             `scripts/ensure-test-deps.sh` installs Debian's chromium package (`make test` runs it)"
        );
        return;
    };

    // ---- A cluster: 4 heads with dashboards, 8 workers, one token. ----
    let mut cluster = cluster();
    let token_file = cluster.log_dir().join("token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let token_path = token_file.to_string_lossy().into_owned();
    let mut dashboards = BTreeMap::new();
    for i in 0..4 {
        let metrics: SocketAddr = format!("127.0.0.1:{}", ok(free_port()))
            .parse()
            .expect("an address");
        let metrics_text = metrics.to_string();
        let mut args: Vec<&str> = HEAD_ARGS.to_vec();
        args.extend([
            "--metrics-listen",
            &metrics_text,
            "--auth-token-file",
            &token_path,
        ]);
        ok(cluster.spawn_head(&head_id(i), &args));
        dashboards.insert(head_id(i), metrics);
    }
    for head in cluster.heads() {
        if let Err(e) = wait_serving(head.addr, HEAD_SERVICE, START_TIMEOUT).await {
            panic!("{e}\nlog of {}:\n{}", head.id, head.log_tail(20));
        }
    }
    let worker_metrics = format!("127.0.0.1:{}", ok(free_port()));
    for i in 0..8 {
        let mut args: Vec<&str> = WORKER_ARGS.to_vec();
        args.extend(["--auth-token-file", &token_path]);
        if i == 0 {
            args.extend(["--metrics-listen", &worker_metrics]);
        }
        ok(cluster.spawn_worker(&worker_id(i), &args));
    }
    let page_head = head_id(3);
    let page_addr = dashboards[&page_head];

    // ---- Plain HTTP: /metrics as before, the API wants the token. ----
    let (status, body) = http_get(page_addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tether_workers_attached"), "{body}");
    let (status, body) = http_get(page_addr, "/api/cluster").await;
    assert_eq!(status, 401, "the API must want the token: {body}");
    let (status, body) = http_get(page_addr, &format!("/api/cluster?token={TOKEN}x")).await;
    assert_eq!(status, 401, "a wrong token must be refused: {body}");
    let (status, body) = http_get(page_addr, &format!("/api/cluster?token={TOKEN}")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(page_addr, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<title>Tether cluster</title>"), "{body}");
    // ListHeads carries each head's dashboard address (HeadInfo field 6).
    let mut request = tonic::Request::new(tether::pb::ListHeadsRequest::default());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ASCII"),
    );
    let listed =
        tether_testkit::localcluster::head_client(cluster.process(&page_head).expect("head").addr)
            .list_heads(request)
            .await
            .expect("ListHeads")
            .into_inner();
    let listed: BTreeMap<String, String> = listed
        .heads
        .into_iter()
        .map(|h| (h.head_id, h.metrics_addr))
        .collect();
    let expected: BTreeMap<String, String> = dashboards
        .iter()
        .map(|(id, addr)| (id.clone(), addr.to_string()))
        .collect();
    assert_eq!(listed, expected, "ListHeads' metrics addresses");
    let worker_metrics: SocketAddr = worker_metrics.parse().expect("an address");
    let (status, body) = http_get(worker_metrics, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tether_worker_attached"), "{body}");
    let (status, _) = http_get(worker_metrics, "/").await;
    assert_eq!(status, 404, "a worker serves no dashboard");

    // ---- The browser. ----
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let artifacts = target.join("dashboard");
    let (_browser, ws_url) = Browser::start(&program, artifacts.join("chromium-profile")).await;
    let mut page = Page::open(&ws_url).await;

    // Without the token the page asks for it; typed in, it opens.
    let url = format!("http://{page_addr}/");
    page.navigate(&url).await;
    page.wait_for(
        "the token prompt",
        "document.getElementById('auth').classList.contains('show')",
        SHOW_WITHIN,
        |v| v == &json!(true),
    )
    .await;
    page.eval(&format!(
        "document.getElementById('auth-token').value = '{TOKEN}'; document.getElementById('auth-form').requestSubmit(); true"
    ))
    .await;
    page.wait_for(
        "the live connection after typing the token",
        "document.getElementById('conn-text').textContent",
        SHOW_WITHIN,
        |v| v == &json!("live"),
    )
    .await;

    // From the fragment, on a fresh load: taken, and removed from the
    // address bar.
    page.navigate("about:blank").await;
    page.navigate(&format!("{url}#token={TOKEN}")).await;
    let started = Instant::now();
    let shown = page
        .wait_for(
            "4 ready heads holding all 8 workers",
            HEADS_JS,
            SHOW_WITHIN,
            |v| {
                let heads = heads_shown(v);
                heads.len() == 4
                    && heads.values().all(|(s, _)| s == "ready")
                    && heads.values().map(|(_, l)| l).sum::<u64>() == 8
            },
        )
        .await;
    println!(
        "heads and loads shown {:?} after opening the page: {shown}",
        started.elapsed()
    );
    let hash = page.eval("location.hash").await;
    assert_eq!(hash, json!(""), "the token must leave the address bar");
    let loads = heads_shown(&shown);

    // The workers of another head, listed on request (one ListWorkers
    // call from the serving head).
    let other = (0..3)
        .map(head_id)
        .max_by_key(|h| loads[h].1)
        .expect("a head");
    page.eval(&format!(
        "[...document.querySelectorAll('#heads tr[data-head=\"{other}\"] button')].forEach(b => b.click()); true"
    ))
    .await;
    let expected = loads[&other].1 as usize;
    let listed = page
        .wait_for(
            &format!("the {expected} workers of {other}"),
            "JSON.stringify([...document.querySelectorAll('#workers tbody tr[data-worker]')].map(r => r.dataset.worker))",
            SHOW_WITHIN,
            |v| strings(v).len() == expected,
        )
        .await;
    let on_victim = strings(&listed);
    page.eval("document.getElementById('w-close').click(); true")
        .await;

    // ---- SIGKILL the busiest head but the page's. ----
    let victim = other.clone();
    let victims = on_victim.len();
    assert!(victims > 0, "{victim} holds no worker: {loads:?}");
    let killed = Instant::now();
    cluster
        .process_mut(&victim)
        .expect("the head")
        .kill()
        .expect("SIGKILL");
    let moved = page
        .wait_for(
            &format!("the moves of {victim}'s {victims} workers in the feed"),
            &moved_from_js(&victim),
            SHOW_WITHIN,
            |v| strings(v).is_superset(&on_victim),
        )
        .await;
    let moves_after = killed.elapsed();
    page.wait_for(
        &format!("{victim} marked gone"),
        HEADS_JS,
        SHOW_WITHIN,
        |v| heads_shown(v).get(&victim).is_none_or(|(s, _)| s == "gone"),
    )
    .await;
    let marked_after = killed.elapsed();
    page.wait_for(
        &format!("{victim} gone from the heads"),
        HEADS_JS,
        SHOW_WITHIN,
        |v| !heads_shown(v).contains_key(&victim),
    )
    .await;
    let gone_after = killed.elapsed();
    println!(
        "after SIGKILL of {victim}: its {victims} workers' moves shown after {moves_after:?} ({}), the head marked gone after {marked_after:?} and off the list after {gone_after:?}",
        moved.as_str().unwrap_or_default()
    );
    assert!(
        gone_after < Duration::from_secs(15),
        "{victim} lingered {gone_after:?}"
    );
    let shown = page
        .wait_for(
            "3 heads holding all 8 workers again",
            HEADS_JS,
            SHOW_WITHIN,
            |v| heads_shown(v).values().map(|(_, l)| l).sum::<u64>() == 8,
        )
        .await;
    page.screenshot(&artifacts.join("dashboard.png")).await;

    // ---- SIGTERM another head: draining, then gone. ----
    let loads = heads_shown(&shown);
    let drained = loads
        .keys()
        .filter(|h| **h != page_head)
        .max_by_key(|h| loads[*h].1)
        .expect("a head to drain")
        .clone();
    // Record every state the page shows for each head, so that a short
    // drain is seen even between two polls.
    page.eval(
        r#"window.__seen = {};
           const note = () => document.querySelectorAll('#heads tbody tr[data-head]').forEach(r => {
             (window.__seen[r.dataset.head] = window.__seen[r.dataset.head] || []);
             const s = window.__seen[r.dataset.head];
             if (s[s.length - 1] !== r.dataset.state) s.push(r.dataset.state);
           });
           note();
           new MutationObserver(note).observe(document.getElementById('heads'), { subtree: true, childList: true, attributes: true });
           true"#,
    )
    .await;
    let termed = Instant::now();
    cluster
        .process_mut(&drained)
        .expect("the head")
        .terminate()
        .expect("SIGTERM");
    page.wait_for(
        &format!("{drained} draining, then gone"),
        &format!("JSON.stringify(window.__seen['{drained}'] || [])"),
        SHOW_WITHIN,
        |v| {
            let seen: Vec<String> = v
                .as_str()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default();
            let draining = seen.iter().position(|s| s == "draining");
            let gone = seen.iter().rposition(|s| s == "gone");
            matches!((draining, gone), (Some(d), Some(g)) if d < g)
        },
    )
    .await;
    page.wait_for(
        &format!("{drained} off the list"),
        HEADS_JS,
        SHOW_WITHIN,
        |v| !heads_shown(v).contains_key(&drained),
    )
    .await;
    println!(
        "after SIGTERM of {drained}: shown draining, then gone, and off the list after {:?}",
        termed.elapsed()
    );
    let feed_kinds = page
        .eval(&format!(
            r#"JSON.stringify([...document.querySelectorAll('#feed li[data-head="{drained}"]')].map(li => li.dataset.kind))"#
        ))
        .await;
    let kinds = strings(&feed_kinds);
    assert!(
        kinds.contains("head_draining") && kinds.contains("head_gone"),
        "the feed lacks {drained}'s drain or departure: {feed_kinds}"
    );

    // ---- The page's own head dies: it points at the others. ----
    let survivor = (0..4)
        .map(head_id)
        .find(|h| *h != victim && *h != drained && *h != page_head)
        .expect("a surviving head");
    cluster
        .process_mut(&page_head)
        .expect("the head")
        .kill()
        .expect("SIGKILL");
    let links = page
        .wait_for(
            "the switch-to-another-head banner",
            r#"JSON.stringify(document.getElementById('lost').classList.contains('show') ? [...document.querySelectorAll('#lost a.switch')].map(a => a.href) : [])"#,
            SHOW_WITHIN,
            |v| !strings(v).is_empty(),
        )
        .await;
    let expected_link = format!("http://{}/", dashboards[&survivor]);
    assert_eq!(
        strings(&links),
        BTreeSet::from([expected_link]),
        "the banner must list {survivor}'s dashboard"
    );
    page.screenshot(&artifacts.join("dashboard-head-lost.png"))
        .await;

    // The link works: the survivor's dashboard shows the cluster.
    page.navigate(&format!("http://{}/#token={TOKEN}", dashboards[&survivor]))
        .await;
    page.wait_for(
        &format!("{survivor}'s dashboard with the 8 workers"),
        HEADS_JS,
        SHOW_WITHIN,
        |v| {
            let heads = heads_shown(v);
            heads.contains_key(&survivor)
                && !heads.contains_key(&page_head)
                && heads.values().map(|(_, l)| l).sum::<u64>() == 8
        },
    )
    .await;
}
