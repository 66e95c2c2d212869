//! The tonic implementation of `devgate.v1.WebhookService`: authorize, validate and
//! convert, call the service, convert back. No rules live here.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    WebhookError,
    delivery::{Attempt, Delivery, DeliveryStatus, store::DeliveryFilter},
    model::{self, EndpointChanges, EndpointState, NewEndpoint, WebhookEndpoint},
    service::{MAX_ROTATION_GRACE, Publish, Webhooks},
};
use crate::{
    auth::{Principal, principal},
    events::{
        EventType,
        catalog::PAYLOAD_FIELD,
        outbox::{Event, EventFilter},
    },
    idempotency,
    identity::{Scope, TenantId},
    pagination,
    proto::{
        convert::{from_duration, from_timestamp, opt_timestamp, timestamp},
        internal::v1::{
            self as internal, webhook_service_server::WebhookService as InternalWebhookService,
        },
        json::{json_to_struct, struct_to_json},
        v1::{self, webhook_service_server::WebhookService},
    },
    validation::Violations,
};

pub struct WebhookGrpc {
    webhooks: Arc<Webhooks>,
}

impl WebhookGrpc {
    pub fn new(webhooks: Arc<Webhooks>) -> Self {
        Self { webhooks }
    }
}

type RpcResult<T> = Result<Response<T>, Status>;

/// The longest event type name a request may carry (the events table's limit).
const MAX_EVENT_TYPE_NAME_LEN: usize = 200;
/// The largest PublishEvent payload, protobuf-encoded.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// The longest idempotency id, in characters.
const MAX_IDEMPOTENCY_ID_CHARS: usize = 200;
/// The widest time window of a ListEvents or ListWebhookDeliveries call.
const MAX_EVENT_WINDOW: chrono::TimeDelta = chrono::TimeDelta::days(93);
/// How far back RecoverWebhookDeliveries reaches.
const MAX_RECOVER_WINDOW: chrono::TimeDelta = chrono::TimeDelta::days(14);
/// Clock skew and request latency forgiven at both ends of `since`: "14 days ago" computed
/// by the caller is a little older when it arrives.
const SINCE_SLACK: chrono::TimeDelta = chrono::TimeDelta::minutes(1);
/// The RPC an idempotency key of CreateWebhookEndpoint is bound to.
const CREATE_WEBHOOK_ENDPOINT: &str = "devgate.v1.WebhookService/CreateWebhookEndpoint";
/// The description of a malformed endpoint id.
const ENDPOINT_ID: &str = "not a webhook endpoint id (a UUID)";

#[tonic::async_trait]
impl WebhookService for WebhookGrpc {
    async fn create_webhook_endpoint(
        &self,
        req: Request<v1::CreateWebhookEndpointRequest>,
    ) -> RpcResult<v1::CreateWebhookEndpointResponse> {
        let principal = principal(&req)?;
        // Authorize before validating: a caller who may not create learns nothing more, and
        // costs no DNS lookups.
        authorize(principal, Scope::WebhooksWrite)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let description = model::validate_description(&r.description, "description", &mut v);
        let event_types = model::validate_event_types_shape(&r.event_types, "event_types", &mut v);
        let headers = model::validate_headers(&r.headers, "headers", &mut v);
        let rate_limit_per_second =
            model::validate_rate_limit(r.rate_limit_per_second, "rate_limit_per_second", &mut v);
        if !event_types.is_empty() {
            self.webhooks
                .check_patterns(&event_types, "event_types", &mut v)
                .await?;
        }
        let url = if r.url.trim().is_empty() {
            v.add("url", "required");
            String::new()
        } else {
            self.webhooks.check_url(&r.url, "url", &mut v).await
        };
        v.into_result(()).map_err(WebhookError::from)?;
        let claim = idempotency::claim(&req, CREATE_WEBHOOK_ENDPOINT)?;
        let new = NewEndpoint {
            url,
            description,
            event_types,
            headers,
            rate_limit_per_second,
        };
        let (endpoint, secret) = self.webhooks.create(principal, new, claim).await?;
        Ok(Response::new(v1::CreateWebhookEndpointResponse {
            webhook_endpoint: Some(to_proto(&endpoint)),
            secret: secret.expose_whsec(),
        }))
    }

