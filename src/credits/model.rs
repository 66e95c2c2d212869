//! Credits domain types.

use chrono::{DateTime, Utc};

use crate::identity::TenantId;

/// One change to a tenant's balance, as recorded in the append-only ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Increases with every entry, so it orders a tenant's entries as they were applied.
    pub id: i64,
    pub tenant_id: TenantId,
    /// Positive for a grant or refund, negative for a deduction.
    pub amount: i64,
    pub reason: String,
    /// The caller's pointer to what the credits paid for (a generation id, an invoice...).
    pub reference: String,
    pub idempotency_id: Option<String>,
    /// The balance right after this entry was applied.
    pub balance_after: i64,
    pub create_time: DateTime<Utc>,
    /// Who wrote it: `service:<caller>` for grants, `devgate` for its own entries.
    pub created_by: String,
}
