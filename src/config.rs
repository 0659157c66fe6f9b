//! Flag types both binaries share (durations, Redis URLs, ids) and the
//! checks that run before anything binds, so bad configuration fails with
//! one clear line instead of a half-started process.

use std::time::Duration;

/// Why a flag or setting is refused. The message is the one line a user
/// sees before the process exits (`NAME: invalid configuration: ...`), and
/// names what to fix; the variant lets a caller tell the cases apart.
/// Configuration does not get better by retrying: none of these is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration written as a bare number.
    #[error("'{0}' has no unit; write e.g. 500ms, 2s or 1m")]
    DurationWithoutUnit(String),
    /// A duration with spaces in it (`3 s`, `1m 30s`).
    #[error("'{0}' is not a duration; write e.g. 500ms, 2s or 1m, without spaces")]
    DurationWithSpaces(String),
    /// A duration whose unit is not one of ms, s, m, h (and humantime's).
    #[error("'{text}' has unknown unit '{unit}'; use ms, s, m or h")]
    DurationUnknownUnit {
        /// The duration as written.
        text: String,
        /// The unit that was not understood.
        unit: String,
    },
    /// Not a duration at all.
    #[error("'{0}' is not a duration; write e.g. 500ms, 2s or 1m")]
    NotADuration(String),
    /// A duration over a year.
    #[error("'{0}' is out of range")]
    DurationOutOfRange(String),
    /// A duration under the flag's minimum of a second.
    #[error("'{0}' is too short; the minimum is 1s")]
    DurationUnderASecond(String),
    /// A Redis URL that does not parse; the message never repeats the URL,
    /// which may hold a password.
    #[error("{0}")]
    RedisUrl(String),
    /// An empty id; `what` names the id (`worker_id`, `namespace`, ...).
    #[error("{what} is empty")]
    IdEmpty {
        /// Which id.
        what: String,
    },
    /// An id over `MAX_ID_LEN` (128) bytes.
    #[error("{what} is {len} bytes long; the limit is {MAX_ID_LEN}")]
    IdTooLong {
        /// Which id.
        what: String,
        /// Its length in bytes.
        len: usize,
    },
    /// An id with a control or whitespace character.
    #[error("{what} holds a non-printable character ({character:?})")]
    IdNotPrintable {
        /// Which id.
        what: String,
        /// The first such character.
        character: char,
    },
    /// A namespace with a brace, which would break the hash tag.
    #[error("namespace must not contain '{{' or '}}'")]
    NamespaceBrace,
    /// A `--heads` entry that is not host:port.
    #[error("{0:?} is not host:port (for example head-1.example:7070 or 10.0.0.5:7070)")]
    HeadAddr(String),
    /// A heartbeat interval of 0.
    #[error("--heartbeat-interval must be larger than 0")]
    ZeroHeartbeatInterval,
    /// A heartbeat timeout that leaves no room for a late beat.
    #[error(
        "--heartbeat-timeout ({timeout:?}) must be larger than --heartbeat-interval ({interval:?})"
    )]
    HeartbeatTimeout {
        /// The timeout given.
        timeout: Duration,
        /// The interval given.
        interval: Duration,
    },
    /// A lease TTL under `MIN_LEASE_INTERVALS` (2.5) heartbeat intervals.
    #[error("--lease-ttl ({lease_ttl:?}) must be at least {MIN_LEASE_INTERVALS} x --heartbeat-interval ({interval:?}) = {least:?}: a head whose lease has run down past half counts as stale, so a shorter lease marks healthy heads stale between refreshes")]
    LeaseTtl {
        /// The TTL given.
        lease_ttl: Duration,
        /// The interval given.
        interval: Duration,
        /// The shortest TTL that interval allows.
        least: Duration,
    },
}

/// For callers that report errors as text (clap, `tonic::Status`, the
/// bench's `Result<_, String>`): the same message.
impl From<ConfigError> for String {
    fn from(e: ConfigError) -> Self {
        e.to_string()
    }
}