    async fn list_webhook_endpoints(
        &self,
        req: Request<v1::ListWebhookEndpointsRequest>,
    ) -> RpcResult<v1::ListWebhookEndpointsResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksRead)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let page_size = pagination::page_size(r.page_size, &mut v);
        let before: Option<EndpointCursor> = pagination::decode_token(&r.page_token, &mut v);
        let state = match v1::WebhookEndpointState::try_from(r.state) {
            Ok(v1::WebhookEndpointState::Unspecified) => None,
            Ok(v1::WebhookEndpointState::Enabled) => Some(EndpointState::Enabled),
            Ok(v1::WebhookEndpointState::Disabled) => Some(EndpointState::Disabled),
            Err(_) => {
                v.add("state", format!("unknown state {}", r.state));
                None
            }
        };
        v.into_result(()).map_err(WebhookError::from)?;
        let page = self
            .webhooks
            .list(principal, state, before.map(|c| c.before), page_size)
            .await?;
        Ok(Response::new(v1::ListWebhookEndpointsResponse {
            webhook_endpoints: page.endpoints.iter().map(to_proto).collect(),
            next_page_token: page
                .next
                .map(|before| pagination::encode_token(&EndpointCursor { before }))
                .unwrap_or_default(),
        }))
    }

    async fn get_webhook_endpoint(
        &self,
        req: Request<v1::GetWebhookEndpointRequest>,
    ) -> RpcResult<v1::WebhookEndpoint> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksRead)?;
        let id = endpoint_id(&req.get_ref().id, "id")?;
        let endpoint = self.webhooks.get(principal, id).await?;
        Ok(Response::new(to_proto(&endpoint)))
    }

    async fn update_webhook_endpoint(
        &self,
        req: Request<v1::UpdateWebhookEndpointRequest>,
    ) -> RpcResult<v1::WebhookEndpoint> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksWrite)?;
        let r = req.get_ref();
        let Some(patch) = &r.webhook_endpoint else {
            return Err(WebhookError::Invalid(Violations::one(
                "webhook_endpoint",
                "required: the endpoint's id and new values",
            ))
            .into());
        };
        let id = endpoint_id(&patch.id, "webhook_endpoint.id")?;
        let changes = self.changes(patch, r.update_mask.as_ref()).await?;
        let endpoint = self.webhooks.update(principal, id, changes).await?;
        Ok(Response::new(to_proto(&endpoint)))
    }

    async fn delete_webhook_endpoint(
        &self,
        req: Request<v1::DeleteWebhookEndpointRequest>,
    ) -> RpcResult<()> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksWrite)?;
        let id = endpoint_id(&req.get_ref().id, "id")?;
        self.webhooks.delete(principal, id).await?;
        Ok(Response::new(()))
    }

    async fn get_webhook_secret(
        &self,
        req: Request<v1::GetWebhookSecretRequest>,
    ) -> RpcResult<v1::GetWebhookSecretResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksWrite)?;
        let id = endpoint_id(&req.get_ref().id, "id")?;
        let shown = self.webhooks.secret(principal, id).await?;
        Ok(Response::new(v1::GetWebhookSecretResponse {
            secret: shown.secret.expose_whsec(),
            previous_secret_expire_time: opt_timestamp(shown.previous_secret_expire_time),
        }))
    }

    async fn rotate_webhook_secret(
        &self,
        req: Request<v1::RotateWebhookSecretRequest>,
    ) -> RpcResult<v1::RotateWebhookSecretResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksWrite)?;
        let r = req.get_ref();
        let id = endpoint_id(&r.id, "id")?;
        // Unset or zero (`{}` in JSON, which the transcoder reads as zero) is the default
        // grace: ending the old secret at once is only ever the explicit `end_grace_now`.
        let invalid = |msg: String| -> Status {
            WebhookError::Invalid(Violations::one("grace_period", msg)).into()
        };
        let grace = match r.grace_period.as_ref().map(from_duration) {
            None => None,
            Some(Some(g)) if g.is_zero() => None,
            Some(Some(_)) if r.end_grace_now => {
                return Err(invalid("must be unset when end_grace_now is true".into()));
            }
            Some(Some(g)) if g <= MAX_ROTATION_GRACE => Some(g),
            Some(Some(_)) => {
                return Err(invalid(format!(
                    "at most {}",
                    humantime::format_duration(MAX_ROTATION_GRACE)
                )));
            }
            Some(None) => return Err(invalid("must not be negative".into())),
        };
        let (endpoint, secret) = self
            .webhooks
            .rotate(principal, id, grace, r.end_grace_now)
            .await?;
        Ok(Response::new(v1::RotateWebhookSecretResponse {
            secret: secret.expose_whsec(),
            webhook_endpoint: Some(to_proto(&endpoint)),
        }))
    }

    async fn enable_webhook_endpoint(
        &self,
        req: Request<v1::EnableWebhookEndpointRequest>,
    ) -> RpcResult<v1::WebhookEndpoint> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksWrite)?;
        let id = endpoint_id(&req.get_ref().id, "id")?;
        let endpoint = self.webhooks.enable(principal, id).await?;
        Ok(Response::new(to_proto(&endpoint)))
    }

    async fn list_event_types(
        &self,
        req: Request<v1::ListEventTypesRequest>,
    ) -> RpcResult<v1::ListEventTypesResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksRead)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let page_size = pagination::page_size(r.page_size, &mut v);
        let after: Option<EventTypeCursor> = pagination::decode_token(&r.page_token, &mut v);
        let category = r.category.trim();
        v.check(
            category.len() <= MAX_EVENT_TYPE_NAME_LEN,
            "category",
            format!("at most {MAX_EVENT_TYPE_NAME_LEN} characters"),
        );
        v.into_result(()).map_err(WebhookError::from)?;
        let (types, next) = self
            .webhooks
            .event_types(
                principal,
                (!category.is_empty()).then_some(category),
                after.as_ref().map(|c| c.after.as_str()),
                page_size,
            )
            .await?;
        Ok(Response::new(v1::ListEventTypesResponse {
            event_types: types.iter().map(event_type_to_proto).collect(),
            next_page_token: next
                .map(|after| pagination::encode_token(&EventTypeCursor { after }))
                .unwrap_or_default(),
        }))
    }

    async fn get_event_type(
        &self,
        req: Request<v1::GetEventTypeRequest>,
    ) -> RpcResult<v1::EventType> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksRead)?;
        let name = req.get_ref().name.trim();
        let mut v = Violations::new();
        v.check(!name.is_empty(), "name", "required");
        v.check(
            name.len() <= MAX_EVENT_TYPE_NAME_LEN,
            "name",
            format!("at most {MAX_EVENT_TYPE_NAME_LEN} characters"),
        );
        v.into_result(()).map_err(WebhookError::from)?;
        let t = self.webhooks.event_type(principal, name).await?;
        Ok(Response::new(event_type_to_proto(&t)))
    }

    async fn list_events(
        &self,
        req: Request<v1::ListEventsRequest>,
    ) -> RpcResult<v1::ListEventsResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksRead)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let page_size = pagination::page_size(r.page_size, &mut v);
        let before: Option<EventCursor> = pagination::decode_token(&r.page_token, &mut v);
        let event_type = r.event_type.trim();
        v.check(
            event_type.len() <= MAX_EVENT_TYPE_NAME_LEN,
            "event_type",
            format!("at most {MAX_EVENT_TYPE_NAME_LEN} characters"),
        );
        let (start_time, end_time) = time_range(&r.start_time, &r.end_time, &mut v);
        v.into_result(()).map_err(WebhookError::from)?;
        let filter = EventFilter {
            event_type: (!event_type.is_empty()).then(|| event_type.to_string()),
            start_time,
            end_time,
        };
        let (events, next) = self
            .webhooks
            .events(
                principal,
                &filter,
                before.map(|c| (c.time, c.id)),
                page_size,
            )
            .await?;
        Ok(Response::new(v1::ListEventsResponse {
            events: events
                .iter()
                .map(|e| event_with_deliveries(&e.event, &e.deliveries))
                .collect(),
            next_page_token: next
                .map(|(time, id)| pagination::encode_token(&EventCursor { time, id }))
                .unwrap_or_default(),
        }))
    }

    async fn get_event(&self, req: Request<v1::GetEventRequest>) -> RpcResult<v1::Event> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksRead)?;
        let id = Uuid::parse_str(req.get_ref().id.trim()).map_err(|_| {
            WebhookError::Invalid(Violations::one("id", "not an event id (a UUID)"))
        })?;
        let logged = self.webhooks.event(principal, id).await?;
        Ok(Response::new(event_with_deliveries(
            &logged.event,
            &logged.deliveries,
        )))
    }

    async fn send_test_event(
        &self,
        req: Request<v1::SendTestEventRequest>,
    ) -> RpcResult<v1::WebhookDelivery> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksWrite)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let id = uuid_field(&r.id, "id", ENDPOINT_ID, &mut v);
        let event_type = r.event_type.trim();
        v.check(
            event_type.len() <= MAX_EVENT_TYPE_NAME_LEN,
            "event_type",
            format!("at most {MAX_EVENT_TYPE_NAME_LEN} characters"),
        );
        let id = v.into_result(id).map_err(WebhookError::from)?;
        let delivery = self
            .webhooks
            .send_test_event(
                principal,
                id.expect("valid when no violation"),
                (!event_type.is_empty()).then_some(event_type),
            )
            .await?;
        Ok(Response::new(delivery_to_proto(&delivery, &[])))
    }

    async fn recover_webhook_deliveries(
        &self,
        req: Request<v1::RecoverWebhookDeliveriesRequest>,
    ) -> RpcResult<v1::RecoverWebhookDeliveriesResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksWrite)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let id = uuid_field(&r.id, "id", ENDPOINT_ID, &mut v);
        let now = chrono::Utc::now();
        let since = match r.since.as_ref().map(from_timestamp) {
            None => {
                v.add(
                    "since",
                    "required: recover failed deliveries created since when",
                );
                None
            }
            Some(None) => {
                v.add("since", "not a valid timestamp");
                None
            }
            Some(Some(t)) if t > now + SINCE_SLACK => {
                v.add("since", "must not be in the future");
                None
            }
            Some(Some(t)) if now - t > MAX_RECOVER_WINDOW + SINCE_SLACK => {
                v.add(
                    "since",
                    format!("at most {} days ago", MAX_RECOVER_WINDOW.num_days()),
                );
                None
            }
            Some(Some(t)) => Some(t),
        };
        let (id, since) = v.into_result((id, since)).map_err(WebhookError::from)?;
        let recovered = self
            .webhooks
            .recover(
                principal,
                id.expect("valid when no violation"),
                since.expect("valid when no violation"),
            )
            .await?;
        Ok(Response::new(v1::RecoverWebhookDeliveriesResponse {
            recovered: i32::try_from(recovered).unwrap_or(i32::MAX),
        }))
    }

    async fn list_webhook_deliveries(
        &self,
        req: Request<v1::ListWebhookDeliveriesRequest>,
    ) -> RpcResult<v1::ListWebhookDeliveriesResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksRead)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let id = uuid_field(&r.webhook_id, "webhook_id", ENDPOINT_ID, &mut v);
        let page_size = pagination::page_size(r.page_size, &mut v);
        let before: Option<DeliveryCursor> = pagination::decode_token(&r.page_token, &mut v);
        let status = match v1::WebhookDeliveryStatus::try_from(r.status) {
            Ok(v1::WebhookDeliveryStatus::Unspecified) => None,
            Ok(v1::WebhookDeliveryStatus::Pending) => Some(DeliveryStatus::Pending),
            Ok(v1::WebhookDeliveryStatus::Succeeded) => Some(DeliveryStatus::Succeeded),
            Ok(v1::WebhookDeliveryStatus::Failed) => Some(DeliveryStatus::Failed),
            Err(_) => {
                v.add("status", format!("unknown status {}", r.status));
                None
            }
        };
        let event_type = r.event_type.trim();
        v.check(
            event_type.len() <= MAX_EVENT_TYPE_NAME_LEN,
            "event_type",
            format!("at most {MAX_EVENT_TYPE_NAME_LEN} characters"),
        );
        let (start_time, end_time) = time_range(&r.start_time, &r.end_time, &mut v);
        let id = v.into_result(id).map_err(WebhookError::from)?;
        let filter = DeliveryFilter {
            status,
            event_type: (!event_type.is_empty()).then(|| event_type.to_string()),
            start_time,
            end_time,
        };
        let page = self
            .webhooks
            .deliveries(
                principal,
                id.expect("valid when no violation"),
                &filter,
                before.map(|c| c.before),
                page_size,
            )
            .await?;
        Ok(Response::new(v1::ListWebhookDeliveriesResponse {
            deliveries: page
                .deliveries
                .iter()
                .map(|d| delivery_to_proto(d, &[]))
                .collect(),
            next_page_token: page
                .next
                .map(|before| pagination::encode_token(&DeliveryCursor { before }))
                .unwrap_or_default(),
        }))
    }

    async fn get_webhook_delivery(
        &self,
        req: Request<v1::GetWebhookDeliveryRequest>,
    ) -> RpcResult<v1::WebhookDelivery> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksRead)?;
        let (webhook_id, id) = delivery_ids(&req.get_ref().webhook_id, &req.get_ref().id)?;
        let (delivery, attempts) = self.webhooks.delivery(principal, webhook_id, id).await?;
        Ok(Response::new(delivery_to_proto(&delivery, &attempts)))
    }

    async fn retry_webhook_delivery(
        &self,
        req: Request<v1::RetryWebhookDeliveryRequest>,
    ) -> RpcResult<v1::WebhookDelivery> {
        let principal = principal(&req)?;
        authorize(principal, Scope::WebhooksWrite)?;
        let (webhook_id, id) = delivery_ids(&req.get_ref().webhook_id, &req.get_ref().id)?;
        let delivery = self.webhooks.retry(principal, webhook_id, id).await?;
        Ok(Response::new(delivery_to_proto(&delivery, &[])))
    }
}

