//! The asset, user and team reads of the public API (GetAsset, ListAssets, GetUser, GetTeam,
//! ListTeamMembers): scope first, then the request's own checks, then one call through
//! [`UpstreamReads`] (deadline, retries, breaker, tenant check on every answer).
//!
//! Nothing is stored here: the platform's Asset and User/Team services own the data. The
//! checks made before calling them are what devgate can know alone (id shapes, page bounds),
//! so a malformed request never costs an upstream call and never counts against a breaker.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    model::MAX_PROJECT_ID_CHARS,
    upstream::{UpstreamError, UpstreamReads},
};
use crate::{
    auth::{AuthError, Principal},
    identity::{Scope, TenantId},
    pagination,
    proto::upstream::{
        assets::v1::Asset,
        users::v1::{Team, TeamMember, User},
    },
    validation::Violations,
};

/// Longest user id accepted: the longest `sub` a developer-portal token may carry.
pub const MAX_USER_ID_CHARS: usize = 200;
/// Longest page token accepted before decoding (ours wrap the upstream's, which are short).
pub const MAX_PAGE_TOKEN_CHARS: usize = 2048;

/// What can go wrong with a directory read; mapped to a status in `crate::status`.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl From<Violations> for DirectoryError {
    fn from(v: Violations) -> Self {
        DirectoryError::Invalid(v)
    }
}

/// Who a read is made for, as the upstream call's metadata names it.
pub struct Caller<'a> {
    tenant: TenantId,
    actor: String,
    request_id: &'a str,
}

impl<'a> Caller<'a> {
    /// The tenant and actor of `principal` once it holds `scope` (checked before anything
    /// else, so a caller who may not read learns nothing, not even what is malformed).
    pub fn new(
        principal: &Principal,
        scope: Scope,
        request_id: &'a str,
    ) -> Result<Self, DirectoryError> {
        Ok(Self {
            tenant: principal.tenant_with(scope)?,
            actor: principal.actor(),
            request_id,
        })
    }
}

/// One page of items and the token of the next one (empty on the last page).
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: String,
}

/// A ListAssets page token: the upstream's own token, bound to the filter it was issued
/// for, so a changed filter is a clear 400 rather than a silently wrong page.
#[derive(Serialize, Deserialize)]
struct AssetsCursor {
    project_id: String,
    upstream: String,
}

/// A ListTeamMembers page token, bound to its team.
#[derive(Serialize, Deserialize)]
struct MembersCursor {
    team_id: Uuid,
    upstream: String,
}

pub struct Directory {
    reads: UpstreamReads,
}

impl Directory {
    pub fn new(reads: UpstreamReads) -> Self {
        Self { reads }
    }

    pub async fn get_asset(&self, caller: &Caller<'_>, id: &str) -> Result<Asset, DirectoryError> {
        let id = uuid_id(id, "id", "an asset id is a UUID")?;
        Ok(self
            .reads
            .get_asset(caller.tenant, &caller.actor, caller.request_id, &id)
            .await?)
    }

