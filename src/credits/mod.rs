//! Credits: a per-tenant balance and the append-only ledger that explains it. Grants and
//! refunds add, deductions subtract but never below zero, even under concurrent requests;
//! writes with an idempotency id apply at most once.
//!
//! A library feature: the gRPC layer maps [`CreditError`] to a status in `crate::status`.

pub mod grpc;
pub mod model;
pub mod service;
pub mod store;

pub use model::LedgerEntry;
pub use service::Credits;

use crate::{db::StoreError, validation::Violations};

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum CreditError {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    /// The deduction would make the balance negative; nothing was deducted.
    #[error("insufficient credits: balance {balance}, requested {requested}")]
    InsufficientCredits { balance: i64, requested: i64 },
    /// The idempotency id was used before for a request with another amount or reason.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Violations> for CreditError {
    fn from(v: Violations) -> Self {
        CreditError::Invalid(v)
    }
}
