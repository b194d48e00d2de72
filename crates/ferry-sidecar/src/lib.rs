//! Ferry's service sidecar (issue 7), in progress. A service talks to it on localhost with
//! Dapr's pub/sub HTTP API and CloudEvents 1.0; it keeps accepted publishes in a durable
//! outbox and delivers subscribed events to the app.
//!
//! What is here so far are the protocol pieces without I/O, each tested:
//! - [`cloudevent`]: the CloudEvent a Dapr publish request becomes (structured, binary and
//!   wrapped modes, `rawPayload`, `cloudevent.*`, `partitionKey` and `ttlInSeconds`
//!   metadata), with errors that name the attribute;
//! - [`route`]: subscription routing rules in a documented subset of CEL.
//!
//! Not here yet: the HTTP server, the outbox, subscription discovery and delivery, the event
//! store, `ferry sidecar` and its benchmark.
#![warn(missing_docs, unreachable_pub)]

pub mod cloudevent;
pub mod route;
