//! Postgres: the bb8 pool of diesel-async connections, embedded migrations, and the one
//! mapping of diesel errors to [`StoreError`]; [`batch`] is the batching writer shared by
//! the append-only logs (fire and forget), [`group`] the group commit of hot writes whose
//! callers wait for their row to be committed.

pub mod batch;
pub mod group;
pub mod schema;

use std::time::Duration;

use diesel::{Connection, ConnectionError, RunQueryDsl};
use diesel_async::{
    AsyncPgConnection,
    async_connection_wrapper::AsyncConnectionWrapper,
    pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, PoolError},
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::FutureExt;
use secrecy::{ExposeSecret, SecretString};

/// The `DEVGATE_DATABASE_*` section, composed by `crate::config`.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: SecretString,
    pub pool_size: u32,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
}

pub type PgPool = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;
pub type PgConn<'a> = bb8::PooledConnection<'a, AsyncDieselConnectionManager<AsyncPgConnection>>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Arbitrary constant naming the advisory lock that serialises migrations across replicas.
const MIGRATION_LOCK_ID: i64 = 0x6465_7667_6174_6531; // "devgate1"

/// Why a store operation failed, independent of the feature that called it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("row not found")]
    NotFound,
    /// A unique constraint rejected the write; carries the constraint name.
    #[error("conflict on {0}")]
    Conflict(String),
    /// Postgres could not be reached or the pool had no connection in time.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Query(#[source] diesel::result::Error),
}

impl From<diesel::result::Error> for StoreError {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        match e {
            Error::NotFound => StoreError::NotFound,
            Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StoreError::Conflict(info.constraint_name().unwrap_or("unique").to_string())
            }
            // diesel-async reports a lost connection as UnableToSendCommand.
            Error::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                info,
            ) => StoreError::Unavailable(info.message().to_string()),
            other => StoreError::Query(other),
        }
    }
}

impl From<bb8::RunError<PoolError>> for StoreError {
    fn from(e: bb8::RunError<PoolError>) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Builds the pool without connecting: the process starts (and reports UNAVAILABLE per call)
/// while Postgres is down, and the pool reconnects by itself when it is back.
///
/// Every connection gets `statement_timeout` when it is opened, so no request can hold a
/// connection (and a Postgres backend) longer than that, whatever query it caused.
pub fn pool(config: &DatabaseConfig) -> PgPool {
    let timeout_ms = config.statement_timeout.as_millis();
    let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
    manager_config.custom_setup = Box::new(move |url| {
        async move {
            let mut conn =
                <AsyncPgConnection as diesel_async::AsyncConnection>::establish(url).await?;
            diesel_async::RunQueryDsl::execute(
                diesel::sql_query(format!("SET statement_timeout = {timeout_ms}")),
                &mut conn,
            )
            .await
            .map_err(ConnectionError::CouldntSetupConfiguration)?;
            Ok(conn)
        }
        .boxed()
    });
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        config.url.expose_secret(),
        manager_config,
    );
    bb8::Pool::builder()
        .max_size(config.pool_size)
        .connection_timeout(config.connect_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        .test_on_check_out(false)
        .build_unchecked(manager)
}

/// Runs pending embedded migrations under a Postgres advisory lock, so replicas starting
/// together migrate once. Returns the versions applied.
pub async fn migrate(url: &SecretString) -> anyhow::Result<Vec<String>> {
    let url = url.expose_secret().to_string();
    // diesel_migrations is synchronous: run it on a blocking thread over the async
    // connection's sync wrapper (STACK-NOTES: block_in_place needs a multi-thread runtime).
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::establish(&url)?;
        diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_ID})"))
            .execute(&mut conn)?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(ToString::to_string).collect())
            .map_err(|e| anyhow::anyhow!("migration failed: {e}"));
        diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})"))
            .execute(&mut conn)?;
        applied
    })
    .await?
}

/// A connection from the pool, for a service to run one store call or open a transaction
/// that spans stores (`conn.transaction(|c| async move { … }.scope_boxed())`).
pub async fn connect(pool: &PgPool) -> Result<PgConn<'_>, StoreError> {
    Ok(pool.get().await?)
}
