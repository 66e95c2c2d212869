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
    }
}

diesel::joinable!(api_keys -> tenants (tenant_id));
diesel::allow_tables_to_appear_in_same_query!(api_keys, tenants);
