//! Who is calling. On the Unix socket the caller is the host's admin (the
//! socket's file mode is the access control, as with Docker and Podman);
//! on TCP every request carries `Authorization: Bearer TOKEN`, looked up in
//! the tokens file:
//!
//! ```text
//! # TOKEN  TENANT  [max_instances=N] [max_memory_mib=M]
//! 4f9c...  acme    max_instances=50 max_memory_mib=8192
//! ```
//!
//! The file is read at start and again on SIGHUP ([`Tokens::reload`]); a
//! file that does not parse leaves the old tokens in force.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use host::runtime::{is_tenant_name, Tenant};

use crate::error::ApiError;

/// Which listener a request came in on (set by the daemon per listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The Unix socket: the caller is the host's admin.
    Unix,
    /// TCP: a bearer token names the tenant.
    Tcp,
}

/// A tokens file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// It cannot be read.
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is wrong.
    #[error("tokens file {path}, line {line}: {why}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// Tokens and the tenants they name.
#[derive(Debug, Default)]
pub struct Tokens {
    path: Option<PathBuf>,
    by_token: HashMap<String, Tenant>,
}

/// Shared, reloadable tokens.
pub type SharedTokens = Arc<RwLock<Tokens>>;

impl Tokens {
    /// No tokens: only the Unix socket is usable.
    pub fn none() -> Self {
        Tokens::default()
    }

    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut t = Self::parse(&text).map_err(|(line, why)| TokensError::Line {
            path: path.to_path_buf(),
            line,
            why,
        })?;
        t.path = Some(path.to_path_buf());
        Ok(t)
    }

    /// Parses a tokens file's text; errors name the line.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut by_token = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |why: String| (n + 1, why);
            let mut words = line.split_whitespace();
            let (Some(token), Some(tenant)) = (words.next(), words.next()) else {
                return Err(err(
                    "expected TOKEN TENANT [max_instances=N] [max_memory_mib=M]".into(),
                ));
            };
            if token.len() < 16 {
                return Err(err("a token must be at least 16 characters".into()));
            }
            if !is_tenant_name(tenant) {
                return Err(err(format!(
                    "tenant {tenant:?}: use 1-20 of a-z, 0-9 and '-', or `admin`"
                )));
            }
            // `admin`: the host's (or cluster's) admin, as on the Unix
            // socket: the scheduler, peer daemons, operators. No limits.
            let admin = tenant == "admin";
            let mut t = if admin {
                Tenant::admin()
            } else {
                Tenant {
                    name: tenant.to_string(),
                    admin: false,
                    max_instances: None,
                    max_memory_mib: None,
                }
            };
            if admin && words.clone().next().is_some() {
                return Err(err("the admin token takes no limits".into()));
            }
            for w in words {
                match w.split_once('=') {
                    Some(("max_instances", v)) => {
                        t.max_instances =
                            Some(v.parse().map_err(|_| err(format!("{w}: not a number")))?)
                    }
                    Some(("max_memory_mib", v)) => {
                        t.max_memory_mib =
                            Some(v.parse().map_err(|_| err(format!("{w}: not a number")))?)
                    }
                    _ => return Err(err(format!("unknown setting {w:?}"))),
                }
            }
            if by_token.insert(token.to_string(), t).is_some() {
                return Err(err("the same token appears twice".into()));
            }
        }
        Ok(Tokens {
            path: None,
            by_token,
        })
    }

    /// Reads the file again; on error the current tokens stay.
    pub fn reload(&mut self) -> Result<usize, TokensError> {
        let Some(path) = self.path.clone() else {
            return Ok(0);
        };
        *self = Self::load(&path)?;
        Ok(self.by_token.len())
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }

    /// The tenant of `token`.
    pub fn tenant(&self, token: &str) -> Option<&Tenant> {
        self.by_token.get(token)
    }
}

/// The caller of a request, resolved from its transport and token.
#[derive(Debug, Clone)]
pub struct Caller(pub Tenant);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let transport = parts
            .extensions
            .get::<Transport>()
            .copied()
            .unwrap_or(Transport::Tcp);
        if transport == Transport::Unix {
            return Ok(Caller(Tenant::admin()));
        }
        let tokens = parts
            .extensions
            .get::<SharedTokens>()
            .cloned()
            .ok_or_else(|| ApiError::internal("no tokens configured"))?;
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer TOKEN"))?;
        let token = header.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be 'Bearer TOKEN'")
        })?;
        let tokens = tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens
            .tenant(token.trim())
            .cloned()
            .map(Caller)
            .ok_or_else(|| ApiError::unauthorized("unknown token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_files_parse_with_limits_and_comments() {
        let t = Tokens::parse(
            "# comment\n\n0123456789abcdef acme max_instances=5 max_memory_mib=1024\nfedcba9876543210 beta # trailing\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        let a = t.tenant("0123456789abcdef").unwrap();
        assert_eq!((a.max_instances, a.max_memory_mib), (Some(5), Some(1024)));
        assert_eq!(t.tenant("fedcba9876543210").unwrap().name, "beta");
        assert!(t.tenant("nope").is_none());
        let admin = Tokens::parse("0123456789abcdef admin\n").unwrap();
        assert!(admin.tenant("0123456789abcdef").unwrap().admin);
    }

    #[test]
    fn bad_tokens_files_name_the_line() {
        for (text, line, needle) in [
            ("short acme", 1, "16 characters"),
            ("0123456789abcdef", 1, "expected TOKEN TENANT"),
            ("# x\n0123456789abcdef Acme", 2, "tenant"),
            ("0123456789abcdef admin max_instances=3", 1, "no limits"),
            ("0123456789abcdef a max_instances=x", 1, "not a number"),
            ("0123456789abcdef a colour=red", 1, "unknown setting"),
            ("0123456789abcdef a\n0123456789abcdef b", 2, "twice"),
        ] {
            let (l, why) = Tokens::parse(text).unwrap_err();
            assert_eq!(l, line, "{text}");
            assert!(why.contains(needle), "{text}: {why}");
        }
    }
}
