//! Events: the catalog of event types (what devgate can deliver, each with a JSON Schema
//! and a sample), payload validation against it and endpoint subscription patterns; and the
//! event bus: events are written to Postgres with the state change that causes them (the
//! [outbox]) and published to RabbitMQ's `<prefix>.events` topic exchange by the [relay], at
//! least once, confirmed by the broker before the outbox row is deleted.
//!
//! The catalog is data, seeded by a migration; [`Catalog`] compiles every schema once so
//! publishing an event never parses a schema. The gRPC layers map [`EventError`] to a status
//! in `crate::status`.

pub mod catalog;
pub mod emitter;
pub mod outbox;
pub mod relay;

pub use catalog::{Catalog, EventType, matches};

use crate::{db::StoreError, validation::Violations};

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The name is not in the catalog: kept apart from payload errors so callers name the
    /// `event_type` field, not `payload`.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// The payload does not satisfy the type's schema; fields are `payload.<path>`.
    #[error("payload does not match the event type's schema: {0}")]
    InvalidPayload(Violations),
    /// Subscription patterns that are malformed or match no catalog type.
    #[error("invalid event type filter: {0}")]
    InvalidPattern(Violations),
    /// A stored schema does not compile: a broken migration, never the caller's fault.
    #[error("event type {name} v{version}: schema does not compile: {reason}")]
    BadSchema {
        name: String,
        version: i32,
        reason: String,
    },
    /// A payload devgate built fails its own catalog schema: our bug, never the caller's;
    /// the change is rolled back rather than committed without its event.
    #[error("devgate's own {event_type} event does not match its schema: {reason}")]
    OwnEventInvalid { event_type: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}