/// `devgate.internal.v1.WebhookService`: events from the platform's services. The auth
/// layer has already checked the caller's service token and that it may call the RPC.
#[tonic::async_trait]
impl InternalWebhookService for WebhookGrpc {
    async fn publish_event(
        &self,
        req: Request<internal::PublishEventRequest>,
    ) -> RpcResult<internal::PublishEventResponse> {
        let principal = principal(&req)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let tenant = r.tenant_id.trim().parse::<TenantId>().ok();
        v.check(tenant.is_some(), "tenant_id", "required: the tenant's UUID");
        let event_type = r.event_type.trim();
        let event_type = if event_type.is_empty() {
            v.add("event_type", "required: a type of the event catalog");
            None
        } else if event_type.len() > MAX_EVENT_TYPE_NAME_LEN {
            v.add(
                "event_type",
                format!("at most {MAX_EVENT_TYPE_NAME_LEN} characters"),
            );
            None
        } else {
            Some(event_type.to_string())
        };
        let idempotency_id = ((1..=MAX_IDEMPOTENCY_ID_CHARS)
            .contains(&r.idempotency_id.chars().count())
            && !r.idempotency_id.chars().any(char::is_control))
        .then(|| r.idempotency_id.clone());
        v.check(
            idempotency_id.is_some(),
            "idempotency_id",
            format!("required: 1 to {MAX_IDEMPOTENCY_ID_CHARS} characters, no control characters"),
        );
        let payload = match &r.payload {
            None => {
                v.add("payload", "required: an object");
                None
            }
            Some(p) if p.encoded_len() > MAX_PAYLOAD_BYTES => {
                v.add(
                    "payload",
                    format!("at most {} KiB encoded", MAX_PAYLOAD_BYTES / 1024),
                );
                None
            }
            Some(p) => struct_to_json(p, PAYLOAD_FIELD, &mut v),
        };
        // Without a usable payload the schema check would only add noise.
        let publish = Publish {
            tenant,
            event_type: event_type.filter(|_| payload.is_some()),
            payload: payload.unwrap_or(serde_json::Value::Null),
            idempotency_id,
        };
        let (event, duplicate) = self.webhooks.publish(principal, publish, v).await?;
        Ok(Response::new(internal::PublishEventResponse {
            event: Some(event_to_proto(&event)),
            duplicate,
        }))
    }
}

