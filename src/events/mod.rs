//! The event bus: events are written to Postgres with the state change that causes them
//! (the [outbox]) and published to RabbitMQ's `<prefix>.events` topic exchange by the
//! [relay], at least once, confirmed by the broker before the outbox row is deleted.

pub mod outbox;
pub mod relay;
