//! Credits in Postgres: the balance row and the append-only ledger, always written in one
//! transaction. Every query filters by tenant.
//!
//! Concurrency: every write first changes the tenant's balance row (an upsert for credits,
//! a conditional UPDATE for debits), which row-locks it until commit, so the writers of one
//! tenant apply one after another and the ledger entry written under that lock carries the
//! exact `balance_after`. The entry must be written after the balance change because the
//! ledger is append-only: `balance_after` cannot be filled in later. Idempotency rests on
//! the unique index on (tenant_id, idempotency_id): the entry is inserted with
//! `ON CONFLICT DO NOTHING`, and when nothing is inserted the whole transaction (and so its
//! balance change) is rolled back and the existing entry returned instead.
//!
//! The writes take the caller's connection, so they can run inside a caller's transaction
//! (a deduction committing with the row it pays for): their own transaction then becomes a
//! savepoint, and the idempotency rollback undoes only this write, not the caller's work.

use chrono::{DateTime, Utc};
use diesel::{dsl::sql, prelude::*, sql_types::Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::model::LedgerEntry;
use crate::{
    db::{
        StoreError,
        schema::{credit_balances, credit_ledger, tenants},
    },
    identity::TenantId,
};

#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = credit_ledger, check_for_backend(diesel::pg::Pg))]
struct LedgerRow {
    id: i64,
    tenant_id: Uuid,
    amount: i64,
    reason: String,
    reference: String,
    idempotency_id: Option<String>,
    balance_after: i64,
    create_time: DateTime<Utc>,
    created_by: String,
}

impl From<LedgerRow> for LedgerEntry {
    fn from(row: LedgerRow) -> Self {
        LedgerEntry {
            id: row.id,
            tenant_id: TenantId(row.tenant_id),
            amount: row.amount,
            reason: row.reason,
            reference: row.reference,
            idempotency_id: row.idempotency_id,
            balance_after: row.balance_after,
            create_time: row.create_time,
            created_by: row.created_by,
        }
    }
}

/// An entry to apply; `amount` is positive for a credit and is negated for a debit.
#[derive(Debug, Clone, Copy)]
pub struct NewEntry<'a> {
    pub tenant: TenantId,
    pub amount: i64,
    pub reason: &'a str,
    pub reference: &'a str,
    pub idempotency_id: Option<&'a str>,
    /// `service:<caller>`, `user:<id>`, or `devgate` for devgate's own entries.
    pub created_by: &'a str,
}

/// What a write did.
#[derive(Debug)]
pub enum Applied {
    /// The entry was written and the balance changed.
    Inserted(LedgerEntry),
    /// An entry with the same idempotency id existed; nothing changed. The caller decides
    /// whether it is the same request.
    Existing(LedgerEntry),
    /// A debit was refused: the balance was lower than the amount. Nothing changed.
    Insufficient { balance: i64 },
}

/// Why a write transaction stopped; every variant but `Db` is a deliberate rollback.
#[derive(Debug)]
enum TxError {
    Db(diesel::result::Error),
    /// Another entry holds the idempotency id.
    Duplicate,
    /// The conditional debit matched no row.
    Insufficient,
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        TxError::Db(e)
    }
}

/// Adds `entry.amount` (> 0), creating the tenant and balance rows on first use.
pub async fn credit(
    conn: &mut AsyncPgConnection,
    entry: &NewEntry<'_>,
) -> Result<Applied, StoreError> {
    debug_assert!(entry.amount > 0);
    // A plain retry finds its entry without taking the balance row's lock.
    if let Some(existing) = find_replay(conn, entry).await? {
        return Ok(Applied::Existing(existing));
    }
    let tenant = entry.tenant.0;
    let result = conn
        .transaction(async |conn| {
            diesel::insert_into(tenants::table)
                .values(tenants::id.eq(tenant))
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
            let balance: i64 = diesel::insert_into(credit_balances::table)
                .values((
                    credit_balances::tenant_id.eq(tenant),
                    credit_balances::balance.eq(entry.amount),
                ))
                .on_conflict(credit_balances::tenant_id)
                .do_update()
                .set((
                    credit_balances::balance.eq(credit_balances::balance + entry.amount),
                    credit_balances::update_time.eq(diesel::dsl::now),
                ))
                .returning(credit_balances::balance)
                .get_result(conn)
                .await?;
            insert_entry(conn, entry, entry.amount, balance).await
        })
        .await;
    settle(conn, entry, result).await
}

