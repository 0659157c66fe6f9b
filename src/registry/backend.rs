//! The three Redis topologies the registry runs on, behind one connection
//! type: a single server (`redis://` or `rediss://`), Redis Cluster (a
//! comma-separated list of node URLs) and Sentinel
//! (`redis+sentinel://host:port[,host:port...]/MASTER`).
//!
//! Every key shares one hash tag, so on Redis Cluster each script runs on
//! the one node that owns the namespace's slot.

use deadpool_redis::redis::{self, aio::ConnectionLike, Cmd, Pipeline, RedisFuture, Value};
use deadpool_redis::{PoolConfig, Runtime};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::warn;

/// A parsed `--redis-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server.
    Single(String),
    /// Redis Cluster, by some of its nodes.
    Cluster(Vec<String>),
    /// A master found through Sentinel.
    Sentinel {
        /// `redis://host:port` of each sentinel.
        sentinels: Vec<String>,
        /// The monitored master's name.
        master: String,
    },
}

impl Topology {
    /// Parses the URL forms above. Errors never repeat the URL (it may
    /// hold a password).
    pub fn parse(url: &str) -> Result<Self, String> {
        use redis::IntoConnectionInfo;
        let bad = || {
            "invalid Redis URL: expected redis://[user:password@]host[:port][/db], rediss://..., a comma-separated list of node URLs (Redis Cluster), or redis+sentinel://host:port[,host:port]/MASTER".to_owned()
        };
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (hosts, master) = rest.split_once('/').ok_or_else(bad)?;
            if master.is_empty() || hosts.is_empty() {
                return Err(bad());
            }
            let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
            for s in &sentinels {
                s.as_str().into_connection_info().map_err(|_| bad())?;
            }
            return Ok(Self::Sentinel {
                sentinels,
                master: master.to_owned(),
            });
        }
        let urls: Vec<String> = url.split(',').map(|u| u.trim().to_owned()).collect();
        for u in &urls {
            u.as_str().into_connection_info().map_err(|_| bad())?;
        }
        Ok(if urls.len() == 1 {
            Self::Single(urls.into_iter().next().unwrap_or_default())
        } else {
            Self::Cluster(urls)
        })
    }
}

impl Topology {
    /// Where this topology connects, as logs and errors may show it: hosts,
    /// ports, database and user, never a password ("(password hidden)"
    /// says one was given). Operators reading "redis unavailable" need to
    /// see which Redis was tried.
    pub fn describe(&self) -> String {
        let list = |urls: &[String]| {
            urls.iter()
                .map(|u| redacted(u))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Self::Single(url) => redacted(url),
            Self::Cluster(urls) => format!("Redis Cluster nodes {}", list(urls)),
            Self::Sentinel { sentinels, master } => {
                format!("master {master:?} through sentinels {}", list(sentinels))
            }
        }
    }
}

/// One Redis URL without its password. Built from the parsed connection
/// info (the `redis` crate's parser), so what is shown is what is used.
fn redacted(url: &str) -> String {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let Ok(info) = url.into_connection_info() else {
        return "an unparsable Redis URL".to_owned();
    };
    let settings = info.redis_settings();
    let user = settings
        .username()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let mut out = match info.addr() {
        ConnectionAddr::Tcp(..) => format!("redis://{user}{}", info.addr()),
        ConnectionAddr::TcpTls { .. } => format!("rediss://{user}{}", info.addr()),
        ConnectionAddr::Unix(path) => format!("unix://{user}{}", path.display()),
        // A kind of address added by a later `redis` release.
        other => format!("{user}{other}"),
    };
    if settings.db() != 0 {
        out.push_str(&format!("/{}", settings.db()));
    }
    if settings.password().is_some() {
        out.push_str(" (password hidden)");
    }
    out
}

/// A pool for one of the topologies.
#[derive(Clone)]
pub enum Pools {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
}

/// A multiplexed connection of any topology. Cheap to clone: clones share
/// one socket and pipeline their commands on it.
#[derive(Clone)]
pub enum AnyConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(deadpool_redis::cluster::ClusterConnection),
    Sentinel(redis::aio::MultiplexedConnection),
}

