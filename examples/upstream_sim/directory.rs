//! The simulator's data: users, teams and assets of the seeded tenants, plus the assets its
//! orchestrator produces, with keyset paging.
//!
//! Seeded ids are derived from the tenant id and a name (SHA-256, shaped as a UUID), so they
//! are the same on every start: the local tenant's can be written into scripts, and a test
//! reads the ids of its tenants from the simulator's ready line ([`Seed`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::RwLock,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeZone, Utc};
use devgate::proto::{
    convert::timestamp,
    upstream::{
        assets::v1::Asset,
        orchestrator::v1::GenerationJob,
        users::v1::{Team, TeamMember, User},
    },
};
use serde::Serialize;
use tonic::Status;
use uuid::Uuid;

/// Page size when a request asks for none, and the most a page holds.
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 100;

/// The ids seeded for one tenant, printed on the ready line.
#[derive(Debug, Clone, Serialize)]
pub struct Seed {
    pub tenant_id: Uuid,
    /// Project name → id.
    pub projects: BTreeMap<&'static str, String>,
    /// User name → id.
    pub users: BTreeMap<&'static str, String>,
    /// Team name → id.
    pub teams: BTreeMap<&'static str, String>,
    /// Every seeded asset id.
    pub assets: Vec<String>,
}

/// One page of a team's members.
pub struct MembersPage {
    pub team: Team,
    pub members: Vec<TeamMember>,
    pub next_page_token: String,
}

struct TeamEntry {
    team: Team,
    members: Vec<TeamMember>,
}

/// Everything the Asset and User/Team services answer from. Users and teams are fixed at
/// start; assets grow as the orchestrator produces them.
pub struct Directory {
    asset_base_url: String,
    users: HashMap<String, User>,
    teams: HashMap<String, TeamEntry>,
    assets: RwLock<HashMap<String, Asset>>,
    seeds: Vec<Seed>,
}

/// A stable id for `name` within `scope` (a tenant or a generation id).
pub fn derived_id(scope: &str, name: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("devgate-upstream-sim\0{scope}\0{name}").as_bytes(),
    );
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    // Version and variant bits set like a random UUID: deterministic, yet a valid UUID.
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

const USERS: &[(&str, &str)] = &[
    ("alice", "Alice Martin"),
    ("bob", "Bob Okafor"),
    ("carol", "Carol Nguyen"),
];

/// Members of a seeded team: user name and role, in joining order.
type Members = &'static [(&'static str, &'static str)];

/// Team name, display name, members.
const TEAMS: &[(&str, &str, Members)] = &[
    ("design", "Design", &[("alice", "owner"), ("bob", "member")]),
    (
        "research",
        "Research",
        &[("carol", "owner"), ("alice", "member"), ("bob", "member")],
    ),
];

const PROJECTS: &[&str] = &["launch", "brand"];

/// Name, project, kind, format, creator: the seeded assets of every tenant.
const ASSETS: &[(&str, &str, &str, &str, &str)] = &[
    ("hero", "launch", "image", "png", "alice"),
    ("banner", "launch", "image", "webp", "bob"),
    ("teaser", "launch", "video", "mp4", "alice"),
    ("logo", "brand", "image", "png", "carol"),
    ("jingle", "brand", "audio", "mp3", "carol"),
];

/// When seeded things were created: fixed, so answers are the same on every start.
fn seed_time(hours: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 9, 0, 0)
        .single()
        .expect("a valid date")
        + chrono::Duration::hours(hours)
}

impl Directory {
    /// The directory with `tenants` seeded; produced assets get URLs under `asset_base_url`.
    pub fn seeded(tenants: &[Uuid], asset_base_url: &str) -> Directory {
        let mut directory = Directory {
            asset_base_url: asset_base_url.trim_end_matches('/').to_string(),
            users: HashMap::new(),
            teams: HashMap::new(),
            assets: RwLock::new(HashMap::new()),
            seeds: Vec::new(),
        };
        for tenant in tenants {
            directory.seed(*tenant);
        }
        directory
    }

