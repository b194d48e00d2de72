//! The Rust client of a Ferry region, used by the sidecar, edge, `ferry ctl` and `ferry bench`.
//!
//! What is here: [`Client`] connects over QUIC with mTLS to any node of a region and offers
//! topics, fetch, subscriptions ([`Subscription`]), consumer groups ([`GroupConsumer`]) and
//! domain streams with optimistic concurrency ([`Client::append_to_stream`]); [`Producer`]
//! batches and pipelines publishes per partition with an idempotent producer id, bounded by
//! an in-flight window, and retries through leader changes with the same sequences, so
//! retries never duplicate.
//!
//! What is not here: HTTP, routing between regions.
#![warn(missing_docs, unreachable_pub)]

mod client;
mod consumer;
mod error;
mod producer;
mod subscription;

pub use client::{Client, ClientOptions, StreamAppend};
pub use consumer::{ConsumerOptions, Delivery, GroupConsumer};
pub use error::ClientError;
pub use ferry_proto::wire::StartFrom;
pub use ferry_proto::StreamEvent;
pub use producer::{AckFuture, Producer, ProducerOptions, PublishAck, MAX_BATCHES_IN_FLIGHT};
pub use subscription::Subscription;
