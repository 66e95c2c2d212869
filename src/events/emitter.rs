//! devgate's own events (`api_key.*`, `webhook_endpoint.*`, …): one compiled catalog per
//! process, shared by every feature that emits, and the one way a state change appends the
//! event it causes, in the change's own transaction.

use diesel_async::AsyncPgConnection;
use tokio::sync::OnceCell;

use super::{
    Catalog, EventError,
    outbox::{self, NewEvent},
};
use crate::{
    db::{self, PgPool},
    identity::TenantId,
};

/// The `source` of the events devgate emits itself.
const SOURCE: &str = "devgate";

pub struct Emitter {
    pool: PgPool,
    /// Loaded on first use: the process starts while Postgres is down. It changes only
    /// with a migration, i.e. a restart.
    catalog: OnceCell<Catalog>,
}

impl Emitter {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            catalog: OnceCell::new(),
        }
    }

    /// The compiled catalog. Callers load it before opening a change's transaction, so no
    /// connection is held while schemas compile.
    pub async fn catalog(&self) -> Result<&Catalog, EventError> {
        self.catalog
            .get_or_try_init(|| async {
                let mut conn = db::connect(&self.pool).await?;
                Catalog::load(&mut conn).await
            })
            .await
    }

    /// Checks a payload devgate built against its type's schema and appends it with its
    /// outbox row on `conn` (the change's transaction). A payload the catalog refuses is
    /// devgate's bug, never the caller's: [`EventError::OwnEventInvalid`].
    pub async fn emit(
        &self,
        conn: &mut AsyncPgConnection,
        tenant: TenantId,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<(), EventError> {
        match self.catalog().await?.validate(event_type, &payload) {
            Ok(()) => {}
            Err(EventError::InvalidPayload(v)) => {
                return Err(EventError::OwnEventInvalid {
                    event_type: event_type.into(),
                    reason: v.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
        outbox::append(
            conn,
            NewEvent {
                tenant,
                event_type: event_type.into(),
                payload,
                idempotency_id: None,
                source: SOURCE.into(),
                endpoint_id: None,
            },
        )
        .await?;
        Ok(())
    }
}
