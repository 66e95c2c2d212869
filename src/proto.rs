//! Code generated from `proto/` by build.rs, and the descriptor set that reflection and
//! Envoy's JSON transcoder read.

pub mod json;

/// `devgate.v1`: the public API (through Envoy, and gRPC on the public listener).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("devgate.v1");
}

/// `devgate.internal.v1`: the RPCs of the platform's own services, registered only on the
/// internal listener, each caller authenticated by a service token.
pub mod internal {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("devgate.internal.v1");
    }
}

/// The contracts of the platform services devgate is a client of (`proto/upstream/`), with
/// server code too: the simulator (examples/upstream_sim.rs) serves them. Not part of
/// [`FILE_DESCRIPTOR_SET`]: Envoy and devgate's reflection never expose them.
pub mod upstream {
    /// `upstream.orchestrator.v1`: the job, cancel and update messages exchanged with the AI
    /// orchestrator over RabbitMQ; [`orchestrator::v1::routing`] holds the names they travel by.
    pub mod orchestrator {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("upstream.orchestrator.v1");

            /// How the orchestrator messages travel (see the comment at the top of
            /// proto/upstream/orchestrator/v1/orchestrator.proto).
            pub mod routing {
                /// The `content_type` property of every orchestrator message.
                pub const CONTENT_TYPE: &str = "application/x-protobuf";
                /// Routing key of a [`GenerationJob`](super::GenerationJob) on the jobs exchange.
                pub const JOB_ROUTING_KEY: &str = "generation.requested";
                /// Routing key of a [`GenerationCancel`](super::GenerationCancel) on the jobs
                /// exchange.
                pub const CANCEL_ROUTING_KEY: &str = "generation.cancel";

                /// The default jobs exchange (topic) of a RabbitMQ prefix
                /// (`DEVGATE_GENERATION_JOBS_EXCHANGE` when unset).
                pub fn default_jobs_exchange(prefix: &str) -> String {
                    format!("{prefix}.generation.jobs")
                }

                /// devgate's queue of [`GenerationUpdate`](super::GenerationUpdate)s under a
                /// RabbitMQ prefix (what `Mq::queue_name("generation.updates")` names).
                pub fn updates_queue(prefix: &str) -> String {
                    format!("{prefix}.generation.updates")
                }
            }
        }
    }

    /// `upstream.assets.v1`: the Asset service.
    pub mod assets {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("upstream.assets.v1");
        }
    }

    /// `upstream.users.v1`: the User/Team service.
    pub mod users {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("upstream.users.v1");
        }
    }

    /// The upstream files with their imports: the simulator's reflection serves it, so
    /// grpcurl can call the simulator directly.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("upstream_descriptor");
}

/// Every file of the API with its imports (google/api, google/rpc error details, well-known
/// types): `devgate descriptor` writes it for Envoy, reflection serves it to grpcurl.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("devgate_descriptor");

/// Conversions between protobuf well-known types and chrono / std.
pub mod convert {
    use chrono::{DateTime, Utc};

    pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: t.timestamp_subsec_nanos() as i32,
        }
    }

    pub fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
        t.map(timestamp)
    }

    /// `None` for timestamps outside chrono's range or with invalid nanos.
    pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
        u32::try_from(t.nanos)
            .ok()
            .filter(|n| *n < 1_000_000_000)
            .and_then(|n| DateTime::from_timestamp(t.seconds, n))
    }

    /// `None` for negative durations.
    pub fn from_duration(d: &prost_types::Duration) -> Option<std::time::Duration> {
        let secs = u64::try_from(d.seconds).ok()?;
        let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
        Some(std::time::Duration::new(secs, nanos))
    }
}