/// Parses durations written like `500ms`, `2s`, `1m` or `1.5s` (with
/// humantime, without spaces), up to a year.
///
/// A bare number is rejected on purpose: `--lease-ttl 3` is ambiguous.
pub fn parse_duration(text: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(ConfigError::DurationWithoutUnit(text.to_owned()));
    }
    // One number and its unit, written together, as always: humantime
    // alone would also take "3 s" and "1m 30s".
    if text.contains(char::is_whitespace) {
        return Err(ConfigError::DurationWithSpaces(text.to_owned()));
    }
    let d = humantime::parse_duration(text).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } => ConfigError::DurationUnknownUnit {
            text: text.to_owned(),
            unit,
        },
        _ => ConfigError::NotADuration(text.to_owned()),
    })?;
    if d > Duration::from_secs(86_400 * 365) {
        return Err(ConfigError::DurationOutOfRange(text.to_owned()));
    }
    Ok(d)
}

/// Checks that a Redis URL parses, without connecting. The error never
/// repeats the URL, which may hold a password.
pub fn parse_redis_url(text: &str) -> Result<String, ConfigError> {
    crate::registry::Topology::parse(text)
        .map(|_| text.to_owned())
        .map_err(ConfigError::RedisUrl)
}

/// The longest id a worker or head may have, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why an id is refused. The message is what a caller needs to fix it.
pub fn validate_id(what: &str, id: &str) -> Result<(), ConfigError> {
    let what = || what.to_owned();
    if id.is_empty() {
        return Err(ConfigError::IdEmpty { what: what() });
    }
    if id.len() > MAX_ID_LEN {
        return Err(ConfigError::IdTooLong {
            what: what(),
            len: id.len(),
        });
    }
    if let Some(character) = id.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(ConfigError::IdNotPrintable {
            what: what(),
            character,
        });
    }
    Ok(())
}

/// Heartbeat timing shared by heads and workers.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often beats are sent both ways.
    pub heartbeat_interval: Duration,
    /// Silence after which the other side counts as gone.
    pub heartbeat_timeout: Duration,
}

impl Timing {
    /// The timeout must leave room for at least one late beat, or every
    /// jitter on the wire would look like a failure.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval.is_zero() {
            return Err(ConfigError::ZeroHeartbeatInterval);
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(ConfigError::HeartbeatTimeout {
                timeout: self.heartbeat_timeout,
                interval: self.heartbeat_interval,
            });
        }
        Ok(())
    }
}

/// Lease TTLs shorter than this many heartbeat intervals are refused.
///
/// The registry counts a head as `stale` (tried last, not counted as live)
/// once its lease has run down past half its TTL (`pttl < ttl / 2`, see
/// `LIVE_HEADS`). A head refreshes once every interval plus the refresh's
/// own latency, so just before a refresh its lease has `ttl - interval`
/// left: with a TTL under 2 intervals a healthy head counts as stale for
/// part of every interval. Half an interval more leaves room for a late
/// refresh (a loaded machine, a slow Redis) before the head looks gone.
pub const MIN_LEASE_INTERVALS: f64 = 2.5;

/// Checks `--lease-ttl` against `--heartbeat-interval`; see
/// [`MIN_LEASE_INTERVALS`].
pub fn check_lease_ttl(lease_ttl: Duration, interval: Duration) -> Result<(), ConfigError> {
    let least = interval.mul_f64(MIN_LEASE_INTERVALS);
    if lease_ttl < least {
        return Err(ConfigError::LeaseTtl {
            lease_ttl,
            interval,
            least,
        });
    }
    Ok(())
}

/// Checks one `--heads` entry: `host:port`, a DNS name or an IP address
/// (IPv6 in brackets) and a port from 1 to 65535, without a scheme.
pub fn parse_head_addr(text: &str) -> Result<String, ConfigError> {
    let bad = || ConfigError::HeadAddr(text.to_owned());
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if port_ok && host_ok {
        Ok(text.to_owned())
    } else {
        Err(bad())
    }
}

