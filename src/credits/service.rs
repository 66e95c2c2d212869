//! Credit operations: validation, idempotent replays, and the store's outcomes as
//! [`CreditError`]s.

use super::{
    CreditError,
    model::LedgerEntry,
    store::{Applied, CreditStore, NewEntry},
};
use crate::{db::PgPool, pagination::MAX_PAGE_SIZE, tenants::TenantId, validation::Violations};

/// Largest amount of one entry: far above any real grant, and far enough below `i64::MAX`
/// that balances cannot overflow in practice.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// Longest reason, reference and idempotency id, in characters (the migration checks the
/// same).
pub const MAX_TEXT_CHARS: usize = 200;

#[derive(Clone)]
pub struct Credits {
    store: CreditStore,
}

impl Credits {
    pub fn new(pool: PgPool) -> Self {
        Self {
            store: CreditStore::new(pool),
        }
    }

    /// Adds `amount` credits. A retry with the same `idempotency_id` returns the original
    /// entry and changes nothing; the same id with another amount or reason is a conflict.
    pub async fn grant(
        &self,
        tenant: TenantId,
        amount: i64,
        reason: &str,
        reference: &str,
        idempotency_id: &str,
    ) -> Result<LedgerEntry, CreditError> {
        self.grant_as(
            SYSTEM_ACTOR,
            tenant,
            amount,
            reason,
            reference,
            idempotency_id,
        )
        .await
    }

    /// [`Credits::grant`] on behalf of `actor` (e.g. `service:billing`), recorded on the entry.
    pub async fn grant_as(
        &self,
        actor: &str,
        tenant: TenantId,
        amount: i64,
        reason: &str,
        reference: &str,
        idempotency_id: &str,
    ) -> Result<LedgerEntry, CreditError> {
        let mut entry = validate(tenant, amount, reason, reference, Some(idempotency_id))?;
        entry.created_by = actor;
        let applied = self.store.credit(&entry).await?;
        settle(&entry, entry.amount, applied)
    }

    /// Gives back `amount` credits of work that failed or was cancelled; the same rules as
    /// [`Credits::grant`] (idempotency ids share one namespace per tenant).
    pub async fn refund(
        &self,
        tenant: TenantId,
        amount: i64,
        reason: &str,
        reference: &str,
        idempotency_id: &str,
    ) -> Result<LedgerEntry, CreditError> {
        self.grant(tenant, amount, reason, reference, idempotency_id)
            .await
    }

    /// Takes `amount` credits, or fails with `InsufficientCredits` (changing nothing) when
    /// the balance is lower. With an idempotency id a retry returns the original entry,
    /// even if the balance has since dropped below `amount`.
    pub async fn deduct(
        &self,
        tenant: TenantId,
        amount: i64,
        reason: &str,
        reference: &str,
        idempotency_id: Option<&str>,
    ) -> Result<LedgerEntry, CreditError> {
        let entry = validate(tenant, amount, reason, reference, idempotency_id)?;
        let applied = self.store.debit(&entry).await?;
        settle(&entry, -entry.amount, applied)
    }

    /// The current balance; 0 for a tenant that never had credits.
    pub async fn balance(&self, tenant: TenantId) -> Result<i64, CreditError> {
        Ok(self.store.balance(tenant).await?)
    }

    /// At most `limit` (1..=100) entries, newest first; `before_id` (the last entry of the
    /// previous page) continues with the entries before it.
    pub async fn ledger(
        &self,
        tenant: TenantId,
        limit: i64,
        before_id: Option<i64>,
    ) -> Result<Vec<LedgerEntry>, CreditError> {
        let mut v = Violations::new();
        v.check(
            (1..=MAX_PAGE_SIZE).contains(&limit),
            "limit",
            format!("must be between 1 and {MAX_PAGE_SIZE}"),
        );
        v.into_result(())?;
        self.store
            .ledger(tenant, limit, before_id)
            .await?
            .ok_or_else(|| {
                Violations::one("before_id", "not an entry of this tenant's ledger").into()
            })
    }
}

/// Who wrote entries that devgate makes by itself (deductions and refunds of its own work).
pub const SYSTEM_ACTOR: &str = "devgate";

fn validate<'a>(
    tenant: TenantId,
    amount: i64,
    reason: &'a str,
    reference: &'a str,
    idempotency_id: Option<&'a str>,
) -> Result<NewEntry<'a>, Violations> {
    let mut v = Violations::new();
    v.check(
        (1..=MAX_AMOUNT).contains(&amount),
        "amount",
        format!("must be between 1 and {MAX_AMOUNT}"),
    );
    v.check(
        !reason.trim().is_empty() && reason.chars().count() <= MAX_TEXT_CHARS,
        "reason",
        format!("must be 1 to {MAX_TEXT_CHARS} characters, not blank"),
    );
    v.check(
        reference.chars().count() <= MAX_TEXT_CHARS,
        "reference",
        format!("must be at most {MAX_TEXT_CHARS} characters"),
    );
    if let Some(id) = idempotency_id {
        v.check(
            !id.is_empty() && id.chars().count() <= MAX_TEXT_CHARS,
            "idempotency_id",
            format!("must be 1 to {MAX_TEXT_CHARS} characters"),
        );
    }
    v.into_result(NewEntry {
        tenant,
        amount,
        reason,
        reference,
        idempotency_id,
        created_by: SYSTEM_ACTOR,
    })
}

/// The store's outcome as this module's result. A replay is the same request only when the
/// signed amount and the reason match; the reference is not compared (it is descriptive).
fn settle(
    entry: &NewEntry<'_>,
    signed_amount: i64,
    applied: Applied,
) -> Result<LedgerEntry, CreditError> {
    match applied {
        Applied::Inserted(e) => Ok(e),
        Applied::Existing(e) if e.amount == signed_amount && e.reason == entry.reason => Ok(e),
        Applied::Existing(e) => Err(CreditError::Conflict(format!(
            "idempotency id {:?} was already used by ledger entry {} with another amount or reason",
            entry.idempotency_id.unwrap_or_default(),
            e.id
        ))),
        Applied::Insufficient { balance } => Err(CreditError::InsufficientCredits {
            balance,
            requested: entry.amount,
        }),
    }
}

impl Credits {
    /// Credits spent by deductions in `[from, to)` (refunds are not netted out).
    pub async fn spent(
        &self,
        tenant: TenantId,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) -> Result<i64, CreditError> {
        Ok(self.store.spent(tenant, from, to).await?)
    }
}