    /// The tenant's assets, newest first; `project_id` empty: every project's.
    pub async fn list_assets(
        &self,
        caller: &Caller<'_>,
        project_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<Asset>, DirectoryError> {
        let mut v = Violations::new();
        let project_id = project_id.trim();
        v.check(
            project_id.chars().count() <= MAX_PROJECT_ID_CHARS,
            "project_id",
            format!("at most {MAX_PROJECT_ID_CHARS} characters"),
        );
        let size = pagination::page_size(page_size, &mut v);
        let cursor: Option<AssetsCursor> = decode_token(page_token, &mut v);
        if let Some(c) = &cursor {
            v.check(
                c.project_id == project_id,
                "page_token",
                "issued for another project_id: keep the filters of the first page",
            );
        }
        v.into_result(())?;
        let upstream_token = cursor.map(|c| c.upstream).unwrap_or_default();
        let page = self
            .reads
            .list_assets(
                caller.tenant,
                &caller.actor,
                caller.request_id,
                project_id,
                size as i32,
                &upstream_token,
            )
            .await?;
        Ok(Page {
            items: page.assets,
            next_page_token: encode_token(&page.next_page_token, |upstream| AssetsCursor {
                project_id: project_id.to_string(),
                upstream,
            }),
        })
    }

    pub async fn get_user(&self, caller: &Caller<'_>, id: &str) -> Result<User, DirectoryError> {
        let id = user_id(id)?;
        Ok(self
            .reads
            .get_user(caller.tenant, &caller.actor, caller.request_id, id)
            .await?)
    }

    pub async fn get_team(&self, caller: &Caller<'_>, id: &str) -> Result<Team, DirectoryError> {
        let id = uuid_id(id, "id", "a team id is a UUID")?;
        Ok(self
            .reads
            .get_team(caller.tenant, &caller.actor, caller.request_id, &id)
            .await?)
    }

    /// The members of one of the tenant's teams, in joining order.
    pub async fn list_team_members(
        &self,
        caller: &Caller<'_>,
        team_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<TeamMember>, DirectoryError> {
        let mut v = Violations::new();
        let team = match Uuid::parse_str(team_id.trim()) {
            Ok(team) => Some(team),
            Err(_) => {
                v.add("team_id", "a team id is a UUID");
                None
            }
        };
        let size = pagination::page_size(page_size, &mut v);
        let cursor: Option<MembersCursor> = decode_token(page_token, &mut v);
        if let (Some(c), Some(team)) = (&cursor, team) {
            v.check(
                c.team_id == team,
                "page_token",
                "issued for another team: keep the team of the first page",
            );
        }
        let team = v
            .into_result(team)?
            .ok_or_else(|| Violations::one("team_id", "a team id is a UUID"))?;
        let upstream_token = cursor.map(|c| c.upstream).unwrap_or_default();
        let page = self
            .reads
            .list_team_members(
                caller.tenant,
                &caller.actor,
                caller.request_id,
                &team.to_string(),
                size as i32,
                &upstream_token,
            )
            .await?;
        Ok(Page {
            items: page.members,
            next_page_token: encode_token(&page.next_page_token, |upstream| MembersCursor {
                team_id: team,
                upstream,
            }),
        })
    }
}

/// A UUID in its canonical form (what the upstream services store and compare).
fn uuid_id(raw: &str, field: &str, what: &str) -> Result<String, Violations> {
    Uuid::parse_str(raw.trim())
        .map(|id| id.to_string())
        .map_err(|_| Violations::one(field, what))
}

/// User ids are the portal tokens' `sub`: any text of 1 to 200 characters, but nothing that
/// cannot be a single path segment or a log field (control characters, whitespace, `/`).
fn user_id(raw: &str) -> Result<&str, Violations> {
    let id = raw.trim();
    let count = id.chars().count();
    if count == 0 || count > MAX_USER_ID_CHARS {
        return Err(Violations::one(
            "id",
            format!("a user id is 1 to {MAX_USER_ID_CHARS} characters"),
        ));
    }
    if id
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '/')
    {
        return Err(Violations::one(
            "id",
            "a user id has no whitespace, control characters or `/`",
        ));
    }
    Ok(id)
}

fn decode_token<T: serde::de::DeserializeOwned>(token: &str, v: &mut Violations) -> Option<T> {
    if token.chars().count() > MAX_PAGE_TOKEN_CHARS {
        v.add("page_token", "not a page token returned by this method");
        return None;
    }
    pagination::decode_token(token.trim(), v)
}

/// Our token for the upstream's next-page token; empty stays empty (the last page).
fn encode_token<T: Serialize>(upstream: &str, cursor: impl FnOnce(String) -> T) -> String {
    if upstream.is_empty() {
        String::new()
    } else {
        pagination::encode_token(&cursor(upstream.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_before_any_call() {
        let id = "018F3A2B-7C4D-7E5F-8A9B-0C1D2E3F4A5B";
        assert_eq!(
            uuid_id(id, "id", "x").unwrap(),
            "018f3a2b-7c4d-7e5f-8a9b-0c1d2e3f4a5b",
            "canonical form"
        );
        assert!(uuid_id("asset-1", "id", "x").is_err());
        assert_eq!(user_id(" alice ").unwrap(), "alice");
        assert!(user_id("").is_err());
        assert!(user_id("a/b").is_err());
        assert!(user_id("a b").is_err());
        assert!(user_id(&"u".repeat(MAX_USER_ID_CHARS)).is_ok());
        assert!(user_id(&"u".repeat(MAX_USER_ID_CHARS + 1)).is_err());
    }

    #[test]
    fn tokens_wrap_the_upstreams_and_the_last_page_has_none() {
        assert_eq!(encode_token("", |u| u), "");
        let token = encode_token("up-1", |upstream| AssetsCursor {
            project_id: "p".into(),
            upstream,
        });
        let mut v = Violations::new();
        let c: AssetsCursor = decode_token(&token, &mut v).unwrap();
        assert!(v.is_empty());
        assert_eq!((c.project_id.as_str(), c.upstream.as_str()), ("p", "up-1"));
        let _: Option<AssetsCursor> = decode_token("not-a-token", &mut v);
        assert_eq!(v.iter().next().unwrap().field, "page_token");
        let mut v = Violations::new();
        let _: Option<AssetsCursor> = decode_token(&"x".repeat(5000), &mut v);
        assert!(!v.is_empty());
    }
}