/// Subtracts `entry.amount` (> 0) unless the balance is lower: the conditional UPDATE
/// re-checks the balance after waiting for any concurrent writer, so however many
/// debits race, the balance never goes negative.
pub async fn debit(
    conn: &mut AsyncPgConnection,
    entry: &NewEntry<'_>,
) -> Result<Applied, StoreError> {
    debug_assert!(entry.amount > 0);
    // Checked first so a retried debit answers with its entry even after the balance
    // has since dropped below the amount.
    if let Some(existing) = find_replay(conn, entry).await? {
        return Ok(Applied::Existing(existing));
    }
    let tenant = entry.tenant.0;
    let result = conn
        .transaction(async |conn| {
            let balance: Option<i64> = diesel::update(credit_balances::table)
                .filter(credit_balances::tenant_id.eq(tenant))
                .filter(credit_balances::balance.ge(entry.amount))
                .set((
                    credit_balances::balance.eq(credit_balances::balance - entry.amount),
                    credit_balances::update_time.eq(diesel::dsl::now),
                ))
                .returning(credit_balances::balance)
                .get_result(conn)
                .await
                .optional()?;
            let Some(balance) = balance else {
                return Err(TxError::Insufficient);
            };
            insert_entry(conn, entry, -entry.amount, balance).await
        })
        .await;
    settle(conn, entry, result).await
}

pub async fn balance(conn: &mut AsyncPgConnection, tenant: TenantId) -> Result<i64, StoreError> {
    balance_of(conn, tenant).await
}

/// At most `limit` entries, newest first, older than the entry `before_id`; `None` when
/// `before_id` is not an entry of this tenant.
pub async fn ledger(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    limit: i64,
    before_id: Option<i64>,
) -> Result<Option<Vec<LedgerEntry>>, StoreError> {
    let mut query = credit_ledger::table
        .filter(credit_ledger::tenant_id.eq(tenant.0))
        .into_boxed();
    if let Some(before) = before_id {
        let cursor: Option<DateTime<Utc>> = credit_ledger::table
            .filter(credit_ledger::tenant_id.eq(tenant.0))
            .filter(credit_ledger::id.eq(before))
            .select(credit_ledger::create_time)
            .first(conn)
            .await
            .optional()?;
        let Some(time) = cursor else {
            return Ok(None);
        };
        query = query.filter(
            credit_ledger::create_time
                .lt(time)
                .or(credit_ledger::create_time
                    .eq(time)
                    .and(credit_ledger::id.lt(before))),
        );
    }
    let rows: Vec<LedgerRow> = query
        .order((credit_ledger::create_time.desc(), credit_ledger::id.desc()))
        .limit(limit)
        .select(LedgerRow::as_select())
        .load(conn)
        .await?;
    Ok(Some(rows.into_iter().map(LedgerEntry::from).collect()))
}

