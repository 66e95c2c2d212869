//! The tonic implementation of `devgate.v1.GenerationProxy`: authorize, validate and
//! convert, call the service (or the directory, for assets, users and teams), convert back.
//! No rules live here; upstream messages never leave this file as they are.

use std::{pin::Pin, sync::Arc};

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    GenerationError,
    directory::{Caller, Directory},
    model::{self, Generation, State},
    service::{Created, Generations},
    store::GenerationFilter,
};
use crate::{
    auth::{Principal, principal},
    idempotency,
    identity::Scope,
    pagination,
    proto::json::{json_to_struct, struct_to_json},
    proto::{
        convert::{opt_timestamp, timestamp},
        upstream::{assets::v1 as assets, users::v1 as users},
        v1::{self, generation_proxy_server::GenerationProxy},
    },
    validation::Violations,
};

/// The RPC an idempotency key of CreateGeneration is bound to.
const CREATE_GENERATION: &str = "devgate.v1.GenerationProxy/CreateGeneration";
const GENERATION_ID: &str = "not a generation id (a UUID)";

pub struct GenerationGrpc {
    generations: Arc<Generations>,
    /// The asset, user and team reads (the platform's services, through devgate's clients).
    directory: Arc<Directory>,
}

impl GenerationGrpc {
    pub fn new(generations: Arc<Generations>, directory: Arc<Directory>) -> Self {
        Self {
            generations,
            directory,
        }
    }
}

type RpcResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl GenerationProxy for GenerationGrpc {
    async fn create_generation(
        &self,
        req: Request<v1::CreateGenerationRequest>,
    ) -> RpcResult<v1::Generation> {
        let principal = principal(&req)?;
        authorize(principal, Scope::GenerationsWrite)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let style = r
            .style
            .as_ref()
            .and_then(|s| struct_to_json(s, "style", &mut v));
        let new = model::validate(
            model::CreateRequest {
                kind: &r.kind,
                prompt: &r.prompt,
                output_format: &r.output_format,
                style,
                count: r.count,
                project_id: &r.project_id,
                metadata: &r.metadata,
            },
            &self.generations.config().kinds,
            &mut v,
        );
        let new = v.into_result(new).map_err(GenerationError::from)?;
        let claim = idempotency::claim(&req, CREATE_GENERATION).map_err(GenerationError::from)?;
        match self
            .generations
            .create(principal, new, claim, to_proto)
            .await?
        {
            Created::New(generation) => Ok(Response::new(to_proto(&generation))),
            Created::Replayed(first) => Ok(idempotency::replayed(first)),
        }
    }

    async fn get_generation(
        &self,
        req: Request<v1::GetGenerationRequest>,
    ) -> RpcResult<v1::Generation> {
        let principal = principal(&req)?;
        authorize(principal, Scope::GenerationsRead)?;
        let id = generation_id(&req.get_ref().id)?;
        let generation = self.generations.get(principal, id).await?;
        Ok(Response::new(to_proto(&generation)))
    }

    async fn list_generations(
        &self,
        req: Request<v1::ListGenerationsRequest>,
    ) -> RpcResult<v1::ListGenerationsResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::GenerationsRead)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let page_size = pagination::page_size(r.page_size, &mut v);
        let before: Option<GenerationCursor> = pagination::decode_token(&r.page_token, &mut v);
        let state = match v1::GenerationState::try_from(r.state) {
            Ok(v1::GenerationState::Unspecified) => None,
            Ok(s) => Some(state_from_proto(s)),
            Err(_) => {
                v.add("state", format!("unknown state {}", r.state));
                None
            }
        };
        let project_id = r.project_id.trim();
        v.check(
            project_id.chars().count() <= model::MAX_PROJECT_ID_CHARS,
            "project_id",
            format!("at most {} characters", model::MAX_PROJECT_ID_CHARS),
        );
        v.into_result(()).map_err(GenerationError::from)?;
        let filter = GenerationFilter {
            state,
            project_id: (!project_id.is_empty()).then(|| project_id.to_string()),
        };
        let page = self
            .generations
            .list(principal, &filter, before.map(|c| c.before), page_size)
            .await?;
        Ok(Response::new(v1::ListGenerationsResponse {
            generations: page.generations.iter().map(to_proto).collect(),
            next_page_token: page
                .next
                .map(|before| pagination::encode_token(&GenerationCursor { before }))
                .unwrap_or_default(),
        }))
    }

    async fn cancel_generation(
        &self,
        req: Request<v1::CancelGenerationRequest>,
    ) -> RpcResult<v1::Generation> {
        let principal = principal(&req)?;
        authorize(principal, Scope::GenerationsWrite)?;
        let id = generation_id(&req.get_ref().id)?;
        let generation = self.generations.cancel(principal, id).await?;
        Ok(Response::new(to_proto(&generation)))
    }

    type WatchGenerationStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::Generation, Status>> + Send>>;

    async fn watch_generation(
        &self,
        req: Request<v1::WatchGenerationRequest>,
    ) -> RpcResult<Self::WatchGenerationStream> {
        let principal = principal(&req)?;
        authorize(principal, Scope::GenerationsRead)?;
        let id = generation_id(&req.get_ref().id)?;
        let changes = self.generations.watch(principal, id).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(changes)
            .map(|change| change.map(|g| to_proto(&g)).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_asset(&self, req: Request<v1::GetAssetRequest>) -> RpcResult<v1::Asset> {
        let caller = caller(&req, Scope::AssetsRead)?;
        let asset = self.directory.get_asset(&caller, &req.get_ref().id).await?;
        Ok(Response::new(asset_to_proto(asset)))
    }

    async fn list_assets(
        &self,
        req: Request<v1::ListAssetsRequest>,
    ) -> RpcResult<v1::ListAssetsResponse> {
        let caller = caller(&req, Scope::AssetsRead)?;
        let r = req.get_ref();
        let page = self
            .directory
            .list_assets(&caller, &r.project_id, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(v1::ListAssetsResponse {
            assets: page.items.into_iter().map(asset_to_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_user(&self, req: Request<v1::GetUserRequest>) -> RpcResult<v1::User> {
        let caller = caller(&req, Scope::UsersRead)?;
        let user = self.directory.get_user(&caller, &req.get_ref().id).await?;
        Ok(Response::new(v1::User {
            id: user.id,
            display_name: user.display_name,
            email: user.email,
            create_time: user.create_time,
        }))
    }

    async fn get_team(&self, req: Request<v1::GetTeamRequest>) -> RpcResult<v1::Team> {
        let caller = caller(&req, Scope::TeamsRead)?;
        let team = self.directory.get_team(&caller, &req.get_ref().id).await?;
        Ok(Response::new(team_to_proto(team)))
    }

    async fn list_team_members(
        &self,
        req: Request<v1::ListTeamMembersRequest>,
    ) -> RpcResult<v1::ListTeamMembersResponse> {
        let caller = caller(&req, Scope::TeamsRead)?;
        let r = req.get_ref();
        let page = self
            .directory
            .list_team_members(&caller, &r.team_id, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(v1::ListTeamMembersResponse {
            members: page
                .items
                .into_iter()
                .map(|m| v1::TeamMember {
                    user_id: m.user_id,
                    role: m.role,
                    join_time: m.join_time,
                })
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

/// The caller of a directory read once it holds `scope`, with the request id the upstream
/// call passes on (set by the request-id layer on every call).
fn caller<T>(req: &Request<T>, scope: Scope) -> Result<Caller<'_>, Status> {
    let principal = principal(req)?;
    let request_id = req
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(Caller::new(principal, scope, request_id)?)
}

/// devgate's Asset: the upstream's without its tenant (always the caller's).
fn asset_to_proto(a: assets::Asset) -> v1::Asset {
    v1::Asset {
        id: a.id,
        project_id: a.project_id,
        kind: a.kind,
        media_type: a.media_type,
        url: a.url,
        size_bytes: i64::try_from(a.size_bytes).unwrap_or(i64::MAX),
        generation_id: a.generation_id,
        created_by: a.created_by,
        create_time: a.create_time,
    }
}

fn team_to_proto(t: users::Team) -> v1::Team {
    v1::Team {
        id: t.id,
        name: t.name,
        member_count: i32::try_from(t.member_count).unwrap_or(i32::MAX),
        create_time: t.create_time,
    }
}

/// The keyset position of a generation listing: ids below this one come next.
#[derive(serde::Serialize, serde::Deserialize)]
struct GenerationCursor {
    before: Uuid,
}

/// The tenant and scope check the service repeats, done before any validation.
fn authorize(principal: &Principal, scope: Scope) -> Result<(), Status> {
    principal
        .tenant_with(scope)
        .map(drop)
        .map_err(|e| GenerationError::from(e).into())
}

/// Generation ids are UUIDs; anything else is a bad request, not a missing generation.
fn generation_id(raw: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(raw.trim())
        .map_err(|_| GenerationError::Invalid(Violations::one("id", GENERATION_ID)).into())
}

fn state_from_proto(s: v1::GenerationState) -> State {
    match s {
        v1::GenerationState::Unspecified | v1::GenerationState::Queued => State::Queued,
        v1::GenerationState::Running => State::Running,
        v1::GenerationState::Succeeded => State::Succeeded,
        v1::GenerationState::Failed => State::Failed,
        v1::GenerationState::Cancelled => State::Cancelled,
    }
}

fn state_to_proto(s: State) -> v1::GenerationState {
    match s {
        State::Queued => v1::GenerationState::Queued,
        State::Running => v1::GenerationState::Running,
        State::Succeeded => v1::GenerationState::Succeeded,
        State::Failed => v1::GenerationState::Failed,
        State::Cancelled => v1::GenerationState::Cancelled,
    }
}

pub fn to_proto(g: &Generation) -> v1::Generation {
    v1::Generation {
        id: g.id.to_string(),
        kind: g.kind.clone(),
        prompt: g.prompt.clone(),
        output_format: g.output_format.clone(),
        style: json_to_struct(&g.style),
        count: g.count,
        project_id: g.project_id.clone(),
        metadata: g
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        state: state_to_proto(g.state) as i32,
        progress: g.progress,
        cost: g.cost,
        refunded: g.refunded,
        asset_ids: g.asset_ids.clone(),
        result_urls: g.result_urls.clone(),
        error: g.error_code.as_ref().map(|code| v1::GenerationError {
            code: code.clone(),
            message: g.error_message.clone().unwrap_or_default(),
        }),
        created_by: g.created_by.clone(),
        create_time: Some(timestamp(g.create_time)),
        start_time: opt_timestamp(g.start_time),
        end_time: opt_timestamp(g.end_time),
        update_time: Some(timestamp(g.update_time)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_uuids() {
        assert!(generation_id("018f3a2b-7c4d-7e5f-8a9b-0c1d2e3f4a5b").is_ok());
        let status = generation_id("gen_1").unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn states_round_trip() {
        for s in [
            State::Queued,
            State::Running,
            State::Succeeded,
            State::Failed,
            State::Cancelled,
        ] {
            assert_eq!(state_from_proto(state_to_proto(s)), s);
        }
    }
}
