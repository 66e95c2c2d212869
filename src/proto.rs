//! Code generated from `proto/` by build.rs, and the descriptor set that reflection and
//! Envoy's JSON transcoder read.

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
