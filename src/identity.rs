//! Who a call acts for and what it may do: the identity types every feature shares
//! (tenant, plan, scopes, and the key id and environment an API key principal names). A leaf: it imports nothing of devgate's, so any module may import
//! it without tying feature folders together. The per-call `Principal` stays in `auth`: it
//! names key ids, environments and limits, which belong to the features that define them.

use std::{collections::BTreeSet, fmt, str::FromStr};

use uuid::Uuid;

/// A tenant's id (a UUID chosen by the platform's auth service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub Uuid);

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TenantId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(TenantId)
    }
}

/// A tenant's commercial plan, stored as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plan {
    Free,
    Standard,
    Professional,
    Business,
    Enterprise,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Standard => "standard",
            Plan::Professional => "professional",
            Plan::Business => "business",
            Plan::Enterprise => "enterprise",
        }
    }
}

/// A plan name devgate does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown plan {0:?}")]
pub struct UnknownPlan(pub String);

impl FromStr for Plan {
    type Err = UnknownPlan;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "free" => Plan::Free,
            "standard" => Plan::Standard,
            "professional" => Plan::Professional,
            "business" => Plan::Business,
            "enterprise" => Plan::Enterprise,
            other => return Err(UnknownPlan(other.to_string())),
        })
    }
}

/// Length of a key id, in base62 characters.
pub const KEY_ID_LEN: usize = 12;

/// Whether `s` is all base62 (ASCII letters and digits).
pub fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The public id of a key: 12 base62 characters, embedded in the token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// For ids the token module generated or already checked.
    pub(crate) fn new_unchecked(id: String) -> Self {
        KeyId(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Any string that is not shaped like a key id can match no key.
#[derive(Debug, thiserror::Error)]
#[error("not a key id: expected {} base62 characters", KEY_ID_LEN)]
pub struct BadKeyId;

impl FromStr for KeyId {
    type Err = BadKeyId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == KEY_ID_LEN && is_base62(s) {
            Ok(KeyId(s.to_string()))
        } else {
            Err(BadKeyId)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Test => "test",
        }
    }

    pub fn from_db(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Environment::Live),
            "test" => Some(Environment::Test),
            _ => None,
        }
    }
}

/// Why a string is not a devgate key token (its format, before any lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a devgate key (expected dg_live_… or dg_test_…)")]
    Prefix,
    #[error("wrong length or characters")]
    Shape,
    #[error("checksum mismatch (a typo or a truncated key)")]
    Checksum,
}

/// One permission. `All` (`*`) grants every scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    All,
    ApiKeysRead,
    ApiKeysWrite,
    UsageRead,
    WebhooksRead,
    WebhooksWrite,
    GenerationsRead,
    GenerationsWrite,
    AssetsRead,
    UsersRead,
    TeamsRead,
}

impl Scope {
    pub const EVERY: [Scope; 11] = [
        Scope::All,
        Scope::ApiKeysRead,
        Scope::ApiKeysWrite,
        Scope::UsageRead,
        Scope::WebhooksRead,
        Scope::WebhooksWrite,
        Scope::GenerationsRead,
        Scope::GenerationsWrite,
        Scope::AssetsRead,
        Scope::UsersRead,
        Scope::TeamsRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::All => "*",
            Scope::ApiKeysRead => "api_keys:read",
            Scope::ApiKeysWrite => "api_keys:write",
            Scope::UsageRead => "usage:read",
            Scope::WebhooksRead => "webhooks:read",
            Scope::WebhooksWrite => "webhooks:write",
            Scope::GenerationsRead => "generations:read",
            Scope::GenerationsWrite => "generations:write",
            Scope::AssetsRead => "assets:read",
            Scope::UsersRead => "users:read",
            Scope::TeamsRead => "teams:read",
        }
    }

    /// Read-only scopes: what a non-admin member of a tenant gets.
    pub fn is_read(self) -> bool {
        self.as_str().ends_with(":read")
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::EVERY
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_string()))
    }
}

/// A set of scopes held by a principal or granted to a key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(BTreeSet<Scope>);

impl Scopes {
    pub fn all() -> Self {
        Self([Scope::All].into())
    }

    /// Whether a call needing `needed` is allowed.
    pub fn grants(&self, needed: Scope) -> bool {
        self.0.contains(&Scope::All) || self.0.contains(&needed)
    }

    /// Whether a holder of `self` may create a key holding `requested`: every requested scope
    /// must be granted, and `*` only by `*`.
    pub fn covers(&self, requested: &Scopes) -> bool {
        requested.0.iter().all(|s| match s {
            Scope::All => self.0.contains(&Scope::All),
            other => self.grants(*other),
        })
    }

    /// The requested scopes `self` does not cover.
    pub fn missing_from(&self, requested: &Scopes) -> Vec<Scope> {
        requested
            .0
            .iter()
            .copied()
            .filter(|s| !self.covers(&Scopes([*s].into())))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Scope> + '_ {
        self.0.iter().copied()
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.as_str().to_string()).collect()
    }

    /// Parses scope names, reporting every unknown one.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Scopes, Vec<UnknownScope>> {
        let (ok, bad): (Vec<_>, Vec<_>) = names
            .iter()
            .map(|n| n.as_ref().parse::<Scope>())
            .partition(Result::is_ok);
        if bad.is_empty() {
            Ok(Scopes(ok.into_iter().map(Result::unwrap).collect()))
        } else {
            Err(bad.into_iter().map(|e| e.unwrap_err()).collect())
        }
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Scopes(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(names: &[&str]) -> Scopes {
        Scopes::parse(names).unwrap()
    }

    #[test]
    fn star_grants_everything() {
        let all = Scopes::all();
        for s in Scope::EVERY {
            assert!(all.grants(s));
        }
        assert!(all.covers(&scopes(&["*", "usage:read"])));
    }

    #[test]
    fn subset_rule() {
        let own = scopes(&["api_keys:write", "usage:read", "generations:write"]);
        assert!(own.covers(&scopes(&["usage:read"])));
        assert!(own.covers(&scopes(&["api_keys:write", "generations:write"])));
        assert!(!own.covers(&scopes(&["webhooks:write"])));
        assert!(!own.covers(&scopes(&["*"])), "* only from *");
        assert_eq!(
            own.missing_from(&scopes(&["usage:read", "teams:read", "*"])),
            vec![Scope::All, Scope::TeamsRead]
        );
        // write does not imply read: scopes are exact.
        assert!(!own.grants(Scope::ApiKeysRead));
    }

    #[test]
    fn unknown_scopes_are_all_reported() {
        let err = Scopes::parse(&["usage:read", "usage:write", "root"]).unwrap_err();
        assert_eq!(
            err,
            vec![
                UnknownScope("usage:write".into()),
                UnknownScope("root".into())
            ]
        );
    }

    #[test]
    fn names_round_trip() {
        for s in Scope::EVERY {
            assert_eq!(s.as_str().parse::<Scope>().unwrap(), s);
        }
    }
}