/// Turns a write transaction's outcome into an [`Applied`], looking up the entry that
/// won the idempotency id when this one lost.
async fn settle(
    conn: &mut AsyncPgConnection,
    entry: &NewEntry<'_>,
    result: Result<LedgerEntry, TxError>,
) -> Result<Applied, StoreError> {
    match result {
        Ok(inserted) => Ok(Applied::Inserted(inserted)),
        Err(TxError::Db(e)) => Err(e.into()),
        // The winner has committed (its row is what we conflicted with), so it is
        // visible to this new statement. Ledger rows are never deleted while the
        // tenant exists.
        Err(TxError::Duplicate) => match find_replay(conn, entry).await? {
            Some(existing) => Ok(Applied::Existing(existing)),
            None => Err(StoreError::NotFound),
        },
        Err(TxError::Insufficient) => {
            // A concurrent debit with the same idempotency id may have just taken the
            // last credits: that is a replay, not a refusal.
            if let Some(existing) = find_replay(conn, entry).await? {
                return Ok(Applied::Existing(existing));
            }
            Ok(Applied::Insufficient {
                balance: balance_of(conn, entry.tenant).await?,
            })
        }
    }
}

/// Writes the entry unless its idempotency id is taken (then [`TxError::Duplicate`]).
/// `create_time` is `clock_timestamp()`, read under the balance row's lock, so a tenant's
/// entries sort the same by (create_time, id) as by the order they were applied in (`now()`
/// is the transaction's start, which can be earlier than a concurrent writer's).
async fn insert_entry(
    conn: &mut AsyncPgConnection,
    entry: &NewEntry<'_>,
    signed_amount: i64,
    balance_after: i64,
) -> Result<LedgerEntry, TxError> {
    let row: Option<LedgerRow> = diesel::insert_into(credit_ledger::table)
        .values((
            credit_ledger::tenant_id.eq(entry.tenant.0),
            credit_ledger::amount.eq(signed_amount),
            credit_ledger::reason.eq(entry.reason),
            credit_ledger::reference.eq(entry.reference),
            credit_ledger::idempotency_id.eq(entry.idempotency_id),
            credit_ledger::balance_after.eq(balance_after),
            credit_ledger::created_by.eq(entry.created_by),
            credit_ledger::create_time.eq(sql::<Timestamptz>("clock_timestamp()")),
        ))
        .on_conflict((credit_ledger::tenant_id, credit_ledger::idempotency_id))
        .do_nothing()
        .returning(LedgerRow::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    row.map(LedgerEntry::from).ok_or(TxError::Duplicate)
}

/// The entry already recorded under `entry`'s idempotency id, if it has one.
async fn find_replay(
    conn: &mut AsyncPgConnection,
    entry: &NewEntry<'_>,
) -> Result<Option<LedgerEntry>, StoreError> {
    let Some(id) = entry.idempotency_id else {
        return Ok(None);
    };
    let row: Option<LedgerRow> = credit_ledger::table
        .filter(credit_ledger::tenant_id.eq(entry.tenant.0))
        .filter(credit_ledger::idempotency_id.eq(id))
        .select(LedgerRow::as_select())
        .first(conn)
        .await
        .optional()?;
    Ok(row.map(LedgerEntry::from))
}

async fn balance_of(conn: &mut AsyncPgConnection, tenant: TenantId) -> Result<i64, StoreError> {
    let balance: Option<i64> = credit_balances::table
        .filter(credit_balances::tenant_id.eq(tenant.0))
        .select(credit_balances::balance)
        .first(conn)
        .await
        .optional()?;
    Ok(balance.unwrap_or(0))
}

#[derive(diesel::QueryableByName)]
struct Spent {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    spent: i64,
}

/// The sum of deductions (as a positive number) in `[from, to)`.
pub async fn spent(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<i64, StoreError> {
    use diesel::sql_types::{Timestamptz, Uuid as SqlUuid};
    let row: Spent = diesel::sql_query(
        "SELECT COALESCE(-SUM(amount), 0)::bigint AS spent FROM credit_ledger \
         WHERE tenant_id = $1 AND amount < 0 AND create_time >= $2 AND create_time < $3",
    )
    .bind::<SqlUuid, _>(tenant.0)
    .bind::<Timestamptz, _>(from)
    .bind::<Timestamptz, _>(to)
    .get_result(conn)
    .await?;
    Ok(row.spent)
}