impl WebhookGrpc {
    /// The changes the mask names; with no mask, every field set to a non-empty value
    /// (a rate limit of 0 cannot be set that way: name it in the mask).
    async fn changes(
        &self,
        patch: &v1::WebhookEndpoint,
        mask: Option<&prost_types::FieldMask>,
    ) -> Result<EndpointChanges, Status> {
        const UPDATABLE: [&str; 5] = [
            "url",
            "description",
            "event_types",
            "headers",
            "rate_limit_per_second",
        ];
        let mut v = Violations::new();
        let present = [
            !patch.url.is_empty(),
            !patch.description.is_empty(),
            !patch.event_types.is_empty(),
            !patch.headers.is_empty(),
            patch.rate_limit_per_second != 0,
        ];
        let named = crate::validation::update_paths(mask, &UPDATABLE, &present, &mut v);
        let mut c = EndpointChanges::default();
        for path in named {
            let field = format!("webhook_endpoint.{path}");
            match path {
                "url" if patch.url.trim().is_empty() => v.add(&field, "required"),
                "url" => c.url = Some(self.webhooks.check_url(&patch.url, &field, &mut v).await),
                "description" => {
                    c.description = Some(model::validate_description(
                        &patch.description,
                        &field,
                        &mut v,
                    ))
                }
                "event_types" => {
                    let types =
                        model::validate_event_types_shape(&patch.event_types, &field, &mut v);
                    if !types.is_empty() {
                        self.webhooks.check_patterns(&types, &field, &mut v).await?;
                    }
                    c.event_types = Some(types);
                }
                "headers" => {
                    c.headers = Some(model::validate_headers(&patch.headers, &field, &mut v))
                }
                "rate_limit_per_second" => {
                    c.rate_limit_per_second = Some(model::validate_rate_limit(
                        patch.rate_limit_per_second,
                        &field,
                        &mut v,
                    ))
                }
                _ => {} // update_paths returns only the names above
            }
        }
        v.into_result(c)
            .map_err(|v| WebhookError::Invalid(v).into())
    }
}

