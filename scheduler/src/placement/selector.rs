//! Label selectors, the constraints an app puts on the hosts it may run on:
//! `k=v`, `k!=v`, `k in (a,b)`. Owns their parsing and their meaning against
//! a host's labels.
//!
//! It must not: know about capacity, scores or any other placement rule.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// One label selector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    /// `k=v`: the host has label `k` with value `v`.
    Eq(String, String),
    /// `k!=v`: the host has no label `k`, or its value is not `v`
    /// (Kubernetes' meaning).
    Ne(String, String),
    /// `k in (a,b)`: the host has label `k` with one of these values.
    In(String, Vec<String>),
}

/// A selector that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// Neither `=`, `!=` nor ` in (` was found.
    #[error("label selector {0:?} is none of `k=v`, `k!=v`, `k in (a,b)`")]
    Syntax(String),
    /// The key or a value is empty or holds a character that is not a
    /// letter, digit, `-`, `_`, `.` or `/`.
    #[error("label selector {0:?}: keys and values are non-empty and use only letters, digits, '-', '_', '.', '/'")]
    BadToken(String),
}

fn token_ok(t: &str) -> bool {
    !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || SelectorError::BadToken(s.to_string());
        if let Some((k, rest)) = s.split_once(" in ") {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| SelectorError::Syntax(s.to_string()))?;
            let k = k.trim();
            let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
            if !token_ok(k) || values.iter().any(|v| !token_ok(v)) {
                return Err(bad());
            }
            return Ok(Selector::In(k.to_string(), values));
        }
        if let Some((k, v)) = s.split_once("!=") {
            let (k, v) = (k.trim(), v.trim());
            if !token_ok(k) || !token_ok(v) {
                return Err(bad());
            }
            return Ok(Selector::Ne(k.to_string(), v.to_string()));
        }
        if let Some((k, v)) = s.split_once('=') {
            let (k, v) = (k.trim(), v.trim());
            if !token_ok(k) || !token_ok(v) {
                return Err(bad());
            }
            return Ok(Selector::Eq(k.to_string(), v.to_string()));
        }
        Err(SelectorError::Syntax(s.to_string()))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Eq(k, v) => write!(f, "{k}={v}"),
            Selector::Ne(k, v) => write!(f, "{k}!={v}"),
            Selector::In(k, vs) => write!(f, "{k} in ({})", vs.join(",")),
        }
    }
}

impl Selector {
    /// Whether a host with these labels satisfies the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::Eq(k, v) => labels.get(k) == Some(v),
            Selector::Ne(k, v) => labels.get(k) != Some(v),
            Selector::In(k, vs) => labels.get(k).is_some_and(|x| vs.contains(x)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_the_three_forms_and_prints_them_back() {
        for s in ["disk=ssd", "gpu!=none", "zone in (a,b,c)"] {
            let sel: Selector = s.parse().unwrap();
            assert_eq!(sel.to_string(), s);
        }
        assert_eq!(
            " zone in ( a , b ) ".parse::<Selector>().unwrap(),
            Selector::In("zone".into(), vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn rejects_malformed_selectors() {
        assert!(matches!(
            "disk".parse::<Selector>(),
            Err(SelectorError::Syntax(_))
        ));
        assert!(matches!(
            "zone in a,b".parse::<Selector>(),
            Err(SelectorError::Syntax(_))
        ));
        assert!(matches!(
            "=ssd".parse::<Selector>(),
            Err(SelectorError::BadToken(_))
        ));
        assert!(matches!(
            "zone in (a,)".parse::<Selector>(),
            Err(SelectorError::BadToken(_))
        ));
        assert!(matches!(
            "k=v w".parse::<Selector>(),
            Err(SelectorError::BadToken(_))
        ));
    }

    #[test]
    fn meaning_against_labels() {
        let l = labels(&[("disk", "ssd"), ("zone", "a")]);
        assert!(Selector::Eq("disk".into(), "ssd".into()).matches(&l));
        assert!(!Selector::Eq("disk".into(), "hdd".into()).matches(&l));
        assert!(!Selector::Eq("gpu".into(), "x".into()).matches(&l));
        assert!(Selector::Ne("disk".into(), "hdd".into()).matches(&l));
        assert!(Selector::Ne("gpu".into(), "x".into()).matches(&l));
        assert!(!Selector::Ne("disk".into(), "ssd".into()).matches(&l));
        assert!(Selector::In("zone".into(), vec!["b".into(), "a".into()]).matches(&l));
        assert!(!Selector::In("zone".into(), vec!["b".into()]).matches(&l));
        assert!(!Selector::In("rack".into(), vec!["a".into()]).matches(&l));
    }
}
