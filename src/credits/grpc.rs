//! Credits on the wire. `GrantCredits` is an RPC of the internal `UsageService` (one proto
//! service is one tonic trait, implemented in `crate::usage::grpc`, which delegates here), so
//! the credits feature keeps its own validation, authorization and conversion.

use tonic::{Request, Response, Status};

use super::{CreditError, Credits, LedgerEntry, service::MAX_AMOUNT};
use crate::{
    auth::principal,
    identity::TenantId,
    proto::{convert::timestamp, internal::v1 as internal},
    tenants::TenantDirectory,
    validation::Violations,
};

/// The credit RPCs; cheap to clone.
#[derive(Clone)]
pub struct CreditsGrpc {
    credits: Credits,
    tenants: TenantDirectory,
}

impl CreditsGrpc {
    pub fn new(credits: Credits, tenants: TenantDirectory) -> Self {
        Self { credits, tenants }
    }

    /// Internal: adds credits to a tenant (created on first sight), once per idempotency id,
    /// recording the calling service on the entry.
    pub async fn grant_credits(
        &self,
        req: Request<internal::GrantCreditsRequest>,
    ) -> Result<Response<internal::CreditLedgerEntry>, Status> {
        let principal = principal(&req)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let tenant = r.tenant_id.parse::<TenantId>().ok();
        v.check(tenant.is_some(), "tenant_id", "required: the tenant's UUID");
        // The ledger's own bound, checked here too so no work starts on a wild amount.
        v.check(
            (1..=MAX_AMOUNT).contains(&r.amount),
            "amount",
            format!("must be between 1 and {MAX_AMOUNT}"),
        );
        v.into_result(()).map_err(CreditError::from)?;
        principal.require_internal()?;
        let tenant = tenant.expect("validated");
        self.tenants
            .ensure(tenant)
            .await
            .map_err(CreditError::from)?;
        let entry = self
            .credits
            .grant_as(
                &principal.actor(),
                tenant,
                r.amount,
                &r.reason,
                &r.reference,
                &r.idempotency_id,
            )
            .await?;
        Ok(Response::new(entry_to_proto(entry)))
    }
}

pub fn entry_to_proto(entry: LedgerEntry) -> internal::CreditLedgerEntry {
    internal::CreditLedgerEntry {
        id: entry.id,
        tenant_id: entry.tenant_id.to_string(),
        amount: entry.amount,
        reason: entry.reason,
        reference: entry.reference,
        idempotency_id: entry.idempotency_id.unwrap_or_default(),
        balance_after: entry.balance_after,
        create_time: Some(timestamp(entry.create_time)),
        created_by: entry.created_by,
    }
}
