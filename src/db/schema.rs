// @generated shape of `diesel print-schema` for migrations/, kept by hand in the same form.
// Array element types are declared non-null: the migrations forbid NULL elements.

diesel::table! {
    api_keys (id) {
        id -> Text,
        tenant_id -> Uuid,
        name -> Text,
        description -> Text,
        environment -> Text,
        scopes -> Array<Text>,
        allowed_cidrs -> Array<Cidr>,
        secret_hash -> Text,
        previous_secret_hash -> Nullable<Text>,
        previous_secret_expire_time -> Nullable<Timestamptz>,
        created_by -> Text,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        last_used_time -> Nullable<Timestamptz>,
        expire_time -> Nullable<Timestamptz>,
        revoke_time -> Nullable<Timestamptz>,
        revoke_reason -> Nullable<Text>,
        rate_limit_per_minute -> Nullable<Int4>,
        rate_limit_per_hour -> Nullable<Int4>,
        rate_limit_per_day -> Nullable<Int4>,
        rate_limit_burst -> Nullable<Int4>,
    }
}

diesel::table! {
    tenants (id) {
        id -> Uuid,
        name -> Text,
        plan -> Text,
        create_time -> Timestamptz,
        rate_limit_per_minute -> Nullable<Int4>,
        rate_limit_per_hour -> Nullable<Int4>,
        rate_limit_per_day -> Nullable<Int4>,
        rate_limit_burst -> Nullable<Int4>,
        update_time -> Timestamptz,
        quota_monthly_requests -> Nullable<Int8>,
        quota_monthly_generations -> Nullable<Int8>,
        plan_updated_by -> Nullable<Text>,
    }
}

diesel::table! {
    credit_balances (tenant_id) {
        tenant_id -> Uuid,
        balance -> Int8,
        update_time -> Timestamptz,
    }
}

diesel::table! {
    credit_ledger (id) {
        id -> Int8,
        tenant_id -> Uuid,
        amount -> Int8,
        reason -> Text,
        reference -> Text,
        idempotency_id -> Nullable<Text>,
        balance_after -> Int8,
        create_time -> Timestamptz,
        created_by -> Text,
    }
}

diesel::table! {
    api_request_logs (tenant_id, time, id) {
        id -> Uuid,
        time -> Timestamptz,
        tenant_id -> Uuid,
        api_key_id -> Nullable<Text>,
        user_id -> Nullable<Text>,
        rpc -> Text,
        http_method -> Nullable<Text>,
        http_path -> Nullable<Text>,
        grpc_code -> Int2,
        http_status -> Int2,
        error_code -> Nullable<Text>,
        latency_us -> Int4,
        request_bytes -> Int4,
        response_bytes -> Int4,
        client_ip -> Nullable<Inet>,
        user_agent -> Nullable<Text>,
        cost -> Int8,
        service_caller -> Nullable<Text>,
    }
}

diesel::table! {
    metered_usage (tenant_id, idempotency_id) {
        tenant_id -> Uuid,
        idempotency_id -> Text,
        api_key_id -> Nullable<Text>,
        metric -> Text,
        quantity -> Int8,
        time -> Timestamptz,
        create_time -> Timestamptz,
        recorded_by -> Nullable<Text>,
    }
}

diesel::table! {
    events (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        event_type -> Text,
        payload -> Jsonb,
        idempotency_id -> Nullable<Text>,
        source -> Text,
        create_time -> Timestamptz,
        endpoint_id -> Nullable<Uuid>,
    }
}