/// A default id for a process that was not given one: host name and pid,
/// unique on a machine and readable in logs.
pub fn default_id(prefix: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{prefix}-{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses_take_the_advertised_host_for_a_wildcard() {
        let wildcard: std::net::SocketAddr = "0.0.0.0:9090".parse().unwrap();
        let concrete: std::net::SocketAddr = "10.0.0.5:9090".parse().unwrap();
        assert_eq!(
            metrics_advertise_addr("head-1.tether:7070", wildcard),
            "head-1.tether:9090"
        );
        assert_eq!(
            metrics_advertise_addr("[fd00::1]:7070", wildcard),
            "[fd00::1]:9090"
        );
        assert_eq!(
            metrics_advertise_addr("head-1:7070", concrete),
            "10.0.0.5:9090"
        );
    }

    #[test]
    fn head_addresses_must_be_host_port() {
        for good in [
            "h:7070",
            "10.0.0.5:1",
            "[::1]:7070",
            "head-1.tether.svc:7070",
        ] {
            assert_eq!(parse_head_addr(good).as_deref(), Ok(good));
        }
        for bad in [
            "h",
            "h:",
            ":7070",
            "h:0",
            "h:70000",
            "http://h:7070",
            "h:x",
            "[::1:7070",
            "a b:1",
        ] {
            assert!(parse_head_addr(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(
            parse_idle_connection_timeout("60s").unwrap(),
            Duration::from_secs(60)
        );
        assert!(parse_idle_connection_timeout("500ms").is_err());
        assert!(parse_idle_connection_timeout("0s").is_err());
        assert!(parse_duration("3")
            .unwrap_err()
            .to_string()
            .contains("no unit"));
        assert_eq!(
            parse_duration("3x").unwrap_err().to_string(),
            "'3x' has unknown unit 'x'; use ms, s, m or h"
        );
        assert!(matches!(
            parse_duration("3 s"),
            Err(ConfigError::DurationWithSpaces(_))
        ));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1e400s").is_err());
        assert!(parse_duration("3 s").is_err());
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("worker_id", "w-1").is_ok());
        assert_eq!(
            validate_id("worker_id", "").unwrap_err().to_string(),
            "worker_id is empty"
        );
        assert_eq!(
            validate_id("worker_id", &"x".repeat(129))
                .unwrap_err()
                .to_string(),
            "worker_id is 129 bytes long; the limit is 128"
        );
        assert_eq!(
            validate_id("worker_id", "a\u{7}b").unwrap_err().to_string(),
            "worker_id holds a non-printable character ('\\u{7}')"
        );
        assert_eq!(
            parse_namespace("a{b").unwrap_err().to_string(),
            "namespace must not contain '{' or '}'"
        );
        assert!(validate_id("worker_id", "a b").is_err());
    }

    #[test]
    fn redis_urls_are_checked_without_echoing_them() {
        assert!(parse_redis_url("redis://127.0.0.1:6379").is_ok());
        let err = parse_redis_url("http://user:secret@host")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn lease_must_outlive_two_and_a_half_intervals() {
        let s = Duration::from_secs;
        assert!(check_lease_ttl(s(3), s(1)).is_ok());
        assert!(check_lease_ttl(Duration::from_millis(2500), s(1)).is_ok());
        assert!(check_lease_ttl(Duration::from_millis(1), Duration::ZERO).is_ok());
        let err = check_lease_ttl(s(2), s(1)).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "--lease-ttl (2s) must be at least 2.5 x --heartbeat-interval (1s) = 2.5s"
            ),
            "{err}"
        );
    }

    #[test]
    fn timeout_must_exceed_interval() {
        let t = Timing {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(1),
        };
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "--heartbeat-timeout (1s) must be larger than --heartbeat-interval (1s)"
        );
    }
}

/// Where the registry is. Shared by every binary, tetherctl included.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Redis holding the registry. A password may be given in the URL;
    /// it is never logged. `rediss://` for TLS.
    ///
    /// Redis Cluster: a comma-separated list of node URLs. Sentinel:
    /// `redis+sentinel://host:port[,host:port...]/MASTER`.
    //
    // Checked in `validate`, not by a clap value parser: clap's error
    // would repeat the value, password included.
    #[arg(
        long,
        env = "TETHER_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// Namespace of the registry keys (`{NAMESPACE}:...`), so several
    /// clusters can share one Redis.
    #[arg(long, env = "TETHER_NAMESPACE", default_value = "tether", value_parser = parse_namespace)]
    pub namespace: String,
}

impl RegistryArgs {
    /// Checks the URL; the error never repeats it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_redis_url(&self.redis_url).map(|_| ())
    }
}

/// Parses a binary's flags. `--help` and `--version` print and exit 0;
/// any other problem prints one line, `NAME: what is wrong`, and exits 2
/// before anything starts.
pub fn parse_args<T: clap::Parser>(name: &str) -> T {
    parse_args_and_matches(name).0
}

