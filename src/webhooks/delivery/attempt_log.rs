//! The attempt log: every HTTP attempt of every delivery, written in batches by the shared
//! batching writer (the request log's), so a burst of deliveries costs one INSERT per batch
//! instead of one per attempt. Losing an attempt row under an outage is accepted (the
//! delivery row keeps the last status); losing a delivery is not, and does not depend on it.

use diesel::sql_types::{Array, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::{Map, Value};

use super::Attempt;
use crate::db::StoreError;

/// Writes `rows` in one statement (one array per column). A row whose delivery was deleted
/// meanwhile (its endpoint was) is skipped rather than failing the batch, and a repeated
/// (delivery, attempt) — a crash after the POST — keeps the first.
pub async fn insert(conn: &mut AsyncPgConnection, rows: &[&Attempt]) -> Result<usize, StoreError> {
    let mut delivery = Vec::with_capacity(rows.len());
    let mut attempt = Vec::with_capacity(rows.len());
    let mut tenant = Vec::with_capacity(rows.len());
    let mut endpoint = Vec::with_capacity(rows.len());
    let mut time = Vec::with_capacity(rows.len());
    let mut url = Vec::with_capacity(rows.len());
    let mut status = Vec::with_capacity(rows.len());
    let mut headers = Vec::with_capacity(rows.len());
    let mut body = Vec::with_capacity(rows.len());
    let mut latency = Vec::with_capacity(rows.len());
    let mut kind = Vec::with_capacity(rows.len());
    let mut message = Vec::with_capacity(rows.len());
    let mut trigger = Vec::with_capacity(rows.len());
    for r in rows {
        delivery.push(r.delivery_id);
        attempt.push(r.attempt);
        tenant.push(r.tenant.0);
        endpoint.push(r.endpoint_id);
        time.push(r.attempt_time);
        url.push(r.url.as_str());
        status.push(r.status_code);
        headers.push(Value::Object(
            r.response_headers
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect::<Map<_, _>>(),
        ));
        body.push(r.response_body.as_str());
        latency.push(r.latency_ms);
        kind.push(r.error_kind.map(|k| k.as_str()));
        message.push(r.error_message.as_deref());
        trigger.push(if r.manual { "manual" } else { "scheduled" });
    }
    let n = diesel::sql_query(
        "INSERT INTO webhook_attempts (delivery_id, attempt, tenant_id, endpoint_id, \
                attempt_time, url, status_code, response_headers, response_body, latency_ms, \
                error_kind, error_message, trigger) \
         SELECT u.* FROM unnest($1::uuid[], $2::int4[], $3::uuid[], $4::uuid[], \
                $5::timestamptz[], $6::text[], $7::int4[], $8::jsonb[], $9::text[], $10::int4[], \
                $11::text[], $12::text[], $13::text[]) \
              AS u(delivery_id, attempt, tenant_id, endpoint_id, attempt_time, url, \
                   status_code, response_headers, response_body, latency_ms, error_kind, \
                   error_message, trigger) \
         WHERE EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.id = u.delivery_id) \
         ON CONFLICT (delivery_id, attempt) DO NOTHING",
    )
    .bind::<Array<SqlUuid>, _>(&delivery)
    .bind::<Array<Integer>, _>(&attempt)
    .bind::<Array<SqlUuid>, _>(&tenant)
    .bind::<Array<SqlUuid>, _>(&endpoint)
    .bind::<Array<Timestamptz>, _>(&time)
    .bind::<Array<Text>, _>(&url)
    .bind::<Array<Nullable<Integer>>, _>(&status)
    .bind::<Array<Jsonb>, _>(&headers)
    .bind::<Array<Text>, _>(&body)
    .bind::<Array<Integer>, _>(&latency)
    .bind::<Array<Nullable<Text>>, _>(&kind)
    .bind::<Array<Nullable<Text>>, _>(&message)
    .bind::<Array<Text>, _>(&trigger)
    .execute(conn)
    .await?;
    Ok(n)
}

/// Postgres text cannot hold NUL; one such value would fail its whole batch forever.
pub fn sanitize(a: &mut Attempt) {
    fn fix(s: &mut String) {
        if s.contains('\0') {
            *s = s.replace('\0', "\u{FFFD}");
        }
    }
    fix(&mut a.url);
    fix(&mut a.response_body);
    if let Some(m) = a.error_message.as_mut() {
        fix(m);
    }
    for (k, v) in &mut a.response_headers {
        fix(k);
        fix(v);
    }
}

impl crate::db::batch::BatchRow for Attempt {
    const NAME: &'static str = "webhook attempt log";
    /// One bind per column, whatever the batch size; bounded for the statement's size.
    const MAX_BATCH: usize = 5_000;

    fn sanitize(&mut self) {
        sanitize(self)
    }

    async fn insert<'a>(
        conn: &'a mut AsyncPgConnection,
        rows: Vec<&'a Self>,
    ) -> Result<usize, StoreError> {
        insert(conn, &rows).await
    }
}
