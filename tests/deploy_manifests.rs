//! The deployment files say only what the binaries understand:
//! `docker-compose.yml` and `deploy/kubernetes/*.yaml` pass no `--flag`
//! and no `TETHER_*` variable that `tether-head --help` or
//! `tether-worker --help` does not list, and their time budgets fit the
//! drain (a grace period shorter than the drain gets a head SIGKILLed
//! mid-drain). Also the two Dockerfiles end in the same runtime image.
//!
//! The YAML is parsed with `yaml-rust2` (a maintained YAML 1.2 parser;
//! `serde_yaml` and `serde_yml` are deprecated), so any layout YAML allows
//! reads the same; a file that does not parse fails the test. Compose's
//! merge keys (`<<: *anchor`) are not followed: the anchored `x-` blocks
//! are checked as parts of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use tether_testkit::localcluster::run_to_exit;
use yaml_rust2::{Yaml, YamlLoader};

/// Which binary a piece of a manifest configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Head,
    Worker,
    /// Settings shared by head and worker services (a compose anchor).
    Both,
    /// Not a Tether binary (Redis): may not carry Tether settings.
    Other,
}

/// What one binary accepts, read from its `--help`.
#[derive(Debug, Default)]
struct Accepted {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

fn accepted(binary: &str) -> Accepted {
    let output = run_to_exit(Path::new(binary), &["--help"], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{binary} --help: {e}"));
    assert!(
        output.status.success(),
        "{binary} --help: {}",
        output.status
    );
    let help = String::from_utf8_lossy(&output.stdout);
    let mut accepted = Accepted::default();
    for line in help.lines().map(str::trim_start) {
        // Option lines: `--name <VALUE>` or `-h, --help`.
        if line.starts_with('-') {
            if let Some(flag) = flags_in(line).into_iter().next() {
                accepted.flags.insert(flag);
            }
        }
        if let Some(rest) = line.strip_prefix("[env: ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            accepted.env.insert(name);
        }
    }
    assert!(
        accepted.flags.contains("--redis-url") && accepted.env.contains("TETHER_REDIS_URL"),
        "could not read {binary} --help: {accepted:?}"
    );
    accepted
}

/// Every `--flag` token in a line.
fn flags_in(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("--") {
        let after = &rest[at + 2..];
        let before_ok = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric();
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if before_ok && name.starts_with(|c: char| c.is_ascii_lowercase()) {
            out.push(format!("--{name}"));
        }
        rest = &after[name.len()..];
    }
    out
}

/// A scalar as text (numbers and booleans as YAML writes them).
fn scalar(node: &Yaml) -> Option<String> {
    match node {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Every node of a tree in document order, with the key it sits under
/// (`None` for sequence items and the root). Compose merge keys (`<<`) are
/// skipped: what they merge in is a part of its own.
fn walk<'a>(
    node: &'a Yaml,
    key: Option<&'a Yaml>,
    visit: &mut impl FnMut(Option<&'a Yaml>, &'a Yaml),
) {
    visit(key, node);
    match node {
        Yaml::Hash(map) => {
            for (k, v) in map {
                if k.as_str() == Some("<<") {
                    continue;
                }
                walk(v, Some(k), visit);
            }
        }
        Yaml::Array(items) => {
            for item in items {
                walk(item, None, visit);
            }
        }
        _ => {}
    }
}

/// The `TETHER_*` variable a text names, up to its first other character.
fn tether_name(text: &str) -> Option<String> {
    let t = text.trim_start_matches('"');
    t.starts_with("TETHER_").then(|| {
        t.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    })
}

/// One part of a manifest that configures a binary.
#[derive(Debug)]
struct Part {
    /// File and part name, for messages.
    place: String,
    role: Role,
    node: Yaml,
}

impl Part {
    /// Every node with the key it sits under, in document order.
    fn nodes(&self) -> Vec<(Option<&Yaml>, &Yaml)> {
        let mut out = Vec::new();
        walk(&self.node, None, &mut |k, v| out.push((k, v)));
        out
    }

    /// Every scalar's text, keys included.
    fn texts(&self) -> Vec<String> {
        self.nodes()
            .into_iter()
            .flat_map(|(k, v)| [k.and_then(scalar), scalar(v)])
            .flatten()
            .collect()
    }

    fn flags(&self) -> Vec<String> {
        self.nodes()
            .into_iter()
            .filter_map(|(_, v)| scalar(v))
            .flat_map(|t| flags_in(&t))
            .collect()
    }

    /// The `TETHER_*` names it defines: a compose map key
    /// (`TETHER_X: value`), a compose list entry (`- TETHER_X=value`) or a
    /// Kubernetes env entry (`- name: TETHER_X`).
    fn env(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, node) in self.nodes() {
            match node {
                Yaml::Hash(map) => {
                    for (k, v) in map {
                        let k = k.as_str().unwrap_or("");
                        if k.starts_with("TETHER_") {
                            out.extend(tether_name(k));
                        }
                        if k == "name" {
                            out.extend(v.as_str().and_then(tether_name));
                        }
                    }
                }
                Yaml::String(s) if key.is_none() => out.extend(tether_name(s)),
                _ => {}
            }
        }
        out
    }

    /// The first scalar value under `key`.
    fn value(&self, key: &str) -> Option<String> {
        self.nodes()
            .into_iter()
            .find(|(k, v)| k.and_then(|k| k.as_str()) == Some(key) && scalar(v).is_some())
            .and_then(|(_, v)| scalar(v))
    }

    /// The value given to env var `name`, compose style (a map or
    /// `NAME=value` items) or Kubernetes style (`name:` and `value:`).
    fn env_value(&self, name: &str) -> Option<String> {
        self.nodes().into_iter().find_map(|(key, node)| match node {
            Yaml::Hash(map) => {
                if let Some(v) = map.get(&Yaml::String(name.to_owned())) {
                    return scalar(v);
                }
                (map.get(&Yaml::String("name".to_owned()))?.as_str() == Some(name))
                    .then(|| map.get(&Yaml::String("value".to_owned())).and_then(scalar))
                    .flatten()
            }
            Yaml::String(s) if key.is_none() => s
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('='))
                .map(str::to_owned),
            _ => None,
        })
    }

    /// Whether some key `key` holds the scalar `value`.
    fn has(&self, key: &str, value: &str) -> bool {
        self.nodes().into_iter().any(|(k, v)| {
            k.and_then(|k| k.as_str()) == Some(key) && scalar(v).as_deref() == Some(value)
        })
    }

    /// Whether some key is `key`.
    fn has_key(&self, key: &str) -> bool {
        self.nodes()
            .into_iter()
            .any(|(k, _)| k.and_then(|k| k.as_str()) == Some(key))
    }

    /// Whether a list under `key` (or a map under it, by its keys) holds
    /// `item`.
    fn lists(&self, key: &str, item: &str) -> bool {
        self.nodes().into_iter().any(|(k, v)| {
            k.and_then(|k| k.as_str()) == Some(key)
                && match v {
                    Yaml::Array(items) => items.iter().any(|i| i.as_str() == Some(item)),
                    Yaml::Hash(map) => map.keys().any(|i| i.as_str() == Some(item)),
                    _ => false,
                }
        })
    }

    /// Whether any key or scalar holds `needle`.
    fn mentions(&self, needle: &str) -> bool {
        self.texts().iter().any(|t| t.contains(needle))
    }
}

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The YAML documents of a file; a file that does not parse fails.
fn documents(place: &str, text: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{place}: not YAML: {e}"))
}

/// docker-compose.yml in parts: each service, and each top-level `x-`
/// extension (anchors the services merge in).
fn compose_parts() -> Vec<Part> {
    let docs = documents("docker-compose.yml", &read("docker-compose.yml"));
    let root = docs
        .into_iter()
        .next()
        .expect("docker-compose.yml has a document");
    let map = root.as_hash().expect("docker-compose.yml is a map");
    let mut parts = Vec::new();
    for (key, node) in map {
        let key = key.as_str().unwrap_or("");
        if key.starts_with("x-") {
            parts.push(compose_part(key, node.clone()));
        }
        if key == "services" {
            for (name, service) in node.as_hash().expect("services is a map") {
                let name = name.as_str().expect("a service name");
                parts.push(compose_part(name, service.clone()));
            }
        }
    }
    parts
}

fn compose_part(name: &str, node: Yaml) -> Part {
    let role = match name {
        "x-tether" => Role::Both,
        n if n.starts_with("x-head") || n.starts_with("head") => Role::Head,
        n if n.starts_with("worker") => Role::Worker,
        "redis" => Role::Other,
        other => panic!(
            "docker-compose.yml has a new part {other:?}: tell tests/deploy_manifests.rs what it runs"
        ),
    };
    Part {
        place: format!("docker-compose.yml {name}"),
        role,
        node,
    }
}

/// Every Kubernetes manifest, one part per YAML document, with the role
/// named by its `app.kubernetes.io/component` label.
fn kubernetes_parts() -> Vec<Part> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut parts = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        let place = format!("deploy/kubernetes/{name}");
        for (i, node) in documents(&place, &text).into_iter().enumerate() {
            let kind = node["kind"].as_str().map(str::to_owned);
            if kind.is_none() || kind.as_deref() == Some("Kustomization") {
                continue;
            }
            let mut part = Part {
                place: format!("{place} document {}", i + 1),
                role: Role::Other,
                node,
            };
            part.role = match part.value("app.kubernetes.io/component").as_deref() {
                Some("head") => Role::Head,
                Some("worker") => Role::Worker,
                Some("redis") => Role::Other,
                other => panic!(
                    "{}: component label {other:?} is not head, worker or redis",
                    part.place
                ),
            };
            parts.push(part);
        }
    }
    parts
}

