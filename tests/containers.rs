//! Tether in containers, on a real Docker engine: the image that
//! `deploy/Dockerfile.prebuilt` makes from this test run's binaries (on the
//! runtime base that `scripts/container-base.sh` builds without a
//! registry), and the cluster of `docker-compose.yml`, scaled, drained and
//! partitioned with `docker network disconnect`.
//!
//! The tests run whenever a Docker engine answers `docker version`. When
//! none does they say so plainly and pass, unless `TETHER_REQUIRE_DOCKER=1`
//! is set (CI sets it): then a missing engine is a failure. The first run
//! builds the base image with debootstrap (minutes; needs root and the
//! debootstrap package); later runs find it and go straight on.
//!
//! The test reaches every head and worker directly at its address on a
//! `probe` network that an override file adds to the compose project. No
//! Tether process dials anything on it (Redis is not on it, and heads
//! advertise an alias of the `beats` network), so cutting a container off
//! `registry` or `beats` leaves the test's view of it intact.
//!
//! The tests take turns (a file lock), since each loads the two cores with
//! up to two dozen containers. Everything a test starts is removed by a
//! guard, also when it fails, after the containers' logs are printed.

mod common;

use common::{settle, Member, View, HEAD_SERVICE, WORKER_SERVICE};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tether_testkit::localcluster::{run_to_exit, wait_serving, wait_until, Probe};
use tokio::runtime::Runtime;

/// The heartbeat interval the test cluster runs with.
const INTERVAL: Duration = Duration::from_millis(250);

/// Head settings for the test cluster: quick beats, a quick timeout and a
/// short lease so that partitions show within seconds.
const HEAD_ENV: &[(&str, &str)] = &[
    ("TETHER_HEARTBEAT_INTERVAL", "250ms"),
    ("TETHER_HEARTBEAT_TIMEOUT", "1s"),
    ("TETHER_LEASE_TTL", "1500ms"),
    ("TETHER_DRAIN_TIMEOUT", "20s"),
    ("TETHER_SHUTDOWN_TIMEOUT", "2s"),
];

/// The heartbeat timeout of [`HEAD_ENV`].
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// The drain timeout of [`HEAD_ENV`].
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Worker settings: give up on an unreachable head quickly and retry
/// often, so healing shows within seconds.
const WORKER_ENV: &[(&str, &str)] = &[
    ("TETHER_CONNECT_TIMEOUT", "500ms"),
    ("TETHER_MAX_BACKOFF", "1s"),
];

/// The base image the runtime stage and Redis use here.
const BASE_IMAGE: &str = "tether-base:bookworm";

/// Bound on one docker or compose command (an `up` of two dozen
/// containers on a loaded two-core machine included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(240);

/// Bound on building the base image with debootstrap.
const BASE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Bound on a cluster settling after a start, a scale or a heal.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(45);

/// The repository, where the compose file and the scripts are.
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Writes a line to the real stderr, past the test harness's capture:
/// for the few lines a CI log should show even when the test passes (a
/// skip, the image builds, the drain and partition summaries).
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "containers: {line}");
}