    fn seed(&mut self, tenant: Uuid) {
        let t = tenant.to_string();
        let id = |name: &str| derived_id(&t, name);
        let mut seed = Seed {
            tenant_id: tenant,
            projects: PROJECTS
                .iter()
                .map(|p| (*p, id(&format!("project:{p}"))))
                .collect(),
            users: USERS
                .iter()
                .map(|(u, _)| (*u, id(&format!("user:{u}"))))
                .collect(),
            teams: TEAMS
                .iter()
                .map(|(name, _, _)| (*name, id(&format!("team:{name}"))))
                .collect(),
            assets: Vec::new(),
        };
        let email_domain = format!("{}.example", &t[..8]);
        for (i, (name, display_name)) in USERS.iter().enumerate() {
            let user = User {
                id: seed.users[name].clone(),
                tenant_id: t.clone(),
                display_name: display_name.to_string(),
                email: format!("{name}@{email_domain}"),
                create_time: Some(timestamp(seed_time(i as i64))),
            };
            self.users.insert(user.id.clone(), user);
        }
        for (i, (name, display_name, members)) in TEAMS.iter().enumerate() {
            let team = Team {
                id: seed.teams[name].clone(),
                tenant_id: t.clone(),
                name: display_name.to_string(),
                member_count: members.len() as u32,
                create_time: Some(timestamp(seed_time(10 + i as i64))),
            };
            let members = members
                .iter()
                .enumerate()
                .map(|(j, (user, role))| TeamMember {
                    user_id: seed.users[user].clone(),
                    tenant_id: t.clone(),
                    role: role.to_string(),
                    join_time: Some(timestamp(seed_time(20 + j as i64))),
                })
                .collect();
            self.teams
                .insert(team.id.clone(), TeamEntry { team, members });
        }
        let mut assets = self.assets.write().expect("assets lock");
        for (i, (name, project, kind, format, creator)) in ASSETS.iter().enumerate() {
            let asset_id = id(&format!("asset:{name}"));
            let asset = Asset {
                url: self.asset_url(&t, &asset_id, format),
                size_bytes: size_of_asset(&asset_id),
                id: asset_id.clone(),
                tenant_id: t.clone(),
                project_id: seed.projects[project].clone(),
                kind: kind.to_string(),
                media_type: media_type(kind, format).to_string(),
                generation_id: String::new(),
                created_by: format!("user:{}", seed.users[creator]),
                create_time: Some(timestamp(seed_time(30 + i as i64))),
            };
            seed.assets.push(asset_id.clone());
            assets.insert(asset_id, asset);
        }
        drop(assets);
        self.seeds.push(seed);
    }

    pub fn seeds(&self) -> &[Seed] {
        &self.seeds
    }

    fn asset_url(&self, tenant: &str, asset_id: &str, format: &str) -> String {
        format!("{}/{tenant}/{asset_id}.{format}", self.asset_base_url)
    }

    pub fn asset(&self, id: &str) -> Option<Asset> {
        self.assets.read().expect("assets lock").get(id).cloned()
    }

    pub fn user(&self, id: &str) -> Option<User> {
        self.users.get(id).cloned()
    }

    pub fn team(&self, id: &str) -> Option<Team> {
        self.teams.get(id).map(|e| e.team.clone())
    }

    /// A tenant's assets (one project's when `project` is not empty), newest first.
    pub fn list_assets(
        &self,
        tenant: &str,
        project: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Asset>, String), Status> {
        let items = self
            .assets
            .read()
            .expect("assets lock")
            .values()
            .filter(|a| a.tenant_id == tenant && (project.is_empty() || a.project_id == project))
            .map(|a| {
                // Newest first: ascending by the negated time.
                ((-nanos(a.create_time.as_ref()), a.id.clone()), a.clone())
            })
            .collect();
        page(items, page_size, page_token)
    }

