//! The Asset and User/Team gRPC services over the [`Directory`].
//!
//! Like the contract allows, lookups by id ignore the request's tenant: an id of another
//! tenant's object is answered with that object and its own `tenant_id`. devgate's check of
//! the answer's tenant is then what keeps tenants apart, and tests can see it work.

use std::{sync::Arc, time::Duration};

use devgate::proto::upstream::{
    assets::v1::{
        Asset, GetAssetRequest, ListAssetsRequest, ListAssetsResponse, asset_service_server,
    },
    users::v1::{
        GetTeamRequest, GetUserRequest, ListTeamMembersRequest, ListTeamMembersResponse, Team,
        User, user_team_service_server,
    },
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::directory::Directory;

type RpcResult<T> = Result<Response<T>, Status>;

/// What both services share: the data and an artificial latency (`--rpc-delay`).
#[derive(Clone)]
pub struct Api {
    directory: Arc<Directory>,
    delay: Duration,
}

impl Api {
    pub fn new(directory: Arc<Directory>, delay: Duration) -> Self {
        Self { directory, delay }
    }

    /// Logs the call with the metadata devgate passes, waits `--rpc-delay`, and checks the
    /// request's tenant id.
    async fn begin<T>(&self, req: &Request<T>, rpc: &str, tenant_id: &str) -> Result<(), Status> {
        let meta = |name: &str| {
            req.metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        tracing::debug!(
            rpc,
            tenant_id,
            request_id = %meta("x-request-id"),
            traceparent = %meta("traceparent"),
            "call"
        );
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        required_uuid(tenant_id, "tenant_id")
    }
}

fn required_uuid(value: &str, field: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Uuid::parse_str(value)
        .map(|_| ())
        .map_err(|_| Status::invalid_argument(format!("{field} must be a UUID")))
}

fn required(value: &str, field: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl asset_service_server::AssetService for Api {
    async fn get_asset(&self, req: Request<GetAssetRequest>) -> RpcResult<Asset> {
        let r = req.get_ref();
        self.begin(&req, "GetAsset", &r.tenant_id).await?;
        required(&r.asset_id, "asset_id")?;
        self.directory
            .asset(&r.asset_id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("asset {} not found", r.asset_id)))
    }

    async fn list_assets(&self, req: Request<ListAssetsRequest>) -> RpcResult<ListAssetsResponse> {
        let r = req.get_ref();
        self.begin(&req, "ListAssets", &r.tenant_id).await?;
        let (assets, next_page_token) =
            self.directory
                .list_assets(&r.tenant_id, &r.project_id, r.page_size, &r.page_token)?;
        Ok(Response::new(ListAssetsResponse {
            tenant_id: r.tenant_id.clone(),
            assets,
            next_page_token,
        }))
    }
}

#[tonic::async_trait]
impl user_team_service_server::UserTeamService for Api {
    async fn get_user(&self, req: Request<GetUserRequest>) -> RpcResult<User> {
        let r = req.get_ref();
        self.begin(&req, "GetUser", &r.tenant_id).await?;
        required(&r.user_id, "user_id")?;
        self.directory
            .user(&r.user_id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("user {} not found", r.user_id)))
    }

    async fn get_team(&self, req: Request<GetTeamRequest>) -> RpcResult<Team> {
        let r = req.get_ref();
        self.begin(&req, "GetTeam", &r.tenant_id).await?;
        required(&r.team_id, "team_id")?;
        self.directory
            .team(&r.team_id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("team {} not found", r.team_id)))
    }

    async fn list_team_members(
        &self,
        req: Request<ListTeamMembersRequest>,
    ) -> RpcResult<ListTeamMembersResponse> {
        let r = req.get_ref();
        self.begin(&req, "ListTeamMembers", &r.tenant_id).await?;
        required(&r.team_id, "team_id")?;
        let page = self
            .directory
            .list_members(&r.team_id, r.page_size, &r.page_token)?;
        Ok(Response::new(ListTeamMembersResponse {
            tenant_id: page.team.tenant_id,
            team_id: page.team.id,
            members: page.members,
            next_page_token: page.next_page_token,
        }))
    }
}
