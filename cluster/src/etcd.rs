//! [`EtcdStore`]: the metadata store of a cluster, in etcd. Conditional writes are etcd
//! transactions comparing the key's `create_revision` (absent) or `mod_revision`, so any
//! number of stateless tenant-service replicas create-if-absent and update versions
//! without lost updates.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};

use crate::metadata::{Error, Expect, KeyValue, MetadataStore, Result};

/// How long one etcd call may take before the caller gets UNAVAILABLE.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to etcd at `endpoints` (`http://host:port`, or `host:port`). The connection is
/// made lazily and re-made by the client; an unreachable etcd shows up as
/// [`Error::Unavailable`] on calls, not here.
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    Client::connect(endpoints, Some(options))
        .await
        .map_err(unavailable)
}

pub(crate) fn unavailable(e: etcd_client::Error) -> Error {
    Error::Unavailable(format!("etcd: {e}"))
}

/// The end of the key range holding every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: every key after the prefix.
    vec![0]
}

fn entry(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision() as u64,
    }
}

pub struct EtcdStore {
    client: Client,
}

impl EtcdStore {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        Ok(Self::new(connect(endpoints).await?))
    }

    /// The comparison that `expect` for `key` is in a transaction (none for `Any`).
    fn compare(key: &str, expect: Expect) -> Option<Compare> {
        match expect {
            Expect::Any => None,
            Expect::Absent => Some(Compare::create_revision(key, CompareOp::Equal, 0)),
            Expect::Revision(r) => Some(Compare::mod_revision(key, CompareOp::Equal, r as i64)),
        }
    }

    /// `op` if `expect` holds for `key`; otherwise a read of the key, to report what was found.
    fn conditional(key: &str, expect: Expect, op: TxnOp) -> Txn {
        let Some(compare) = Self::compare(key, expect) else {
            return Txn::new().and_then(vec![op]);
        };
        Txn::new()
            .when(vec![compare])
            .and_then(vec![op])
            .or_else(vec![TxnOp::get(key, None)])
    }

    async fn run(&self, key: &str, expect: Expect, op: TxnOp) -> Result<(u64, Vec<TxnOpResponse>)> {
        let txn = Self::conditional(key, expect, op);
        let response = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(unavailable)?;
        let revision = response.header().map(|h| h.revision() as u64).unwrap_or(0);
        if !response.succeeded() {
            let found = response
                .op_responses()
                .into_iter()
                .find_map(|r| match r {
                    TxnOpResponse::Get(get) => Some(
                        get.kvs()
                            .first()
                            .map(|kv| kv.mod_revision() as u64)
                            .unwrap_or(0),
                    ),
                    _ => None,
                })
                .unwrap_or(0);
            return Err(Error::Conflict {
                key: key.to_owned(),
                expected: match expect {
                    Expect::Revision(r) => r,
                    _ => 0,
                },
                found,
            });
        }
        Ok((revision, response.op_responses()))
    }
}

#[async_trait]
impl MetadataStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let response = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(unavailable)?;
        Ok(response.kvs().first().map(entry))
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64> {
        let op = TxnOp::put(key, value, None::<PutOptions>);
        Ok(self.run(key, expect, op).await?.0)
    }

    async fn put_all(&self, writes: Vec<(String, Vec<u8>, Expect)>) -> Result<u64> {
        // etcd would refuse it too, but as INVALID_ARGUMENT, which reads as unavailable here.
        crate::metadata::check_put_all(&writes)?;
        let compares = writes
            .iter()
            .filter_map(|(key, _, expect)| Self::compare(key, *expect))
            .collect::<Vec<_>>();
        let puts = writes
            .iter()
            .map(|(key, value, _)| TxnOp::put(key.as_str(), value.clone(), None::<PutOptions>))
            .collect::<Vec<_>>();
        // On failure, a read of every key, to say which expectation failed.
        let reads = writes
            .iter()
            .map(|(key, _, _)| TxnOp::get(key.as_str(), None))
            .collect::<Vec<_>>();
        let txn = Txn::new().when(compares).and_then(puts).or_else(reads);
        let response = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(unavailable)?;
        if response.succeeded() {
            return Ok(response.header().map(|h| h.revision() as u64).unwrap_or(0));
        }
        let found: Vec<Option<u64>> = response
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision() as u64),
                _ => None,
            })
            .collect();
        for ((key, _, expect), current) in writes.iter().zip(found) {
            crate::metadata::check(key, *expect, current)?;
        }
        // Changed between the transaction and its reads: still a conflict.
        Err(Error::Conflict {
            key: writes.first().map(|w| w.0.clone()).unwrap_or_default(),
            expected: 0,
            found: 0,
        })
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<bool> {
        let op = TxnOp::delete(key, None::<DeleteOptions>);
        let deleted = match self.run(key, expect, op).await {
            Ok((_, responses)) => responses.into_iter().any(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted() > 0,
                _ => false,
            }),
            Err(e) => return Err(e),
        };
        Ok(deleted)
    }

    async fn count(&self, prefix: &str) -> Result<u64> {
        let options = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_count_only();
        let response = self
            .client
            .kv_client()
            .get(prefix, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(response.count().max(0) as u64)
    }

    async fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<KeyValue>> {
        // Strictly after `start_after`: the smallest key above it is itself plus a NUL byte.
        let from = if start_after.is_empty() {
            prefix.as_bytes().to_vec()
        } else {
            let mut k = start_after.as_bytes().to_vec();
            k.push(0);
            k
        };
        let options = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_limit(limit.min(i64::MAX as usize) as i64);
        let response = self
            .client
            .kv_client()
            .get(from, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(response.kvs().iter().map(entry).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_prefixed_one() {
        assert_eq!(prefix_end("/pm/v1/shards/"), b"/pm/v1/shards0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