/// Runs a command to its end and returns its stdout; panics with its
/// stderr when it fails.
fn must(program: &str, args: &[&str]) -> String {
    let output = run_to_exit(Path::new(program), args, COMMAND_TIMEOUT)
        .unwrap_or_else(|e| panic!("`{program} {}`: {e}", args.join(" ")));
    if !output.status.success() {
        panic!(
            "`{program} {}` failed ({}):\n{}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether a command exits 0 within `timeout`.
fn succeeds(program: &str, args: &[&str], timeout: Duration) -> Result<(), String> {
    match run_to_exit(Path::new(program), args, timeout) {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`{program} {}` exited with {}: {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("`{program} {}`: {e}", args.join(" "))),
    }
}

/// Holds the machine-wide turn of the container tests: an exclusive
/// `flock` on a file in the temp dir, released when dropped. It works
/// between threads of one test binary and between processes alike.
struct Turn(#[allow(dead_code)] File);

impl Turn {
    fn take() -> Turn {
        let path = std::env::temp_dir().join("tether-container-tests.lock");
        // flock needs no write access, so a lock file another user made
        // serves too.
        let file = File::create(&path)
            .or_else(|_| File::open(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // SAFETY: flock on a descriptor this function owns; no memory is
        // shared with the kernel.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Turn(file)
    }
}

/// What a container test needs: an engine, a compose tool, the images,
/// and its turn.
struct Docker {
    /// `docker compose` or `docker-compose`, program first.
    compose: Vec<String>,
    /// The Tether image under test.
    image: String,
    _turn: Turn,
}

/// The engine, or `None` (after saying so) when none answers and
/// `TETHER_REQUIRE_DOCKER` is not `1`.
fn docker_or_skip(test: &str) -> Option<Docker> {
    let required = std::env::var("TETHER_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
    let probe = ["version", "--format", "{{.Server.Version}}"];
    if let Err(why) = succeeds("docker", &probe, Duration::from_secs(30)) {
        if required {
            panic!(
                "TETHER_REQUIRE_DOCKER=1 but no Docker engine answers: {why}\n\
                 start one (e.g. `sudo service docker start`) or unset TETHER_REQUIRE_DOCKER"
            );
        }
        say(format_args!(
            "SKIPPED {test}: no Docker engine answers ({why}); \
             set TETHER_REQUIRE_DOCKER=1 to make this a failure"
        ));
        return None;
    }
    let turn = Turn::take();
    let compose = compose_command();
    let image = images().clone();
    Some(Docker {
        compose,
        image,
        _turn: turn,
    })
}

/// `docker compose` when the plugin is there, else `docker-compose`.
fn compose_command() -> Vec<String> {
    let quick = Duration::from_secs(30);
    if succeeds("docker", &["compose", "version"], quick).is_ok() {
        return vec!["docker".into(), "compose".into()];
    }
    match succeeds("docker-compose", &["version"], quick) {
        Ok(()) => vec!["docker-compose".into()],
        Err(e) => panic!(
            "a Docker engine answers but neither `docker compose` nor `docker-compose` works ({e}); \
             install one: sudo apt-get install -y docker-compose"
        ),
    }
}

/// The base image and the Tether image, built once per test binary.
fn images() -> &'static String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        build_base();
        build_image()
    })
}

/// Runs `scripts/container-base.sh`, which returns at once when the base
/// image exists.
fn build_base() {
    let script = repo().join("scripts/container-base.sh");
    let started = Instant::now();
    let output = run_to_exit(&script, &["--tag", BASE_IMAGE], BASE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    let log = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "building the base image failed ({}); `sudo scripts/container-base.sh` needs root \
             and `apt-get install -y debootstrap`:\n{log}",
            output.status
        );
    }
    say(format_args!(
        "base image {BASE_IMAGE}: {} ({:.1?})",
        log.trim(),
        started.elapsed()
    ));
}

/// Builds `deploy/Dockerfile.prebuilt` from the binaries of this test run,
/// under a tag named after their sizes and times, so an unchanged build is
/// reused and a concurrent run elsewhere does not replace the image under
/// this one.
fn build_image() -> String {
    let binaries = [
        env!("CARGO_BIN_EXE_tether-head"),
        env!("CARGO_BIN_EXE_tether-worker"),
        env!("CARGO_BIN_EXE_tetherctl"),
    ];
    let dockerfile = repo().join("deploy/Dockerfile.prebuilt");
    let entrypoint = repo().join("scripts/docker-entrypoint.sh");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in binaries.iter().map(Path::new) {
        let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (meta.len(), meta.modified().ok()).hash(&mut hasher);
    }
    for path in [&dockerfile, &entrypoint] {
        std::fs::read(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .hash(&mut hasher);
    }
    let tag = format!("tether-test:{:016x}", hasher.finish());
    if succeeds("docker", &["image", "inspect", &tag], COMMAND_TIMEOUT).is_ok() {
        say(format_args!("image {tag}: built before, reused"));
        return tag;
    }

    // A context holding only what the Dockerfile copies.
    let context = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("image-context-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).unwrap();
    for path in binaries.iter().map(Path::new).chain([entrypoint.as_path()]) {
        let to = context.join(path.file_name().unwrap());
        if std::fs::hard_link(path, &to).is_err() {
            std::fs::copy(path, &to).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
    let started = Instant::now();
    must(
        "docker",
        &[
            "build",
            "--quiet",
            "--label",
            "org.tether.test=1",
            "--build-arg",
            &format!("RUNTIME_BASE={BASE_IMAGE}"),
            "-f",
            dockerfile.to_str().unwrap(),
            "-t",
            &tag,
            context.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_dir_all(&context);
    say(format_args!(
        "image {tag}: built in {:.1?}",
        started.elapsed()
    ));
    // Earlier test images nothing runs any more; the recent ones may
    // belong to a run going on elsewhere on this engine.
    let _ = succeeds(
        "docker",
        &[
            "image",
            "prune",
            "--all",
            "--force",
            "--filter",
            "label=org.tether.test=1",
            "--filter",
            "until=2h",
        ],
        COMMAND_TIMEOUT,
    );
    tag
}

/// A compose project of `docker-compose.yml` plus an override that puts
/// the test's images and timings in and adds the `probe` network. Dropping
/// it removes its containers and networks, printing their logs first when
/// the test is failing.
struct Project<'a> {
    /// Held so that the project cannot outlive the test's turn.
    _docker: &'a Docker,
    name: String,
    override_file: PathBuf,
    /// The compose command, program first: the tool itself, or the
    /// README's `scripts/compose.sh` (see [`Project::up_as_readme`]).
    compose: Vec<String>,
}

impl<'a> Project<'a> {
    /// Starts Redis, both heads and `workers` workers.
    fn up(docker: &'a Docker, label: &str, workers: usize) -> Project<'a> {
        let name = format!("tetherct-{}-{label}", std::process::id());
        let override_file =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.compose.yml"));
        std::fs::write(
            &override_file,
            override_yaml(&docker.image, &free_subnets()),
        )
        .unwrap();
        // The guard exists before `up`, so a half-started project is
        // removed too.
        let project = Project {
            _docker: docker,
            name,
            override_file,
            compose: docker.compose.clone(),
        };
        let started = Instant::now();
        project.scale(workers);
        eprintln!(
            "compose up with {workers} workers: {:.1?}",
            started.elapsed()
        );
        project
    }

    /// A project driven the way the README says: through
    /// `scripts/compose.sh` (which picks `docker compose` or
    /// `docker-compose` and, with no registry, Redis from the local base),
    /// with the image in `TETHER_IMAGE` and no `TETHER_REDIS_IMAGE`. The
    /// override only gives the networks test subnets; nothing is started.
    fn readme(docker: &'a Docker, label: &str) -> Project<'a> {
        let name = format!("tetherct-{}-{label}", std::process::id());
        let override_file =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.compose.yml"));
        let [registry, beats, _] = free_subnets();
        let networks: String = [("registry", registry), ("beats", beats)]
            .iter()
            .map(|(name, subnet)| {
                format!("  {name}:\n    ipam:\n      config:\n        - subnet: {subnet}\n")
            })
            .collect();
        std::fs::write(&override_file, format!("networks:\n{networks}")).unwrap();
        let compose = vec![
            "env".to_owned(),
            "-u".to_owned(),
            "TETHER_REDIS_IMAGE".to_owned(),
            format!("TETHER_IMAGE={}", docker.image),
            repo().join("scripts/compose.sh").display().to_string(),
        ];
        Project {
            _docker: docker,
            name,
            override_file,
            compose,
        }
    }

    /// This project's compose command line with `args`, program first.
    fn command(&self, args: &[&str]) -> Vec<String> {
        let compose_file = repo().join("docker-compose.yml");
        let mut full = self.compose.clone();
        full.extend(["-p".to_owned(), self.name.clone()]);
        full.extend(["-f".to_owned(), compose_file.display().to_string()]);
        full.extend(["-f".to_owned(), self.override_file.display().to_string()]);
        full.extend(args.iter().map(|a| a.to_string()));
        full
    }

    /// Runs the compose tool on this project.
    fn compose(&self, args: &[&str]) -> String {
        let full = self.command(args);
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        must(full[0], &full[1..])
    }

    /// Runs the compose tool on this project; returns its exit, stdout and
    /// stderr, whatever the exit.
    fn try_compose(&self, args: &[&str]) -> std::process::Output {
        let full = self.command(args);
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        run_to_exit(Path::new(full[0]), &full[1..], COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("`{}`: {e}", full.join(" ")))
    }

    /// Brings the number of workers to `workers` (both heads and Redis
    /// stay as they are).
    fn scale(&self, workers: usize) {
        let scale = format!("worker={workers}");
        self.compose(&["up", "-d", "--no-build", "--no-recreate", "--scale", &scale]);
    }

    /// The ids of the running containers of `service`.
    fn containers(&self, service: &str) -> Vec<String> {
        let project = format!("label=com.docker.compose.project={}", self.name);
        let service = format!("label=com.docker.compose.service={service}");
        let out = must(
            "docker",
            &["ps", "-q", "--filter", &project, "--filter", &service],
        );
        let mut ids: Vec<String> = out.lines().map(str::to_owned).collect();
        ids.sort();
        ids
    }

    /// The one running container of `service`.
    fn container(&self, service: &str) -> String {
        let ids = self.containers(service);
        assert_eq!(ids.len(), 1, "containers of {service}: {ids:?}");
        ids[0].clone()
    }

    /// A network of this project by its name in the compose file.
    fn network(&self, short: &str) -> String {
        format!("{}_{short}", self.name)
    }

    /// Where the test reaches `container` on `port`.
    fn probe_addr(&self, container: &str, port: u16) -> SocketAddr {
        let format = format!(
            "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
            self.network("probe")
        );
        let out = must("docker", &["inspect", "--format", &format, container]);
        let ip: IpAddr = out
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{container} has no address on the probe network: {out:?}"));
        SocketAddr::new(ip, port)
    }

    /// The DNS aliases `container` has on `network`, to give back when it
    /// is connected again.
    fn aliases(&self, container: &str, network: &str) -> Vec<String> {
        let format = format!(
            "{{{{with index .NetworkSettings.Networks \"{network}\"}}}}{{{{range .Aliases}}}}{{{{.}}}} {{{{end}}}}{{{{end}}}}"
        );
        must("docker", &["inspect", "--format", &format, container])
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Cuts `container` off the project network `short`; returns what
    /// [`Project::connect`] needs to undo it.
    fn disconnect(&self, container: &str, short: &str) -> Cut {
        let network = self.network(short);
        let aliases = self.aliases(container, &network);
        must("docker", &["network", "disconnect", &network, container]);
        Cut {
            container: container.to_owned(),
            network,
            aliases,
        }
    }

    /// Heals a cut, with the container's aliases as before.
    fn connect(&self, cut: &Cut) {
        let mut args = vec!["network", "connect"];
        for alias in &cut.aliases {
            args.extend(["--alias", alias.as_str()]);
        }
        args.extend([cut.network.as_str(), cut.container.as_str()]);
        must("docker", &args);
    }
}

impl Drop for Project<'_> {
    fn drop(&mut self) {
        let compose_file = repo().join("docker-compose.yml");
        let mut base: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        base.extend([
            "-p",
            &self.name,
            "-f",
            compose_file.to_str().unwrap(),
            "-f",
            self.override_file.to_str().unwrap(),
        ]);
        let quick = Duration::from_secs(60);
        let docker = |args: &[&str]| run_to_exit(Path::new("docker"), args, quick);
        if std::thread::panicking() {
            let mut args = base.clone();
            args.extend(["logs", "--no-color", "--tail", "40"]);
            if let Ok(out) = run_to_exit(Path::new(&self.compose[0]), &args, COMMAND_TIMEOUT) {
                eprintln!(
                    "---- logs of {} ----\n{}{}",
                    self.name,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        // Containers one at a time: when this engine (Docker 20.10) stops
        // two dozen containers at once, as `compose down` does, it now
        // and then loses count of a network's endpoints, and that network
        // can then not be removed until dockerd restarts.
        let label = format!("label=com.docker.compose.project={}", self.name);
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &label]) {
            for id in String::from_utf8_lossy(&ids.stdout).lines() {
                let _ = docker(&["rm", "--force", "--volumes", id]);
            }
        }
        let mut args = base.clone();
        args.extend(["down", "--volumes", "--remove-orphans", "--timeout", "2"]);
        let _ = run_to_exit(Path::new(&self.compose[0]), &args, COMMAND_TIMEOUT);
        // Whatever networks are left (the compose tool failed, or the
        // engine lost count as above).
        let left = docker(&["network", "ls", "-q", "--filter", &label])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for network in left.lines() {
            let removed = (0..3).any(|attempt| {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_secs(1));
                }
                docker(&["network", "rm", network]).is_ok_and(|o| o.status.success())
            });
            if !removed {
                say(format_args!(
                    "the engine keeps network {network} of {} (it counts an endpoint no container has; \
                     a Docker 20.10 fault that lasts until dockerd restarts). It holds only its own \
                     test subnet in 10.200.0.0/13, so later runs are not affected",
                    self.name
                ));
            }
        }
        let _ = std::fs::remove_file(&self.override_file);
    }
}

/// A network cut made by [`Project::disconnect`].
struct Cut {
    container: String,
    network: String,
    aliases: Vec<String>,
}

/// The compose override of the tests: the image under test, the local
/// base for Redis, quick timings, the `probe` network on every head and
/// worker, and a subnet of its own for each network.
fn override_yaml(image: &str, subnets: &[String; 3]) -> String {
    let env = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| format!("      {k}: \"{v}\"\n"))
            .collect::<String>()
    };
    let head = |name: &str| {
        format!(
            "  {name}:\n    image: {image}\n    environment:\n{}    networks:\n      probe: {{}}\n",
            env(HEAD_ENV)
        )
    };
    let networks: String = ["registry", "beats", "probe"]
        .iter()
        .zip(subnets)
        .map(|(name, subnet)| {
            format!("  {name}:\n    ipam:\n      config:\n        - subnet: {subnet}\n")
        })
        .collect();
    format!(
        "services:\n  redis:\n    image: {BASE_IMAGE}\n{}{}  worker:\n    image: {image}\n    environment:\n{}    networks:\n      probe: {{}}\nnetworks:\n{networks}",
        head("head-1"),
        head("head-2"),
        env(WORKER_ENV)
    )
}

/// Three /24 subnets in 10.200.0.0/13 that no Docker network uses.
///
/// The tests name their networks' subnets rather than take them from the
/// engine's default pools: should the engine fail to remove a network
/// (see [`Project`]'s `drop`), it then holds a test subnet, not one of
/// the thirty-odd default pools every other Docker user on the machine
/// draws from.
fn free_subnets() -> [String; 3] {
    let ids = must("docker", &["network", "ls", "-q"]);
    let mut args = vec![
        "network",
        "inspect",
        "--format",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
    ];
    args.extend(ids.lines());
    let taken: Vec<(u32, u32)> = must("docker", &args)
        .split_whitespace()
        .filter_map(|cidr| {
            let (ip, len) = cidr.split_once('/')?;
            let ip: std::net::Ipv4Addr = ip.parse().ok()?;
            let len: u32 = len.parse().ok()?;
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Some((u32::from(ip) & mask, mask))
        })
        .collect();
    let base = u32::from(std::net::Ipv4Addr::new(10, 200, 0, 0));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(7919);
    let mut picked: Vec<String> = Vec::new();
    for i in 0..2048u32 {
        let net = base + (((seed.wrapping_add(i)) % 2048) << 8);
        let overlaps = taken
            .iter()
            .any(|(t, mask)| net & mask == *t || (t & 0xffff_ff00) == net);
        if !overlaps {
            picked.push(format!("{}/24", std::net::Ipv4Addr::from(net)));
            if picked.len() == 3 {
                break;
            }
        }
    }
    picked
        .try_into()
        .unwrap_or_else(|p| panic!("no three free /24 subnets in 10.200.0.0/13: {p:?}"))
}

/// The running project as the test sees it: each head and worker with the
/// address it answers at on the probe network.
struct Scene<'a> {
    project: Project<'a>,
    rt: Runtime,
    probe: Probe,
    heads: Vec<Member>,
    workers: Vec<Member>,
    /// Worker id to container id.
    containers: BTreeMap<String, String>,
}

impl<'a> Scene<'a> {
    fn start(docker: &'a Docker, label: &str, workers: usize) -> Scene<'a> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut scene = Scene {
            project: Project::up(docker, label, workers),
            rt,
            probe: Probe::new(),
            heads: Vec::new(),
            workers: Vec::new(),
            containers: BTreeMap::new(),
        };
        scene.look();
        scene
    }

    /// Finds the running heads and workers again (after a scale or a
    /// stop); waits for each to answer health and learns the workers' ids.
    fn look(&mut self) {
        self.heads.clear();
        for head in ["head-1", "head-2"] {
            for container in self.project.containers(head) {
                let addr = self.project.probe_addr(&container, 7070);
                self.heads.push(Member {
                    id: head.to_owned(),
                    addr,
                });
            }
        }
        self.workers.clear();
        self.containers.clear();
        for container in self.project.containers("worker") {
            let addr = self.project.probe_addr(&container, 7071);
            let id = self.rt.block_on(async {
                wait_serving(addr, "", SETTLE_TIMEOUT)
                    .await
                    .unwrap_or_else(|e| panic!("worker container {container}: {e}"));
                self.probe
                    .worker_status(addr)
                    .await
                    .unwrap_or_else(|e| panic!("worker container {container}: {e}"))
                    .worker_id
            });
            self.containers.insert(id.clone(), container);
            self.workers.push(Member { id, addr });
        }
    }

    fn head(&self, id: &str) -> &Member {
        self.heads
            .iter()
            .find(|h| h.id == id)
            .unwrap_or_else(|| panic!("no running head {id}"))
    }

    /// Waits until every head is ready (registered, lease held) and every
    /// worker is attached to exactly one of them, both agreeing on the
    /// epoch. Returns that view.
    fn settle(&mut self, what: &str) -> View {
        let started = Instant::now();
        let Scene {
            rt,
            probe,
            heads,
            workers,
            ..
        } = self;
        let view = rt.block_on(async {
            for head in heads.iter() {
                wait_serving(head.addr, HEAD_SERVICE, SETTLE_TIMEOUT)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {} is not ready: {e}", head.id));
            }
            settle(probe, heads, workers, SETTLE_TIMEOUT).await
        });
        eprintln!(
            "{what}: {} workers settled on {} heads in {:.1?} ({:?})",
            self.workers.len(),
            self.heads.len(),
            started.elapsed(),
            loads(&view)
        );
        view
    }

    /// Waits up to `timeout` for `check` on fresh views; panics with the
    /// last view when it never holds.
    fn wait_view(&mut self, what: &str, timeout: Duration, check: impl Fn(&View) -> bool) -> View {
        let started = Instant::now();
        let mut last = None;
        let Scene {
            rt,
            probe,
            heads,
            workers,
            ..
        } = self;
        let held = rt.block_on(wait_until(
            timeout,
            Duration::from_millis(100),
            async || {
                let view = View::take(probe, heads, workers).await;
                let ok = check(&view);
                last = Some(view);
                ok
            },
        ));
        let view = last.expect("checked at least once");
        assert!(held, "{what}: not within {timeout:?}:\n{view}");
        eprintln!("{what}: after {:.1?}", started.elapsed());
        view
    }

    /// What every head and worker says now.
    fn view(&mut self) -> View {
        self.rt
            .block_on(View::take(&mut self.probe, &self.heads, &self.workers))
    }

    /// Readiness (`tether.v1.HeadService`) of a head right now.
    fn ready(&mut self, head: &str) -> bool {
        let addr = self.head(head).addr;
        matches!(
            self.rt.block_on(self.probe.health(addr, HEAD_SERVICE)),
            Ok(tonic_health::pb::health_check_response::ServingStatus::Serving)
        )
    }

    /// Waits until a head's readiness is `ready`.
    fn wait_ready(&mut self, head: &str, ready: bool, timeout: Duration) {
        let started = Instant::now();
        let addr = self.head(head).addr;
        let Scene { rt, probe, .. } = self;
        let reached = rt.block_on(wait_until(
            timeout,
            Duration::from_millis(100),
            async || {
                let serving = matches!(
                    probe.health(addr, HEAD_SERVICE).await,
                    Ok(tonic_health::pb::health_check_response::ServingStatus::Serving)
                );
                serving == ready
            },
        ));
        assert!(
            reached,
            "{head} readiness did not become {} within {timeout:?}",
            if ready { "SERVING" } else { "NOT_SERVING" }
        );
        eprintln!(
            "{head} readiness {} after {:.1?}",
            if ready { "SERVING" } else { "NOT_SERVING" },
            started.elapsed()
        );
    }
}

/// Workers per head in a view.
fn loads(view: &View) -> BTreeMap<String, usize> {
    view.listings
        .iter()
        .map(|(head, l)| (head.clone(), l.as_ref().map_or(0, |l| l.workers.len())))
        .collect()
}

#[test]
fn image_holds_all_three_binaries_and_runs_them_as_a_non_root_user() {
    let Some(docker) =
        docker_or_skip("image_holds_all_three_binaries_and_runs_them_as_a_non_root_user")
    else {
        return;
    };
    let image = docker.image.as_str();
    let run = |args: &[&str]| {
        let mut full = vec!["run", "--rm", image];
        full.extend(args);
        must("docker", &full)
    };
    assert_eq!(
        run(&["id", "-u"]).trim(),
        "10001",
        "the image must not run as root"
    );
    assert!(run(&["head", "--version"]).starts_with("tether-head "));
    assert!(run(&["worker", "--version"]).starts_with("tether-worker "));
    assert!(run(&["tetherctl", "--version"]).starts_with("tetherctl "));
    assert!(run(&["head", "--help"]).contains("--advertise"));

    let config = must(
        "docker",
        &[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}} {{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}",
            image,
        ],
    );
    for want in ["10001:10001", "7070/tcp", "7071/tcp"] {
        assert!(
            config.contains(want),
            "image config {config:?} lacks {want}"
        );
    }
}

#[test]
fn compose_cluster_attaches_scales_and_a_stopped_head_drains_without_a_missed_beat() {
    let Some(docker) = docker_or_skip(
        "compose_cluster_attaches_scales_and_a_stopped_head_drains_without_a_missed_beat",
    ) else {
        return;
    };
    let mut scene = Scene::start(&docker, "scale", 12);

    // Health as probes see it: liveness ("") and readiness on every head,
    // readiness on every worker once attached.
    scene.rt.block_on(async {
        for head in &scene.heads {
            for service in ["", HEAD_SERVICE] {
                wait_serving(head.addr, service, SETTLE_TIMEOUT)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", head.id));
            }
        }
    });
    let view = scene.settle("started with 12 workers");
    scene.rt.block_on(async {
        for worker in &scene.workers {
            wait_serving(worker.addr, WORKER_SERVICE, SETTLE_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", worker.id));
        }
    });

    // Heads advertise their container address on the beats network, and
    // each worker gives its own container's name.
    for (worker, container) in &scene.containers {
        let status = view.status(worker).unwrap();
        assert_eq!(
            status.head_addr,
            format!("{}-beats:7070", status.head_id),
            "{worker} reached its head through another address"
        );
        let listing = view.listings[&status.head_id].as_ref().unwrap();
        let info = listing
            .workers
            .iter()
            .find(|w| &w.worker_id == worker)
            .unwrap();
        assert!(
            container.starts_with(info.worker_addr.trim_end_matches(":7071")),
            "{worker} in container {container} advertises {:?}",
            info.worker_addr
        );
    }

    let started = Instant::now();
    scene.project.scale(20);
    eprintln!("scaled up to 20 workers: {:.1?}", started.elapsed());
    scene.look();
    assert_eq!(scene.workers.len(), 20);
    scene.settle("scaled up to 20 workers");

    let started = Instant::now();
    scene.project.scale(8);
    eprintln!("scaled down to 8 workers: {:.1?}", started.elapsed());
    scene.look();
    assert_eq!(scene.workers.len(), 8);
    // `settle` also fails on a head still listing a removed worker.
    let before = scene.settle("scaled down to 8 workers");

    // `docker compose stop head-1`: SIGTERM, and the head drains.
    let orphans: BTreeMap<String, tether::pb::WorkerStatus> = before
        .workers_of("head-1")
        .into_iter()
        .map(|w| (w.clone(), before.status(&w).unwrap().clone()))
        .collect();
    let head_1 = scene.project.container("head-1");
    let stopped = Instant::now();
    scene.project.compose(&["stop", "head-1"]);
    let took = stopped.elapsed();
    let exit = must(
        "docker",
        &["inspect", "--format", "{{.State.ExitCode}}", &head_1],
    );
    assert_eq!(exit.trim(), "0", "head-1 exit code after `compose stop`");
    assert!(
        took < DRAIN_TIMEOUT,
        "`compose stop head-1` took {took:?}: the drain should end once its workers moved, long before its {DRAIN_TIMEOUT:?} timeout"
    );
    let logs = container_logs(&head_1);
    assert!(
        logs.contains("drained: every worker moved"),
        "head-1 did not report a finished drain:\n{logs}"
    );

    scene.look();
    let after = scene.settle("after head-1 stopped");
    let mut gaps = Vec::new();
    for (worker, was) in &orphans {
        let now = after.status(worker).unwrap();
        assert_eq!(now.head_id, "head-2", "{worker} after the drain: {now:?}");
        assert_eq!(
            now.reassignments,
            was.reassignments + 1,
            "{worker} should have moved exactly once\nbefore: {was:?}\nafter: {now:?}"
        );
        gaps.push((now.max_head_beat_gap_ms, worker.clone()));
    }
    gaps.sort();
    say(format_args!(
        "compose stop head-1: {} workers moved to head-2, head-1 exited 0 after {took:.1?}; max HeadBeat gap per moved worker (ms): {:?}",
        orphans.len(),
        gaps.iter().map(|g| g.0).collect::<Vec<_>>()
    ));
    // A missed beat makes a gap of two intervals or more.
    let limit = INTERVAL.as_millis() as u64 * 2;
    let missed: Vec<_> = gaps.iter().filter(|g| g.0 >= limit).collect();
    assert!(
        missed.is_empty(),
        "workers that missed a HeadBeat across the drain (gap ms >= {limit}): {missed:?}"
    );

    // tetherctl, run inside the cluster's networks, agrees.
    let head_2 = scene.project.container("head-2");
    let status = must(
        "docker",
        &["exec", &head_2, "tetherctl", "status", "--brief"],
    );
    assert!(
        status.contains("head-2") && !status.contains("head-1"),
        "tetherctl status after head-1 stopped:\n{status}"
    );
}

/// Everything a container wrote; `docker logs` hands its stdout and
/// stderr back on the same streams.
fn container_logs(container: &str) -> String {
    let output = run_to_exit(Path::new("docker"), &["logs", container], COMMAND_TIMEOUT)
        .unwrap_or_else(|e| panic!("docker logs {container}: {e}"));
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// What the sampler saw: every `SAMPLE_EVERY`, the `ListWorkers` of each
/// head; a worker on two heads under one epoch is never allowed, and on
/// two heads under different epochs (the old head has not yet noticed the
/// worker left) only for a bounded time.
#[derive(Debug, Default)]
struct Samples {
    rounds: u64,
    unanswered: u64,
    longest_overlap: Duration,
    violations: Vec<String>,
}

/// How often the sampler looks.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How long a worker may stay listed by two heads under different epochs:
/// the old head drops a silent stream after the heartbeat timeout; one
/// second more for a loaded machine.
const OVERLAP_LIMIT: Duration = Duration::from_secs(2);

async fn sample(heads: Vec<Member>, stop: Arc<AtomicBool>) -> Samples {
    let mut probe = Probe::new();
    let mut seen = Samples::default();
    let mut overlap_since: HashMap<String, Instant> = HashMap::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut listed: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        for head in &heads {
            match probe.list_workers(head.addr).await {
                Ok(l) => {
                    for w in l.workers {
                        listed
                            .entry(w.worker_id)
                            .or_default()
                            .push((head.id.clone(), w.epoch));
                    }
                }
                Err(_) => seen.unanswered += 1,
            }
        }
        seen.rounds += 1;
        let now = Instant::now();
        overlap_since.retain(|w, _| listed.get(w).is_some_and(|on| on.len() > 1));
        for (worker, on) in listed.iter().filter(|(_, on)| on.len() > 1) {
            let epochs: BTreeSet<u64> = on.iter().map(|(_, e)| *e).collect();
            if epochs.len() < on.len() {
                seen.violations.push(format!(
                    "{:.1?}: {worker} listed by {on:?} under one epoch",
                    started.elapsed()
                ));
            }
            let since = *overlap_since.entry(worker.clone()).or_insert(now);
            let held = now - since;
            seen.longest_overlap = seen.longest_overlap.max(held);
            if held > OVERLAP_LIMIT && reported.insert(worker.clone()) {
                seen.violations.push(format!(
                    "{:.1?}: {worker} listed by {on:?} for {held:.1?}",
                    started.elapsed()
                ));
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    seen
}

#[test]
fn network_partitions_never_attach_a_worker_to_two_heads_and_heal() {
    let Some(docker) =
        docker_or_skip("network_partitions_never_attach_a_worker_to_two_heads_and_heal")
    else {
        return;
    };
    let mut scene = Scene::start(&docker, "partition", 6);
    let view = scene.settle("started with 6 workers");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = scene.rt.spawn(sample(scene.heads.clone(), stop.clone()));
    let head_1 = scene.project.container("head-1");

    // 1. head-1 cut off from Redis, not from its workers: it cannot refresh
    //    its lease, so it turns unready; no worker ends up on both heads.
    let cut = scene.project.disconnect(&head_1, "registry");
    scene.wait_ready("head-1", false, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    scene.project.connect(&cut);
    scene.settle("head-1 back on the registry network");

    // 2. A worker cut off from its head (all heads) but not from Redis: it
    //    turns unattached and its head lets it go; healed, it attaches
    //    again.
    let view_now = scene.view();
    let (worker, status) = view_now
        .statuses
        .iter()
        .find_map(|(w, s)| s.as_ref().ok().map(|s| (w.clone(), s.clone())))
        .unwrap();
    let container = scene.containers[&worker].clone();
    let cut = scene.project.disconnect(&container, "beats");
    scene.wait_view(
        &format!(
            "{worker} cut off from {} is unattached and listed by no head",
            status.head_id
        ),
        HEARTBEAT_TIMEOUT * 5,
        |v| v.status(&worker).is_some_and(|s| !s.attached) && !v.listed_by().contains_key(&worker),
    );
    std::thread::sleep(Duration::from_secs(2));
    scene.project.connect(&cut);
    scene.settle(&format!("{worker} back on the beats network"));

    // 3. head-1 cut off from everything: its workers move to head-2, it
    //    lets them go and turns unready. Healed, it registers again and
    //    every worker is on exactly one live head.
    let cuts = [
        scene.project.disconnect(&head_1, "registry"),
        scene.project.disconnect(&head_1, "beats"),
    ];
    scene.wait_view(
        "head-1 cut off from everything: every worker on head-2, head-1 lists none",
        Duration::from_secs(15),
        |v| {
            v.statuses.values().all(|s| {
                s.as_ref()
                    .is_ok_and(|s| s.attached && s.head_id == "head-2")
            }) && v.listings["head-1"]
                .as_ref()
                .is_ok_and(|l| l.workers.is_empty())
        },
    );
    assert!(
        !scene.ready("head-1"),
        "head-1 is ready although it cannot reach Redis"
    );
    std::thread::sleep(Duration::from_secs(2));
    for cut in &cuts {
        scene.project.connect(cut);
    }
    scene.wait_ready("head-1", true, Duration::from_secs(15));
    scene.settle("head-1 back on both networks");

    stop.store(true, Ordering::Relaxed);
    let samples = scene.rt.block_on(sampler).unwrap();
    say(format_args!(
        "sampled both heads' ListWorkers {} times ({} unanswered); longest time a worker was listed by two heads: {:.1?}; started with {:?}",
        samples.rounds,
        samples.unanswered,
        samples.longest_overlap,
        loads(&view)
    ));
    assert!(
        samples.violations.is_empty(),
        "workers attached to two heads:\n{}",
        samples.violations.join("\n")
    );
}

/// Removes an image when dropped.
struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = run_to_exit(
            Path::new("docker"),
            &["image", "rm", "--force", &self.0],
            COMMAND_TIMEOUT,
        );
    }
}

/// The README's `make image` where the Dockerfile's base cannot be pulled:
/// it says so, names the registry-free commands, and builds the image
/// from host binaries on the local base by itself. The Rust image is one
/// no registry has, so the fallback is certain on any machine; the
/// binaries are this test run's (`IMAGE_BINARIES`), not a release build.
#[test]
fn make_image_without_a_registry_says_so_and_builds_on_the_local_base() {
    let Some(docker) =
        docker_or_skip("make_image_without_a_registry_says_so_and_builds_on_the_local_base")
    else {
        return;
    };
    // The base exists by now (`docker_or_skip` built it), as after the
    // first `make image` of a machine.
    let _ = &docker.image;
    let tag = format!("tether-test-make:{}", std::process::id());
    let _remove = RemoveImage(tag.clone());
    let rust_image = "registry.invalid/tether/no-such-rust:1";
    let binaries = Path::new(env!("CARGO_BIN_EXE_tether-head"))
        .parent()
        .unwrap();
    let args = [
        "-C".to_owned(),
        repo().display().to_string(),
        "image".to_owned(),
        format!("IMAGE={tag}"),
        format!("RUST_IMAGE={rust_image}"),
        format!("IMAGE_BINARIES={}", binaries.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let output = run_to_exit(Path::new("make"), &args, BASE_TIMEOUT)
        .unwrap_or_else(|e| panic!("make {}: {e}", args.join(" ")));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "make image failed ({}):\n{log}",
        output.status
    );
    say(format_args!(
        "make image with {rust_image} unpullable: built {tag} in {:.1?}",
        started.elapsed()
    ));
    for expected in [
        format!("build-image: cannot pull {rust_image} ("),
        format!("sudo scripts/container-base.sh && make image-prebuilt RUNTIME_BASE={BASE_IMAGE}"),
        format!("built {tag} in "),
    ] {
        assert!(
            log.contains(&expected),
            "make image did not say {expected:?}:\n{log}"
        );
    }
    assert!(
        !log.contains("docker build -t"),
        "make image tried the Dockerfile anyway:\n{log}"
    );

    // All three binaries, run as the unprivileged user, on the local base
    // (the only one of the two bases with redis-server).
    for bin in ["tether-head", "tether-worker", "tetherctl"] {
        let version = must("docker", &["run", "--rm", &tag, bin, "--version"]);
        assert!(version.contains(bin), "{bin} --version: {version:?}");
    }
    let uid = must("docker", &["run", "--rm", &tag, "id", "-u"]);
    assert_eq!(uid.trim(), "10001");
    must(
        "docker",
        &["run", "--rm", &tag, "redis-server", "--version"],
    );
}

/// The worker streams each head reports in `tetherctl status --brief`.
fn brief_streams(status: &str) -> BTreeMap<String, usize> {
    status
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let head = fields.first()?;
            if !head.starts_with("head-") {
                return None;
            }
            Some((head.to_string(), fields.get(4)?.parse().ok()?))
        })
        .collect()
}

/// The README's Compose commands as written, through `scripts/compose.sh`
/// with neither TETHER_REDIS_IMAGE nor a compose tool named: `up -d
/// --scale worker=N` (Redis from the local base where redis:7-bookworm
/// cannot be pulled), `exec head-2 tetherctl status --brief` with no
/// terminal, `stop head-1` (a drain) and `logs head-1`.
#[test]
fn readme_compose_commands_run_through_scripts_compose_sh() {
    let Some(docker) = docker_or_skip("readme_compose_commands_run_through_scripts_compose_sh")
    else {
        return;
    };
    let quick = Duration::from_secs(30);
    let redis_here = succeeds("docker", &["image", "inspect", "redis:7-bookworm"], quick).is_ok()
        || succeeds(
            "docker",
            &["manifest", "inspect", "redis:7-bookworm"],
            quick,
        )
        .is_ok();
    let project = Project::readme(&docker, "readme");
    const WORKERS: usize = 4;

    let started = Instant::now();
    let scale = format!("worker={WORKERS}");
    let up = project.try_compose(&["up", "-d", "--scale", &scale]);
    let said = String::from_utf8_lossy(&up.stderr).into_owned();
    assert!(
        up.status.success(),
        "compose.sh up failed ({}):\n{said}",
        up.status
    );
    eprintln!(
        "compose.sh up with {WORKERS} workers: {:.1?}\n{said}",
        started.elapsed()
    );
    let redis_image = must(
        "docker",
        &[
            "inspect",
            "--format",
            "{{.Config.Image}}",
            &project.container("redis"),
        ],
    );
    if redis_here {
        say(format_args!(
            "redis:7-bookworm is available here; Redis ran from {}",
            redis_image.trim()
        ));
    } else {
        assert!(
            said.contains(&format!("Redis runs from {BASE_IMAGE}")),
            "compose.sh did not say where Redis runs from:\n{said}"
        );
        assert_eq!(
            redis_image.trim(),
            BASE_IMAGE,
            "the Redis container's image"
        );
    }

    // `exec` as the README writes it (compose.sh adds -T: no terminal here).
    let status_until = |what: &str, ok: &dyn Fn(&BTreeMap<String, usize>) -> bool| -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = project.try_compose(&["exec", "head-2", "tetherctl", "status", "--brief"]);
            let status = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && ok(&brief_streams(&status)) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: `compose.sh exec head-2 tetherctl status --brief` never showed it; last ({}):\n{status}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    };
    let status = status_until("both heads, every worker", &|s| {
        s.len() == 2 && s.values().sum::<usize>() == WORKERS
    });
    eprintln!("tetherctl status --brief:\n{status}");

    // `stop head-1`: it drains to head-2; `logs head-1` shows it.
    let stopped = Instant::now();
    project.compose(&["stop", "head-1"]);
    let took = stopped.elapsed();
    let logs = project.try_compose(&["logs", "--no-color", "head-1"]);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(
        logs.contains("draining on signal"),
        "compose.sh logs head-1 shows no drain:\n{logs}"
    );
    let status = status_until("every worker on head-2", &|s| {
        s.len() == 1 && s.get("head-2") == Some(&WORKERS)
    });
    say(format_args!(
        "README compose commands through scripts/compose.sh: up, exec, stop head-1 ({took:.1?}), logs; \
         then head-2 holds all {WORKERS} workers:\n{status}"
    ));
}
