//! Optional transport security for every gRPC port: TLS or mutual TLS, and
//! a shared-secret bearer token checked by a tower layer.
//!
//! Health stays open without a token so that Kubernetes probes (which
//! cannot send one) keep working. The token never appears in a log line,
//! a `Debug` output or `--help`.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::codegen::http;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Security flags shared by every binary. Parsed by the binaries.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// PEM certificate chain to serve TLS with (needs --tls-key). Also
    /// presented as the client certificate when this process dials a head
    /// that requires mutual TLS.
    #[arg(long, env = "TETHER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TETHER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: require clients to present a certificate signed by
    /// it (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "TETHER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// PEM CA bundle to verify heads with when dialing them over TLS.
    /// Setting it makes this process dial heads with TLS.
    #[arg(long, env = "TETHER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// A file holding a shared secret. Every RPC except health must carry
    /// `authorization: Bearer SECRET`; this process also sends it when
    /// dialing heads.
    #[arg(long, env = "TETHER_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
}

/// The security flags of a program that only dials heads (`tetherctl`):
/// the same flags and variables as [`SecurityArgs`] minus the server's,
/// worded for a client, so its `--help` says nothing about serving.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientSecurityArgs {
    /// PEM CA bundle to verify heads with. Setting it makes this program
    /// dial heads with TLS.
    #[arg(long, env = "TETHER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate chain, for heads that require mutual TLS
    /// (needs --tls-key and --tls-ca).
    #[arg(long, env = "TETHER_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TETHER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// A file holding the heads' shared secret, sent with every call as
    /// `authorization: Bearer SECRET`.
    #[arg(long, env = "TETHER_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
}

impl ClientSecurityArgs {
    /// Loads the files named by the flags; errors are one line.
    pub fn load(&self) -> Result<ClientSecurity, String> {
        let all = SecurityArgs {
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: None,
            tls_ca: self.tls_ca.clone(),
            auth_token_file: self.auth_token_file.clone(),
        };
        all.load_client()
    }
}

/// The secret bearer token; its `Debug` never shows it.
#[derive(Clone)]
pub struct Token(Arc<Vec<u8>>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Reads a token file; surrounding whitespace is ignored.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let raw = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --auth-token-file {}: {e}", path.display()))?;
        Self::new(raw.trim())
    }

    /// A token from its text.
    pub fn new(secret: &str) -> Result<Self, String> {
        if secret.len() < 16 {
            return Err("the auth token must be at least 16 characters long".into());
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the auth token must be printable ASCII without spaces".into());
        }
        Ok(Self(Arc::new(secret.as_bytes().to_vec())))
    }

    /// Compares in time independent of where the inputs differ, so the
    /// token cannot be guessed byte by byte from response times.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_slice();
        let mut diff =
            (expected.len() ^ presented.len()) as u8 | u8::from(expected.len() != presented.len());
        for (i, e) in expected.iter().enumerate() {
            diff |= e ^ presented.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }

    /// The `authorization` metadata value a client sends.
    pub fn bearer(&self) -> MetadataValue<Ascii> {
        let text = format!("Bearer {}", String::from_utf8_lossy(&self.0));
        text.parse()
            .expect("checked printable ASCII at construction")
    }
}

/// What a server enforces.
#[derive(Debug, Clone, Default)]
pub struct ServerSecurity {
    /// TLS (and maybe client-certificate) settings.
    pub tls: Option<ServerTlsConfig>,
    /// The token every RPC but health must carry.
    pub token: Option<Token>,
}

/// What a client presents when it dials a head.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// TLS settings; dial `https` when set.
    pub tls: Option<ClientTlsConfig>,
    /// The token to send.
    pub token: Option<Token>,
}

impl ClientSecurity {
    /// An endpoint for `addr` (host:port) with TLS if configured.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("bad address {addr:?}: {e}"))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS settings for {addr}: {e}"))?;
        }
        Ok(endpoint)
    }

    /// Adds the token to a request, if one is configured.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) {
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.bearer());
        }
    }
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
}

impl SecurityArgs {
    /// The client half only: no server certificate check, for programs
    /// that never serve.
    fn load_client(&self) -> Result<ClientSecurity, String> {
        let token = self
            .auth_token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()?;
        let tls = match &self.tls_ca {
            Some(ca) => {
                let mut tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(ca, "--tls-ca")?));
                if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                    tls = tls.identity(Identity::from_pem(
                        read(cert, "--tls-cert")?,
                        read(key, "--tls-key")?,
                    ));
                }
                Some(tls)
            }
            None => None,
        };
        Ok(ClientSecurity { tls, token })
    }

    /// Loads the files named by the flags. Errors are one line, fit for
    /// exiting with status 2 before anything starts.
    pub fn load(&self) -> Result<(ServerSecurity, ClientSecurity), String> {
        let client = self.load_client()?;
        let server_tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let id = Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?);
                let mut tls = ServerTlsConfig::new().identity(id);
                if let Some(ca) = &self.tls_client_ca {
                    tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?));
                }
                Some(tls)
            }
            _ => None,
        };
        if let Some(ca) = &self.tls_client_ca {
            read(ca, "--tls-client-ca")?;
        }
        if let Some(tls) = &server_tls {
            // Surface a bad certificate or key now, as a configuration
            // error, rather than when the server starts.
            tonic::transport::Server::builder()
                .tls_config(tls.clone())
                .map_err(|e| format!("invalid TLS certificate or key: {e}"))?;
        }
        Ok((
            ServerSecurity {
                tls: server_tls,
                token: client.token.clone(),
            },
            client,
        ))
    }
}

/// A tower layer that refuses RPCs without the right bearer token.
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    token: Option<Token>,
}

impl AuthLayer {
    /// Checks `token` when given; passes everything through otherwise.
    pub fn new(token: Option<Token>) -> Self {
        Self { token }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    token: Option<Token>,
}

/// Paths that stay open: probes cannot carry a token.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

/// The boxed future of [`Auth`]: one allocation per RPC (not per beat:
/// a heartbeat stream is one RPC).
type AuthFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = AuthFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let refusal = match &self.token {
            None => None,
            Some(_) if request.uri().path().starts_with(OPEN_PREFIX) => None,
            Some(token) => {
                let presented = request
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
                match presented {
                    Some(p) if token.matches(p) => None,
                    Some(_) => Some(tonic::Status::unauthenticated("the bearer token is wrong")),
                    None => Some(tonic::Status::unauthenticated(
                        "missing `authorization: Bearer TOKEN` metadata; this server requires the shared token",
                    )),
                }
            }
        };
        match refusal {
            None => Box::pin(self.inner.call(request)),
            Some(status) => {
                let response = status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        let t = Token::new("0123456789abcdef").unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeX"));
        assert!(!t.matches(b"0123456789abcde"));
        assert!(!t.matches(b"0123456789abcdef0"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn weak_tokens_are_refused() {
        assert!(Token::new("short").is_err());
        assert!(Token::new("has a space in it!!").is_err());
    }
}