/// [`parse_args`], also returning clap's matches, to tell a flag given on
/// the command line or in the environment from its default.
pub fn parse_args_and_matches<T: clap::Parser>(name: &str) -> (T, clap::ArgMatches) {
    let parsed = T::command()
        .try_get_matches()
        .and_then(|m| T::from_arg_matches(&m).map(|args| (args, m)));
    match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            // clap's message on one line, with what it names on the next
            // lines (a missing `<HEAD_ID>`, `[possible values: ...]`), but
            // not its usage.
            let text = e.render().to_string();
            let said: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let said = said.join(" ");
            let said = said.strip_prefix("error: ").unwrap_or(&said);
            let said = if said.is_empty() {
                "invalid arguments"
            } else {
                said
            };
            eprintln!("{name}: {said} (see --help)");
            std::process::exit(2);
        }
    }
}

/// Flags that heads and workers share. Parsed by the binaries (the library
/// itself never reads flags or the environment).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    #[command(flatten)]
    // A doc comment here would become clap's help text for the group.
    #[allow(missing_docs)]
    pub registry: RegistryArgs,

    /// Log format: human-readable `text` or one JSON object per line.
    /// The level comes from RUST_LOG (default info).
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,

    /// Serve Prometheus metrics over HTTP at `GET /metrics` on this
    /// address (e.g. 0.0.0.0:9090); a head also serves its dashboard at
    /// `/`. Off when not set.
    #[arg(long, env = "TETHER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Most gRPC connections served at once; more are closed on arrival.
    /// A worker uses one. [default: the open-file limit minus 64]
    #[arg(long, env = "TETHER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Close a gRPC connection that has had no open RPC for this long, so
    /// that idle clients cannot hold the connection bound. Heartbeat and
    /// WatchEvents streams are open RPCs: their connections stay.
    /// At least 1s.
    #[arg(
        long,
        env = "TETHER_IDLE_CONNECTION_TIMEOUT",
        default_value = "60s",
        value_parser = parse_idle_connection_timeout
    )]
    pub idle_connection_timeout: Duration,

    #[command(flatten)]
    // A doc comment here would become clap's help text for the group.
    #[allow(missing_docs)]
    pub security: crate::security::SecurityArgs,
}

impl CommonArgs {
    /// `--max-connections`, or its default from the open-file limit.
    pub fn connection_bound(&self) -> usize {
        self.max_connections
            .unwrap_or_else(crate::server::default_max_connections)
    }
}

/// `--idle-connection-timeout`: a duration of at least a second (shorter
/// would close connections between the calls of a busy client).
pub fn parse_idle_connection_timeout(text: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(text)?;
    if d < Duration::from_secs(1) {
        return Err(ConfigError::DurationUnderASecond(text.to_owned()));
    }
    Ok(d)
}

/// A namespace is an id that must not hold braces, which would break the
/// hash tag.
pub fn parse_namespace(text: &str) -> Result<String, ConfigError> {
    validate_id("namespace", text)?;
    if text.contains(['{', '}']) {
        return Err(ConfigError::NamespaceBrace);
    }
    Ok(text.to_owned())
}

/// Parses an id given on the command line.
pub fn parse_id(text: &str) -> Result<String, ConfigError> {
    validate_id("id", text).map(|_| text.to_owned())
}

/// The metrics address a head writes into its lease, for the dashboard's
/// list of heads: the bound address, or, for a wildcard bind, the host of
/// `advertise` (the gRPC address others dial) with the bound port.
pub fn metrics_advertise_addr(advertise: &str, bound: std::net::SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    // A wildcard: the host others reach the head's gRPC port at reaches
    // its metrics port too.
    let host = advertise
        .rsplit_once(':')
        .map(|(host, _)| host)
        .unwrap_or(advertise);
    format!("{host}:{}", bound.port())
}

/// Resolves the address to advertise: the given one, or the bound address
/// when it is a concrete IP. A wildcard bind (`0.0.0.0`) without
/// `--advertise` falls back to loopback, which only works on one machine.
pub fn advertise_addr(given: Option<&str>, bound: std::net::SocketAddr) -> (String, bool) {
    match given {
        Some(a) => (a.to_owned(), false),
        None if bound.ip().is_unspecified() => (format!("127.0.0.1:{}", bound.port()), true),
        None => (bound.to_string(), false),
    }
}