impl Pools {
    /// Pools for `topology` with `pool` settings.
    pub fn new(topology: &Topology, pool: PoolConfig) -> Result<Self, String> {
        let err = |e: &dyn std::fmt::Display| format!("cannot set up the Redis pool: {e}");
        Ok(match topology {
            Topology::Single(url) => {
                let mut cfg = deadpool_redis::Config::from_url(url.clone());
                cfg.pool = Some(pool);
                Self::Single(
                    cfg.create_pool(Some(Runtime::Tokio1))
                        .map_err(|e| err(&e))?,
                )
            }
            Topology::Cluster(urls) => {
                let mut cfg = deadpool_redis::cluster::Config::from_urls(urls.clone());
                cfg.pool = Some(pool);
                Self::Cluster(
                    cfg.create_pool(Some(Runtime::Tokio1))
                        .map_err(|e| err(&e))?,
                )
            }
            Topology::Sentinel { sentinels, master } => {
                let mut cfg = deadpool_redis::sentinel::Config::from_urls(
                    sentinels.clone(),
                    master.clone(),
                    deadpool_redis::sentinel::SentinelServerType::Master,
                );
                cfg.pool = Some(pool);
                Self::Sentinel(
                    cfg.create_pool(Some(Runtime::Tokio1))
                        .map_err(|e| err(&e))?,
                )
            }
        })
    }

    /// A new connection, checked by the pool, and taken out of it.
    pub async fn connect(&self) -> Result<AnyConn, String> {
        match self {
            Self::Single(p) => p
                .get()
                .await
                .map(|c| AnyConn::Single(deadpool_redis::Connection::take(c)))
                .map_err(pool_error),
            Self::Cluster(p) => p
                .get()
                .await
                .map(|c| AnyConn::Cluster(deadpool_redis::cluster::Connection::take(c)))
                .map_err(pool_error),
            Self::Sentinel(p) => p
                .get()
                .await
                .map(|c| AnyConn::Sentinel(deadpool_redis::sentinel::Connection::take(c)))
                .map_err(pool_error),
        }
    }
}

/// The cause of a failed connect, in Redis's words rather than the
/// pool's ("Error occurred while creating a new object: ...").
fn pool_error(e: deadpool_redis::PoolError) -> String {
    use deadpool_redis::PoolError;
    match e {
        PoolError::Backend(e) => e.to_string(),
        PoolError::Timeout(_) => "no connection within the pool's timeout".to_owned(),
        e => e.to_string(),
    }
}

impl ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Self::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Sentinel(c) => c.get_db(),
        }
    }
}

/// A topology's pools plus what it takes to follow it.
///
/// Operations share one multiplexed connection, which pipelines concurrent
/// commands on one socket, so a pool of them would buy little. Checking a connection out of a deadpool-redis pool per call
/// costs a PING round trip (its recycle check runs at every checkout):
/// that doubled the round trips of every registry call and made up a
/// quarter of a head's Redis commands. So the pool holds one connection at
/// most and serves only to make it (with its create timeout, and for
/// Cluster and Sentinel its topology handling); the connection is taken
/// out of it and shared. A connection that fails is dropped
/// ([`Backend::invalidate`]) and the next call makes a new one, one at a
/// time (`connecting`).
///
/// Under Sentinel, the current master is checked at most every 250 ms, on
/// one long-lived connection to a sentinel (a new one only when it fails),
/// the connection goes to the address that check found, and a change
/// replaces the pool at once. (A demoted master keeps accepting writes for
/// seconds after a planned failover; pooled connections alone would keep
/// writing to it.)
pub struct Backend {
    topology: Topology,
    pool_config: PoolConfig,
    pools: RwLock<Pools>,
    /// The connection every operation shares, once made, with the
    /// [`Backend::generation`] it was made in.
    shared: Mutex<Option<(u64, AnyConn)>>,
    /// Held while the shared connection is being made, so that concurrent
    /// calls after a failure wait for one new connection instead of each
    /// making their own.
    connecting: tokio::sync::Mutex<()>,
    /// The connection to the sentinel that answered last: asking where the
    /// master is four times a second must not open a TCP connection each
    /// time. Dropped when it fails; the next check tries every sentinel.
    sentinel: Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// The master address last seen, and when it was checked.
    master: Mutex<(Option<String>, Option<Instant>)>,
    /// Bumped when the master changes, so subscribers reconnect.
    generation: watch::Sender<u64>,
    /// Which node the next Cluster subscription starts with.
    next_node: AtomicUsize,
}

