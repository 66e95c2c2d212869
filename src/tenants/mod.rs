//! Tenants: the isolation boundary. A tenant row is created on first authenticated use by
//! one of its users; every other table is filtered by the principal's tenant.

pub mod model;
pub mod service;
pub mod store;

pub use model::TenantRecord;
pub use service::TenantDirectory;