/// The keyset position of an endpoint listing: ids below this one come next.
#[derive(serde::Serialize, serde::Deserialize)]
struct EndpointCursor {
    before: Uuid,
}

/// The keyset position of an event listing: events older than (time, id) come next.
#[derive(serde::Serialize, serde::Deserialize)]
struct EventCursor {
    time: chrono::DateTime<chrono::Utc>,
    id: Uuid,
}

/// The keyset position of a delivery listing: ids below this one come next.
#[derive(serde::Serialize, serde::Deserialize)]
struct DeliveryCursor {
    before: Uuid,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct EventTypeCursor {
    after: String,
}

/// The tenant and scope check the service repeats, done before any validation.
fn authorize(principal: &Principal, scope: Scope) -> Result<(), Status> {
    principal
        .tenant_with(scope)
        .map(drop)
        .map_err(|e| WebhookError::from(e).into())
}

/// Endpoint ids are UUIDs; anything else is a bad request, not a missing endpoint.
fn endpoint_id(raw: &str, field: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(raw.trim())
        .map_err(|_| WebhookError::Invalid(Violations::one(field, ENDPOINT_ID)).into())
}

/// A UUID field, or its violation.
fn uuid_field(raw: &str, field: &str, description: &str, v: &mut Violations) -> Option<Uuid> {
    let id = Uuid::parse_str(raw.trim()).ok();
    v.check(id.is_some(), field, description);
    id
}

/// The (webhook_id, id) of a delivery request, both checked in one answer.
fn delivery_ids(webhook_id: &str, id: &str) -> Result<(Uuid, Uuid), Status> {
    let mut v = Violations::new();
    let webhook_id = uuid_field(webhook_id, "webhook_id", ENDPOINT_ID, &mut v);
    let id = uuid_field(id, "id", "not a webhook delivery id (a UUID)", &mut v);
    let ids = v
        .into_result(webhook_id.zip(id))
        .map_err(WebhookError::from)?;
    Ok(ids.expect("both valid when no violation"))
}

/// `start_time` (inclusive) and `end_time` (exclusive) of a listing: valid timestamps,
/// in order, at most [`MAX_EVENT_WINDOW`] apart.
fn time_range(
    start: &Option<prost_types::Timestamp>,
    end: &Option<prost_types::Timestamp>,
    v: &mut Violations,
) -> (
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
) {
    let mut time = |t: &Option<prost_types::Timestamp>, field: &str| {
        let parsed = t.as_ref().map(from_timestamp);
        if let Some(None) = parsed {
            v.add(field, "not a valid timestamp");
        }
        parsed.flatten()
    };
    let start_time = time(start, "start_time");
    let end_time = time(end, "end_time");
    if let (Some(start), Some(end)) = (start_time, end_time) {
        v.check(start < end, "end_time", "must be after start_time");
        v.check(
            end - start <= MAX_EVENT_WINDOW,
            "end_time",
            format!(
                "at most {} days after start_time",
                MAX_EVENT_WINDOW.num_days()
            ),
        );
    }
    (start_time, end_time)
}

pub fn to_proto(e: &WebhookEndpoint) -> v1::WebhookEndpoint {
    let now = chrono::Utc::now();
    v1::WebhookEndpoint {
        id: e.id.to_string(),
        url: e.url.clone(),
        description: e.description.clone(),
        event_types: e.event_types.clone(),
        headers: e
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        rate_limit_per_second: e.rate_limit_per_second,
        state: match e.state() {
            EndpointState::Enabled => v1::WebhookEndpointState::Enabled,
            EndpointState::Disabled => v1::WebhookEndpointState::Disabled,
        } as i32,
        disabled_reason: e.disabled_reason.clone().unwrap_or_default(),
        disable_time: opt_timestamp(e.disabled_time),
        consecutive_failures: e.consecutive_failures,
        previous_secret_expire_time: opt_timestamp(e.live_previous_secret_expire_time(now)),
        created_by: e.created_by.clone(),
        create_time: Some(timestamp(e.create_time)),
        update_time: Some(timestamp(e.update_time)),
    }
}

fn event_type_to_proto(t: &EventType) -> v1::EventType {
    v1::EventType {
        name: t.name.clone(),
        category: t.category.clone(),
        description: t.description.clone(),
        schema: json_to_struct(&t.schema),
        sample: json_to_struct(&t.sample),
        version: t.version,
        deprecated: t.deprecated,
        create_time: Some(timestamp(t.create_time)),
    }
}

pub fn event_to_proto(e: &Event) -> v1::Event {
    event_with_deliveries(e, &[])
}

/// An event of the log with the state of its delivery to each endpoint.
fn event_with_deliveries(e: &Event, deliveries: &[Delivery]) -> v1::Event {
    v1::Event {
        id: e.id.to_string(),
        event_type: e.event_type.clone(),
        payload: json_to_struct(&e.payload),
        source: e.source.clone(),
        idempotency_id: e.idempotency_id.clone().unwrap_or_default(),
        create_time: Some(timestamp(e.create_time)),
        deliveries: deliveries
            .iter()
            .map(|d| v1::EventDelivery {
                webhook_id: d.endpoint_id.to_string(),
                delivery_id: d.id.to_string(),
                status: status_to_proto(d.status) as i32,
                attempts: d.attempts,
                last_attempt_time: opt_timestamp(d.last_attempt_time),
            })
            .collect(),
    }
}

fn status_to_proto(s: DeliveryStatus) -> v1::WebhookDeliveryStatus {
    match s {
        DeliveryStatus::Pending => v1::WebhookDeliveryStatus::Pending,
        DeliveryStatus::Succeeded => v1::WebhookDeliveryStatus::Succeeded,
        DeliveryStatus::Failed => v1::WebhookDeliveryStatus::Failed,
    }
}

/// A delivery, with its attempt log when `attempts` holds it (GetWebhookDelivery only).
fn delivery_to_proto(d: &Delivery, attempts: &[Attempt]) -> v1::WebhookDelivery {
    v1::WebhookDelivery {
        id: d.id.to_string(),
        webhook_id: d.endpoint_id.to_string(),
        event_id: d.event_id.to_string(),
        event_type: d.event_type.clone(),
        status: status_to_proto(d.status) as i32,
        attempts: d.attempts,
        next_attempt_time: opt_timestamp(
            d.next_attempt_time
                .filter(|_| d.status == DeliveryStatus::Pending),
        ),
        last_attempt_time: opt_timestamp(d.last_attempt_time),
        last_status_code: d.last_status_code.unwrap_or(0),
        last_error: d.last_error.clone().unwrap_or_default(),
        create_time: Some(timestamp(d.create_time)),
        update_time: Some(timestamp(d.update_time)),
        attempt_log: attempts.iter().map(attempt_to_proto).collect(),
    }
}

fn attempt_to_proto(a: &Attempt) -> v1::WebhookAttempt {
    v1::WebhookAttempt {
        attempt: a.attempt,
        attempt_time: Some(timestamp(a.attempt_time)),
        url: a.url.clone(),
        status_code: a.status_code.unwrap_or(0),
        response_headers: a.response_headers.iter().cloned().collect(),
        response_body: a.response_body.clone(),
        latency_ms: a.latency_ms,
        error_kind: a.error_kind.map(|k| k.as_str()).unwrap_or_default().into(),
        error_message: a.error_message.clone().unwrap_or_default(),
        trigger: if a.manual { "manual" } else { "scheduled" }.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_uuids() {
        assert!(endpoint_id("018f3a2b-7c4d-7e5f-8a9b-0c1d2e3f4a5b", "id").is_ok());
        let status = endpoint_id("we_123", "id").unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