/// Connections made in a row while the master keeps moving, before a call
/// gives up (and the next call tries again).
const MAX_CONNECT_ATTEMPTS: u32 = 3;

/// How often, at most, the registry asks Sentinel where the master is:
/// well under any sensible lease TTL, so leases survive a failover.
const MASTER_CHECK_EVERY: Duration = Duration::from_millis(250);

impl Backend {
    /// Pools for `topology`.
    pub fn new(topology: Topology, mut pool_config: PoolConfig) -> Result<Self, String> {
        // The one shared connection (see above).
        pool_config.max_size = 1;
        let pools = Pools::new(&topology, pool_config)?;
        Ok(Self {
            topology,
            pool_config,
            pools: RwLock::new(pools),
            shared: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            sentinel: Mutex::new(None),
            master: Mutex::new((None, None)),
            generation: watch::Sender::new(0),
            next_node: AtomicUsize::new(0),
        })
    }

    /// The shared connection (to the current master, under Sentinel),
    /// made first if there is none.
    pub async fn get(&self) -> Result<AnyConn, String> {
        if matches!(self.topology, Topology::Sentinel { .. }) {
            self.follow_master().await;
        }
        // Only a connection made since the master last moved.
        let shared = || {
            let generation = *self.generation.borrow();
            match &*self.shared.lock().unwrap_or_else(|e| e.into_inner()) {
                Some((made_in, c)) if *made_in == generation => Some(c.clone()),
                _ => None,
            }
        };
        if let Some(c) = shared() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        // Made by the call this one waited for.
        if let Some(c) = shared() {
            return Ok(c);
        }
        let mut attempts = 0;
        loop {
            // The generation before the pools: `follow_master` replaces
            // the pools before it bumps the generation, so a connection
            // made from the pools of a master that has since moved is
            // seen below and not kept.
            let generation = *self.generation.borrow();
            let pools = self.pools.read().unwrap_or_else(|e| e.into_inner()).clone();
            let conn = pools.connect().await?;
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            attempts += 1;
            if *self.generation.borrow() == generation {
                *shared = Some((generation, conn.clone()));
                return Ok(conn);
            }
            // The master moved while this connected: the connection may
            // be to the demoted master, which keeps accepting writes for
            // seconds; kept, it would hold the heads there until it fails.
            if attempts == MAX_CONNECT_ATTEMPTS {
                return Err(format!(
                    "the Redis master moved during each of {attempts} attempts to connect to it"
                ));
            }
        }
    }

    /// Drops the shared connection after a failure on it: the next call
    /// connects afresh.
    pub fn invalidate(&self) {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Changes whenever the master moved: holders of long-lived
    /// connections (the event subscription) reconnect.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    async fn follow_master(&self) {
        let known = {
            let mut m = self.master.lock().unwrap_or_else(|e| e.into_inner());
            if m.1.is_some_and(|t| t.elapsed() < MASTER_CHECK_EVERY) {
                return;
            }
            // Claim this check before awaiting, so concurrent calls skip.
            m.1 = Some(Instant::now());
            m.0.clone()
        };
        let addr = match tokio::time::timeout(Duration::from_millis(500), self.ask_master()).await {
            Ok(Ok(addr)) => addr,
            Ok(Err(_)) => return,
            Err(_) => {
                // A sentinel that hangs: try them all next time.
                self.sentinel
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                return;
            }
        };
        if known.as_deref() == Some(addr.as_str()) {
            return;
        }
        // From now on connect to the address this answer gave, as the event
        // subscription does (`pubsub_client`), not through the Sentinel
        // pool, whose own query (`SENTINEL MASTERS`) names the old master
        // until the failover ends: while the sentinel reconfigures the
        // replicas it already answers this question with the promoted one,
        // and the old master, still writable, passes the pool's role check.
        // A connection made there in that window was kept until it failed
        // (CI saw a head still writing to the demoted master 5 s after the
        // promotion, with the generation check of `get` in place).
        match Pools::new(
            &Topology::Single(format!("redis://{addr}")),
            self.pool_config,
        ) {
            Ok(p) if known.is_some() => {
                warn!(master = %addr, "the Redis master moved; reconnecting the registry to it");
                self.retarget(p);
            }
            // The first answer: `get` asks before it connects, so nothing
            // was connected elsewhere to retire or resubscribe.
            Ok(p) => *self.pools.write().unwrap_or_else(|e| e.into_inner()) = p,
            Err(e) => {
                warn!(error = %e, "cannot set up a Redis pool for the master");
                return;
            }
        }
        self.master.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(addr);
    }