diesel::table! {
    outbox (id) {
        id -> Int8,
        event_id -> Nullable<Uuid>,
        create_time -> Timestamptz,
        exchange -> Nullable<Text>,
        routing_key -> Nullable<Text>,
        body -> Nullable<Bytea>,
        content_type -> Nullable<Text>,
        message_type -> Nullable<Text>,
        message_id -> Nullable<Text>,
        not_before -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    generations (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        kind -> Text,
        prompt -> Text,
        output_format -> Text,
        style -> Jsonb,
        count -> Int4,
        project_id -> Text,
        metadata -> Jsonb,
        state -> Text,
        progress -> Int4,
        cost -> Int8,
        refunded -> Bool,
        asset_ids -> Array<Text>,
        result_urls -> Array<Text>,
        error_code -> Nullable<Text>,
        error_message -> Nullable<Text>,
        last_sequence -> Int8,
        created_by -> Text,
        create_time -> Timestamptz,
        start_time -> Nullable<Timestamptz>,
        end_time -> Nullable<Timestamptz>,
        update_time -> Timestamptz,
    }
}

diesel::table! {
    event_types (name) {
        name -> Text,
        category -> Text,
        description -> Text,
        schema -> Jsonb,
        sample -> Jsonb,
        version -> Int4,
        create_time -> Timestamptz,
        deprecated -> Bool,
    }
}

diesel::table! {
    webhook_endpoints (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        url -> Text,
        description -> Text,
        event_types -> Array<Text>,
        headers -> Jsonb,
        rate_limit_per_second -> Int4,
        secret_ciphertext -> Text,
        previous_secret_ciphertext -> Nullable<Text>,
        previous_secret_expire_time -> Nullable<Timestamptz>,
        disabled_time -> Nullable<Timestamptz>,
        disabled_reason -> Nullable<Text>,
        consecutive_failures -> Int4,
        created_by -> Text,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
    }
}

diesel::table! {
    webhook_deliveries (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        endpoint_id -> Uuid,
        event_id -> Uuid,
        event_type -> Text,
        status -> Text,
        attempts -> Int4,
        lease_until -> Nullable<Timestamptz>,
        next_attempt_time -> Nullable<Timestamptz>,
        last_attempt_time -> Nullable<Timestamptz>,
        last_status_code -> Nullable<Int4>,
        last_error -> Nullable<Text>,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
    }
}

diesel::table! {
    webhook_attempts (delivery_id, attempt) {
        delivery_id -> Uuid,
        attempt -> Int4,
        tenant_id -> Uuid,
        endpoint_id -> Uuid,
        attempt_time -> Timestamptz,
        url -> Text,
        status_code -> Nullable<Int4>,
        response_headers -> Jsonb,
        response_body -> Text,
        latency_ms -> Int4,
        error_kind -> Nullable<Text>,
        error_message -> Nullable<Text>,
        trigger -> Text,
    }
}

diesel::table! {
    quota_notices (tenant_id, metric, month, level) {
        tenant_id -> Uuid,
        metric -> Text,
        month -> Date,
        level -> Text,
        quota_limit -> Int8,
        used -> Int8,
        create_time -> Timestamptz,
    }
}

diesel::table! {
    api_key_expiring_notices (api_key_id, expire_time) {
        api_key_id -> Text,
        expire_time -> Timestamptz,
        create_time -> Timestamptz,
    }
}

diesel::table! {
    idempotency_keys (tenant_id, key) {
        tenant_id -> Uuid,
        key -> Text,
        rpc -> Text,
        request_hash -> Bytea,
        state -> Text,
        lease_id -> Uuid,
        lease_until -> Nullable<Timestamptz>,
        response -> Nullable<Bytea>,
        resource_id -> Nullable<Text>,
        create_time -> Timestamptz,
        expire_time -> Timestamptz,
    }
}

diesel::joinable!(api_keys -> tenants (tenant_id));
diesel::joinable!(metered_usage -> tenants (tenant_id));
diesel::joinable!(credit_balances -> tenants (tenant_id));
diesel::joinable!(credit_ledger -> tenants (tenant_id));
diesel::joinable!(events -> tenants (tenant_id));
diesel::joinable!(outbox -> events (event_id));
diesel::joinable!(generations -> tenants (tenant_id));
diesel::joinable!(webhook_endpoints -> tenants (tenant_id));
diesel::joinable!(quota_notices -> tenants (tenant_id));
diesel::joinable!(api_key_expiring_notices -> api_keys (api_key_id));
diesel::joinable!(webhook_deliveries -> webhook_endpoints (endpoint_id));
diesel::joinable!(webhook_deliveries -> events (event_id));
diesel::joinable!(webhook_attempts -> webhook_deliveries (delivery_id));
diesel::allow_tables_to_appear_in_same_query!(
    api_keys,
    api_key_expiring_notices,
    api_request_logs,
    credit_balances,
    credit_ledger,
    events,
    event_types,
    generations,
    idempotency_keys,
    metered_usage,
    outbox,
    quota_notices,
    tenants,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
);
