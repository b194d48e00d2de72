//! A subscription to one partition: a stream of committed events in offset order, served by
//! the partition's leader when it can be found. If the node serving it goes away, it resumes
//! on another node (the leader first) from the next offset.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use ferry_net::framing::{read_frame, write_frame};
use ferry_net::NetError;
use ferry_proto::wire::{ClientRequest, ClientResponse, StartFrom};
use ferry_proto::Event;

use crate::client::events_from;
use crate::{Client, ClientError};

/// How long opening a subscription looks for the partition's leader before it settles for
/// any replica.
const LEADER_LOOKUP: Duration = Duration::from_secs(1);

/// Events of one partition as they are committed.
pub struct Subscription {
    client: Client,
    topic: String,
    partition: u32,
    /// Next offset wanted (None until the first batch when starting from latest/earliest).
    cursor: Option<u64>,
    from: StartFrom,
    server: usize,
    recv: Option<quinn::RecvStream>,
    buffered: VecDeque<(u64, Event)>,
}

impl Subscription {
    pub(crate) async fn open(
        client: Client,
        topic: String,
        partition: u32,
        from: StartFrom,
    ) -> Result<Self, ClientError> {
        let mut s = Self {
            client,
            topic,
            partition,
            cursor: match from {
                StartFrom::Offset(o) => Some(o),
                _ => None,
            },
            from,
            server: 0,
            recv: None,
            buffered: VecDeque::new(),
        };
        s.connect().await?;
        Ok(s)
    }

    /// Opens the stream on the partition's leader, where committed events show first (a
    /// follower learns a commit with the leader's next message to it), else on the first
    /// server that serves it.
    async fn connect(&mut self) -> Result<(), ClientError> {
        let leader_deadline = tokio::time::Instant::now() + LEADER_LOOKUP;
        let leader = tokio::time::timeout_at(
            leader_deadline,
            self.client
                .leader_addr(&self.topic, self.partition, leader_deadline),
        )
        .await
        .ok()
        .and_then(Result::ok);
        let servers = self.client.servers().to_vec();
        let mut failures = Vec::new();
        let candidates: Vec<(Option<usize>, SocketAddr)> = leader
            .map(|addr| (None, addr))
            .into_iter()
            .chain((0..servers.len()).map(|i| {
                let index = (self.server + i) % servers.len();
                (Some(index), servers[index])
            }))
            .collect();
        for (index, addr) in candidates {
            let from = self.cursor.map_or(self.from, StartFrom::Offset);
            let request = ClientRequest::Subscribe {
                topic: self.topic.clone(),
                partition: self.partition,
                from,
            };
            let attempt = async {
                let connection = self.client.connection(addr).await?;
                let (mut send, recv) = connection
                    .open_bi()
                    .await
                    .map_err(|e| NetError::Closed(e.to_string()))?;
                write_frame(&mut send, self.client.encode(&request)?).await?;
                let _ = send.finish();
                Ok::<_, ClientError>(recv)
            };
            match attempt.await {
                Ok(recv) => {
                    tracing::debug!(topic = %self.topic, partition = self.partition, %addr, ?from, "subscribed");
                    if let Some(index) = index {
                        self.server = index;
                    }
                    self.recv = Some(recv);
                    return Ok(());
                }
                Err(e) => {
                    self.client.forget(addr).await;
                    failures.push(format!("{addr}: {e}"));
                }
            }
        }
        Err(ClientError::NoServer(failures.join("; ")))
    }

    /// The next event, waiting for it. Errors from the node (unknown topic) end the stream;
    /// lost connections are resumed elsewhere within `resume_for`.
    pub async fn next(&mut self) -> Result<(u64, Event), ClientError> {
        let resume_for = Duration::from_secs(30);
        let mut deadline = None;
        loop {
            if let Some(item) = self.buffered.pop_front() {
                return Ok(item);
            }
            let max = self.client.limits().max_frame;
            let frame = match self.recv.as_mut() {
                Some(recv) => read_frame(recv, max).await,
                None => Err(NetError::Closed("not connected".into())),
            };
            match frame {
                Ok(Some(frame)) => match self.client.decode(&frame)? {
                    ClientResponse::Batches { batches, .. } => {
                        let from = self.cursor.unwrap_or(0);
                        for (offset, event) in events_from(&batches, from)? {
                            self.cursor = Some(offset + 1);
                            self.buffered.push_back((offset, event));
                        }
                        deadline = None;
                    }
                    // This node cannot serve the partition (not a replica, shutting down):
                    // resume on another one.
                    ClientResponse::Error(e) if e.is_retriable() => {
                        tracing::debug!(error = %e, "subscription moves to another node");
                        self.recv = None;
                        self.server += 1;
                        let until = *deadline
                            .get_or_insert_with(|| tokio::time::Instant::now() + resume_for);
                        if tokio::time::Instant::now() > until {
                            return Err(ClientError::Api(e));
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let _ = self.connect().await;
                    }
                    ClientResponse::Error(e) => return Err(ClientError::Api(e)),
                    other => return Err(ClientError::Unexpected(format!("{other:?}"))),
                },
                Ok(None) | Err(_) => {
                    let until =
                        *deadline.get_or_insert_with(|| tokio::time::Instant::now() + resume_for);
                    if tokio::time::Instant::now() > until {
                        return Err(ClientError::Timeout(format!(
                            "resuming {}/{}",
                            self.topic, self.partition
                        )));
                    }
                    self.recv = None;
                    self.server += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = self.connect().await;
                }
            }
        }
    }

    /// The next offset this subscription will deliver, once known: the first buffered
    /// event's, or past everything received.
    pub fn position(&self) -> Option<u64> {
        match self.buffered.front() {
            Some((offset, _)) => Some(*offset),
            None => self.cursor,
        }
    }
}