    /// A team's members in joining order.
    pub fn list_members(
        &self,
        team_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<MembersPage, Status> {
        let entry = self
            .teams
            .get(team_id)
            .ok_or_else(|| Status::not_found(format!("team {team_id} not found")))?;
        let items = entry
            .members
            .iter()
            .map(|m| ((nanos(m.join_time.as_ref()), m.user_id.clone()), m.clone()))
            .collect();
        let (members, next_page_token) = page(items, page_size, page_token)?;
        Ok(MembersPage {
            team: entry.team.clone(),
            members,
            next_page_token,
        })
    }

    /// Registers the outputs of a succeeded job as assets of its tenant and project. Ids
    /// derive from the generation id, so a job run again produces the same assets.
    pub fn register_outputs(&self, job: &GenerationJob) -> Vec<Asset> {
        let format = if job.output_format.is_empty() {
            default_format(&job.kind)
        } else {
            job.output_format.as_str()
        };
        let kind = asset_kind(&job.kind);
        let now = timestamp(Utc::now());
        let mut assets = self.assets.write().expect("assets lock");
        (0..job.count.max(1))
            .map(|i| {
                let id = derived_id(&job.generation_id, &format!("output:{i}"));
                assets
                    .entry(id.clone())
                    .or_insert_with(|| Asset {
                        url: self.asset_url(&job.tenant_id, &id, format),
                        size_bytes: size_of_asset(&id),
                        id,
                        tenant_id: job.tenant_id.clone(),
                        project_id: job.project_id.clone(),
                        kind: kind.to_string(),
                        media_type: media_type(kind, format).to_string(),
                        generation_id: job.generation_id.clone(),
                        created_by: job.requested_by.clone(),
                        create_time: Some(now),
                    })
                    .clone()
            })
            .collect()
    }
}

fn nanos(t: Option<&prost_types::Timestamp>) -> i128 {
    t.map_or(0, |t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128)
}

/// Sort key of a listed item: a position in time and a tie-breaking id.
type SortKey = (i128, String);

/// One page of `items` (in ascending key order) after the item named by `token`; the next
/// token names the page's last item, so items added meanwhile do not shift pages.
fn page<T>(
    mut items: Vec<(SortKey, T)>,
    page_size: i32,
    token: &str,
) -> Result<(Vec<T>, String), Status> {
    let size = match page_size {
        n if n < 0 => return Err(Status::invalid_argument("page_size must not be negative")),
        0 => DEFAULT_PAGE_SIZE,
        n => (n as usize).min(MAX_PAGE_SIZE),
    };
    let after = decode_token(token)?;
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rest = items
        .into_iter()
        .filter(|(key, _)| after.as_ref().is_none_or(|after| key > after))
        .peekable();
    let mut out = Vec::with_capacity(size);
    let mut last = None;
    while out.len() < size {
        let Some((key, item)) = rest.next() else {
            break;
        };
        out.push(item);
        last = Some(key);
    }
    let next = match (rest.peek(), last) {
        (Some(_), Some(last)) => encode_token(&last),
        _ => String::new(),
    };
    Ok((out, next))
}

fn encode_token(key: &SortKey) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", key.0, key.1))
}

fn decode_token(token: &str) -> Result<Option<SortKey>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || Status::invalid_argument("page_token is not one this service issued");
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let (position, id) = raw.split_once(':').ok_or_else(invalid)?;
    Ok(Some((
        position.parse().map_err(|_| invalid())?,
        id.to_string(),
    )))
}

/// The asset kind of a generation kind (`image_hd` makes images).
fn asset_kind(kind: &str) -> &str {
    match kind {
        k if k.starts_with("image") => "image",
        "video" | "audio" | "text" => kind,
        _ => "other",
    }
}

fn default_format(kind: &str) -> &'static str {
    match asset_kind(kind) {
        "image" => "png",
        "video" => "mp4",
        "audio" => "mp3",
        "text" => "txt",
        _ => "bin",
    }
}

fn media_type(kind: &str, format: &str) -> &'static str {
    match format.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" => "audio/ogg",
        "txt" => "text/plain",
        "md" => "text/markdown",
        "json" => "application/json",
        _ if kind == "text" => "text/plain",
        _ => "application/octet-stream",
    }
}

/// A plausible, stable file size for an asset id.
fn size_of_asset(id: &str) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_ref()[..8]);
    20_000 + u64::from_le_bytes(bytes) % 4_000_000
}