/// Parses `45s`, `30s`, `1m`, `1500ms` (what these files use).
fn seconds(text: &str) -> f64 {
    let text = text.trim().trim_matches('"');
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    number
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("not a duration: {text:?}"))
        * scale
}

/// The head's default `--shutdown-timeout`, from its `--help`.
fn default_shutdown_timeout() -> f64 {
    let output = run_to_exit(
        Path::new(env!("CARGO_BIN_EXE_tether-head")),
        &["--help"],
        Duration::from_secs(30),
    )
    .unwrap();
    let help = String::from_utf8_lossy(&output.stdout).into_owned();
    let after = help
        .split("--shutdown-timeout")
        .nth(1)
        .expect("--shutdown-timeout is in --help");
    let default = after
        .split("[default: ")
        .nth(1)
        .and_then(|d| d.split(']').next())
        .expect("--shutdown-timeout has a default");
    seconds(default)
}

#[test]
fn manifests_pass_only_flags_and_variables_the_binaries_accept() {
    let head = accepted(env!("CARGO_BIN_EXE_tether-head"));
    let worker = accepted(env!("CARGO_BIN_EXE_tether-worker"));
    let mut problems = Vec::new();
    let mut checked: BTreeMap<Role, usize> = BTreeMap::new();
    let parts: Vec<Part> = compose_parts()
        .into_iter()
        .chain(kubernetes_parts())
        .collect();
    for part in &parts {
        let against: Vec<(&str, &Accepted)> = match part.role {
            Role::Head => vec![("tether-head", &head)],
            Role::Worker => vec![("tether-worker", &worker)],
            Role::Both => vec![("tether-head", &head), ("tether-worker", &worker)],
            Role::Other => {
                for name in part.env() {
                    problems.push(format!(
                        "{}: sets {name}, but it runs no Tether binary",
                        part.place
                    ));
                }
                continue;
            }
        };
        for flag in part.flags() {
            *checked.entry(part.role).or_default() += 1;
            for (binary, accepted) in &against {
                if !accepted.flags.contains(&flag) {
                    problems.push(format!("{}: {binary} has no flag {flag}", part.place));
                }
            }
        }
        for name in part.env() {
            *checked.entry(part.role).or_default() += 1;
            for (binary, accepted) in &against {
                if !accepted.env.contains(&name) {
                    problems.push(format!("{}: {binary} reads no variable {name}", part.place));
                }
            }
        }
    }
    eprintln!("settings checked per role: {checked:?}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The reading found something to check in each kind of part.
    for role in [Role::Head, Role::Worker] {
        assert!(
            checked.get(&role).copied().unwrap_or(0) >= 3,
            "few settings found for {role:?}: {checked:?}"
        );
    }
}

#[test]
fn kubernetes_env_references_come_from_earlier_entries() {
    // Kubernetes expands $(NAME) only from variables defined earlier in the
    // same list; a later or missing one stays literal text.
    let mut problems = Vec::new();
    for part in kubernetes_parts() {
        let mut defined: BTreeSet<String> = BTreeSet::new();
        for (_, node) in part.nodes() {
            let Yaml::Hash(entry) = node else { continue };
            if let Some(name) = entry.get(&Yaml::String("name".to_owned())).and_then(scalar) {
                defined.insert(name);
            }
            let Some(value) = entry
                .get(&Yaml::String("value".to_owned()))
                .and_then(scalar)
            else {
                continue;
            };
            let mut rest = value.as_str();
            while let Some(at) = rest.find("$(") {
                let name: String = rest[at + 2..].chars().take_while(|c| *c != ')').collect();
                if !defined.contains(&name) {
                    problems.push(format!(
                        "{}: $({name}) is not defined before its use",
                        part.place
                    ));
                }
                rest = &rest[at + 2 + name.len()..];
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn kubernetes_heads_advertise_the_pod_ip_probe_health_and_outlast_their_drain() {
    let parts = kubernetes_parts();
    let deployment = |role: Role| {
        parts
            .iter()
            .find(|p| p.role == role && p.value("kind").as_deref() == Some("Deployment"))
            .unwrap_or_else(|| panic!("no {role:?} Deployment in deploy/kubernetes"))
    };
    let head = deployment(Role::Head);
    assert!(
        head.has("fieldPath", "status.podIP"),
        "{}: POD_IP from the downward API",
        head.place
    );
    assert_eq!(
        head.env_value("TETHER_ADVERTISE").as_deref(),
        Some("$(POD_IP):7070")
    );
    assert_eq!(head.value("containerPort").as_deref(), Some("7070"));
    for service in ["", "tether.v1.HeadService"] {
        assert!(
            head.has("service", service),
            "{}: a gRPC probe with service {service:?}",
            head.place
        );
    }
    assert!(head.has_key("preStop"), "{}: a preStop hook", head.place);

    let grace = seconds(
        &head
            .value("terminationGracePeriodSeconds")
            .expect("a grace period"),
    );
    let drain = seconds(
        &head
            .env_value("TETHER_DRAIN_TIMEOUT")
            .expect("TETHER_DRAIN_TIMEOUT"),
    );
    let shutdown = head
        .env_value("TETHER_SHUTDOWN_TIMEOUT")
        .map_or_else(default_shutdown_timeout, |v| seconds(&v));
    // preStop's `command: ["sleep", "N"]`.
    let pre_stop = head
        .nodes()
        .into_iter()
        .find_map(|(k, v)| match (k.and_then(|k| k.as_str()), v.as_vec()) {
            (Some("command"), Some(c)) if c.first().and_then(Yaml::as_str) == Some("sleep") => {
                c.get(1).and_then(scalar)
            }
            _ => None,
        })
        .map_or(0.0, |n| seconds(&n));
    assert!(
        grace > pre_stop + drain + shutdown,
        "{}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} s + drain {drain} s + shutdown {shutdown} s",
        head.place
    );

    let worker = deployment(Role::Worker);
    assert_eq!(
        worker.env_value("TETHER_ADVERTISE").as_deref(),
        Some("$(POD_IP):7071")
    );
    assert!(
        worker.has("service", "tether.v1.WorkerService"),
        "{}: readiness on WorkerService",
        worker.place
    );
    // Least privilege: workers find heads through them, never Redis.
    assert!(
        !worker.mentions("REDIS") && !worker.mentions("redis"),
        "{}: workers must get no Redis address or password",
        worker.place
    );
    let heads = worker.env_value("TETHER_HEADS").expect("TETHER_HEADS");
    let service = heads.split(':').next().unwrap();
    let peers = parts
        .iter()
        .find(|p| {
            p.value("kind").as_deref() == Some("Service")
                && p.value("name").as_deref() == Some(service)
        })
        .unwrap_or_else(|| {
            panic!("workers bootstrap from {heads}, but no Service {service} exists")
        });
    assert!(
        peers.has("clusterIP", "None"),
        "{}: {service} must be headless so its name resolves to every head",
        peers.place
    );

    let hpa = parts
        .iter()
        .find(|p| p.value("kind").as_deref() == Some("HorizontalPodAutoscaler"))
        .expect("an HPA example");
    assert_eq!(hpa.role, Role::Head);
    assert_eq!(hpa.value("name").as_deref(), Some("tether-head"));
}

#[test]
fn compose_heads_outlast_their_drain_and_workers_can_scale() {
    let parts = compose_parts();
    let part = |name: &str| {
        parts
            .iter()
            .find(|p| p.place.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("docker-compose.yml has no {name}"))
    };
    let env = part("x-head-env");
    let drain = seconds(
        &env.env_value("TETHER_DRAIN_TIMEOUT")
            .expect("TETHER_DRAIN_TIMEOUT"),
    );
    let shutdown = env
        .env_value("TETHER_SHUTDOWN_TIMEOUT")
        .map_or_else(default_shutdown_timeout, |v| seconds(&v));
    for name in ["head-1", "head-2"] {
        let head = part(name);
        let grace = seconds(&head.value("stop_grace_period").expect("stop_grace_period"));
        assert!(
            grace > drain + shutdown,
            "{name}: stop_grace_period {grace} s must exceed drain {drain} s + shutdown {shutdown} s"
        );
        // Heads advertise an alias of the beats network, which must exist.
        let advertise = head
            .env_value("TETHER_ADVERTISE")
            .expect("TETHER_ADVERTISE");
        let host = advertise.split(':').next().unwrap();
        assert!(
            head.lists("aliases", host),
            "{name} advertises {advertise}, but has no network alias {host}"
        );
    }
    // `--scale worker=N` needs replicas without fixed names, ids or ports.
    let worker = part("worker");
    for fixed in ["container_name", "hostname", "ports"] {
        assert!(
            !worker.has_key(fixed),
            "the worker service sets {fixed}, so it cannot scale"
        );
    }
    assert!(
        !worker.mentions("TETHER_ID"),
        "the worker service sets TETHER_ID, so it cannot scale"
    );
    // Least privilege: workers reach heads only, never Redis.
    assert!(
        !worker.mentions("REDIS") && !worker.lists("networks", "registry"),
        "the worker service gets a Redis address or the registry network"
    );
    let heads = worker.env_value("TETHER_HEADS").expect("TETHER_HEADS");
    for entry in heads.split(',') {
        let host = entry.split(':').next().unwrap();
        assert!(
            parts.iter().any(|p| p.lists("aliases", host)),
            "workers bootstrap from {entry}, which no head has as an alias"
        );
    }
}

#[test]
fn both_dockerfiles_end_in_the_same_runtime_image() {
    let runtime = |path: &str| -> Vec<String> {
        let text = read(path);
        let last_stage = text.rsplit("\nFROM ").next().unwrap().to_owned();
        last_stage
            .lines()
            .filter(|l| {
                ["USER ", "EXPOSE ", "ENTRYPOINT ", "CMD ", "STOPSIGNAL "]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(str::to_owned)
            .collect()
    };
    let built = runtime("Dockerfile");
    let prebuilt = runtime("deploy/Dockerfile.prebuilt");
    assert!(built.len() >= 4, "Dockerfile's runtime stage: {built:?}");
    assert_eq!(
        built, prebuilt,
        "Dockerfile and deploy/Dockerfile.prebuilt differ in their runtime settings"
    );
}