    /// Moves the registry to `pools` (a new master): the pools first, then
    /// the generation, which retires the shared connection and any being
    /// made from the old pools (see `get`), and tells the subscribers.
    fn retarget(&self, pools: Pools) {
        *self.pools.write().unwrap_or_else(|e| e.into_inner()) = pools;
        self.generation.send_modify(|g| *g += 1);
        self.invalidate();
    }

    /// `host:port` of the master: from the sentinel that answered last,
    /// on its open connection, or else from the first sentinel that
    /// answers.
    async fn ask_master(&self) -> redis::RedisResult<String> {
        let Topology::Sentinel { sentinels, master } = &self.topology else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "not under Sentinel",
            )));
        };
        let ask = |mut conn: redis::aio::MultiplexedConnection| async move {
            let (host, port): (String, u16) = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(master)
                .query_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(format!("{host}:{port}"))
        };
        let open = self
            .sentinel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(conn) = open {
            match ask(conn).await {
                Ok(a) => return Ok(a),
                Err(_) => {
                    self.sentinel
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                }
            }
        }
        let mut last = None;
        for s in sentinels {
            let attempt = async {
                let client = redis::Client::open(s.as_str())?;
                let conn = client.get_multiplexed_async_connection().await?;
                let addr = ask(conn.clone()).await?;
                Ok::<_, redis::RedisError>((addr, conn))
            };
            match attempt.await {
                Ok((a, conn)) => {
                    *self.sentinel.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
                    return Ok(a);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Client, "no sentinel given"))
        }))
    }

    /// The server to hold the pub/sub connection on: pooled connections
    /// cannot subscribe. On Cluster any node hears every PUBLISH, so each
    /// subscription tries the nodes in turn, starting one further each
    /// time; under Sentinel it is the current master.
    pub async fn pubsub_client(&self) -> redis::RedisResult<redis::Client> {
        match &self.topology {
            Topology::Single(url) => redis::Client::open(url.as_str()),
            Topology::Cluster(urls) => {
                let start = self.next_node.fetch_add(1, Ordering::Relaxed);
                let mut last = None;
                for i in 0..urls.len() {
                    let url = &urls[(start + i) % urls.len()];
                    let attempt = async {
                        let client = redis::Client::open(url.as_str())?;
                        // Probe it: a dead node must not end the search.
                        let mut conn = client.get_multiplexed_async_connection().await?;
                        redis::cmd("PING").query_async::<String>(&mut conn).await?;
                        Ok::<_, redis::RedisError>(client)
                    };
                    match tokio::time::timeout(Duration::from_millis(500), attempt).await {
                        Ok(Ok(c)) => return Ok(c),
                        Ok(Err(e)) => last = Some(e),
                        Err(_) => {
                            last =
                                Some(redis::RedisError::from((redis::ErrorKind::Io, "timed out")))
                        }
                    }
                }
                Err(last.unwrap_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "no node given"))
                }))
            }
            Topology::Sentinel { .. } => {
                let addr = self.ask_master().await?;
                redis::Client::open(format!("redis://{addr}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that was being made when the master moved is not
    /// kept: one way a head could stay on a demoted master (which keeps
    /// accepting writes for seconds) after a Sentinel failover is a
    /// connect begun on the old master's pools that finishes after the
    /// move and becomes the shared connection. Here the connect to the
    /// "old master" is held open (a proxy that accepts and waits) while
    /// the registry moves to the "new" one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_made_while_the_master_moved_is_not_kept() {
        use std::sync::Arc;
        use tether_testkit::localcluster::RedisServer;
        let old = RedisServer::start().expect("redis-server");
        let new = RedisServer::start().expect("redis-server");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let accepted = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let old_port = old.port();
        let forwarding = tokio::spawn({
            let (accepted, release) = (accepted.clone(), release.clone());
            async move {
                loop {
                    let (mut client, _) = listener.accept().await.unwrap();
                    accepted.notify_one();
                    release.notified().await;
                    let mut server = tokio::net::TcpStream::connect(("127.0.0.1", old_port))
                        .await
                        .unwrap();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                }
            }
        });
        let topology = Topology::parse(&format!("redis://{proxy}")).unwrap();
        let backend = Arc::new(Backend::new(topology, PoolConfig::default()).unwrap());
        let getting = tokio::spawn({
            let backend = backend.clone();
            async move { backend.get().await }
        });
        accepted.notified().await;
        let moved_to = Topology::parse(&new.url()).unwrap();
        backend.retarget(Pools::new(&moved_to, backend.pool_config).unwrap());
        release.notify_one();
        let mut conn = tokio::time::timeout(Duration::from_secs(10), getting)
            .await
            .expect("a connection within 10 s")
            .unwrap()
            .expect("a connection");
        // The port of the server a connection reaches.
        async fn port_of(conn: &mut AnyConn) -> String {
            let reply: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("port")
                .query_async(conn)
                .await
                .unwrap();
            reply[1].clone()
        }
        assert_eq!(
            port_of(&mut conn).await,
            new.port().to_string(),
            "the shared connection is to the old master (port {old_port}), not the new one"
        );
        // And the next call gets the same, current, connection.
        let mut again = backend.get().await.unwrap();
        assert_eq!(port_of(&mut again).await, new.port().to_string());
        forwarding.abort();
    }

    #[test]
    fn descriptions_name_the_server_and_never_the_password() {
        let t = Topology::parse("redis://app:s3cret@10.0.0.5:6379/2").unwrap();
        assert_eq!(
            t.describe(),
            "redis://app@10.0.0.5:6379/2 (password hidden)"
        );
        let t = Topology::parse("redis://:s3cret@10.0.0.5").unwrap();
        assert_eq!(t.describe(), "redis://10.0.0.5:6379 (password hidden)");
        let t = Topology::parse("rediss://h:6380").unwrap();
        assert_eq!(t.describe(), "rediss://h:6380");
        let t = Topology::parse("redis+sentinel://:pw@s1:26379,s2:26379/mymaster").unwrap_or_else(
            |_| Topology::parse("redis+sentinel://s1:26379,s2:26379/mymaster").unwrap(),
        );
        assert!(
            t.describe()
                .starts_with("master \"mymaster\" through sentinels redis://"),
            "{}",
            t.describe()
        );
        let t = Topology::parse("redis://a:1,redis://b:2").unwrap();
        assert_eq!(t.describe(), "Redis Cluster nodes redis://a:1,redis://b:2");
        for t in [
            "redis://u:hunter2@h",
            "redis://:hunter2@h,redis://:hunter2@g",
        ] {
            assert!(!Topology::parse(t).unwrap().describe().contains("hunter2"));
        }
    }

    #[test]
    fn urls_parse_into_topologies() {
        assert_eq!(
            Topology::parse("redis://h:1").unwrap(),
            Topology::Single("redis://h:1".into())
        );
        assert!(
            matches!(Topology::parse("redis://a:1,redis://b:2").unwrap(), Topology::Cluster(v) if v.len() == 2)
        );
        assert_eq!(
            Topology::parse("redis+sentinel://a:26379,b:26380/mymaster").unwrap(),
            Topology::Sentinel {
                sentinels: vec!["redis://a:26379".into(), "redis://b:26380".into()],
                master: "mymaster".into()
            }
        );
        assert!(Topology::parse("redis+sentinel://a:26379").is_err());
        let err = Topology::parse("http://user:secret@x").unwrap_err();
        assert!(!err.contains("secret"));
    }
}
