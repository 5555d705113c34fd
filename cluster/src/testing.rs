//! A real etcd for tests: started on free loopback ports in a temp dir (again on fresh ones
//! if another process took them first), killed on drop.
//! The binary is `PM_ETCD_BIN`, else `/usr/bin/etcd` (Debian's etcd-server, which
//! `scripts/setup.sh --test` installs).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::metadata::{Error, Expect, KeyValue, MetadataStore};

pub struct Etcd {
    child: Child,
    pub endpoint: String,
    data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub fn etcd_binary() -> PathBuf {
    std::env::var_os("PM_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// The member name every test etcd has (a restored snapshot must name it too).
pub const MEMBER: &str = "test";

impl Etcd {
    /// Starts etcd in a temp dir and waits until it answers (at most 20 s). Ports picked
    /// free can be taken by another test before etcd binds them (etcd then exits): it
    /// starts again on fresh ones, at most 5 times.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("etcd");
        for _ in 0..5 {
            match Self::try_start_on(&data_dir, free_port(), free_port()) {
                Ok(mut etcd) => {
                    etcd._dir = Some(dir);
                    return etcd;
                }
                Err(exited) => {
                    eprintln!("etcd exited at start ({exited}), likely a port taken: again");
                    // What it wrote belongs to a member on the old peer URL.
                    let _ = std::fs::remove_dir_all(&data_dir);
                }
            }
        }
        panic!("etcd exited at start 5 times");
    }

    /// Starts etcd on `data_dir` (made if missing, kept after), member [`MEMBER`] with the
    /// peer URL `http://127.0.0.1:{peer}`, and waits until it answers (at most 20 s).
    pub fn start_on(data_dir: &Path, client: u16, peer: u16) -> Self {
        Self::try_start_on(data_dir, client, peer)
            .unwrap_or_else(|exited| panic!("etcd exited at start: {exited}"))
    }

    /// [`Etcd::start_on`], or how etcd exited before it answered.
    fn try_start_on(
        data_dir: &Path,
        client: u16,
        peer: u16,
    ) -> Result<Self, std::process::ExitStatus> {
        let bin = etcd_binary();
        assert!(
            bin.exists(),
            "no etcd at {}: run ./scripts/setup.sh --test or set PM_ETCD_BIN",
            bin.display()
        );
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(&bin)
            .arg(format!("--name={MEMBER}"))
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={MEMBER}={peer_url}"))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut etcd = Self {
            child,
            endpoint,
            data_dir: data_dir.to_owned(),
            _dir: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let health = format!("127.0.0.1:{client}");
        loop {
            if let Ok(Some(exited)) = etcd.child.try_wait() {
                return Err(exited);
            }
            if std::net::TcpStream::connect(&health).is_ok() && etcd.answers_as(&peer_url) {
                return Ok(etcd);
            }
            assert!(Instant::now() < deadline, "etcd did not start in 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the etcd at the endpoint is this one, the member on `peer_url` (not another
    /// test's that took the port first). Asks on a thread of its own, so callers may be async.
    fn answers_as(&self, peer_url: &str) -> bool {
        let endpoint = self.endpoint.clone();
        let peer_url = peer_url.to_owned();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let Ok(mut c) = crate::etcd::connect(&[endpoint]).await else {
                    return false;
                };
                if c.status().await.is_err() {
                    return false;
                }
                c.member_list().await.is_ok_and(|list| {
                    list.members()
                        .iter()
                        .any(|m| m.peer_urls().contains(&peer_url))
                })
            })
        })
        .join()
        .unwrap_or(false)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What every [`MetadataStore`] must do, on an empty store. Leaves `/a/1` = "uno" at the
/// returned revision and `/b/1`, with `/a/2` deleted.
pub async fn check_store_contract(store: &dyn MetadataStore) -> u64 {
    let r1 = store
        .put("/a/1", b"one".to_vec(), Expect::Absent)
        .await
        .unwrap();
    assert!(matches!(
        store.put("/a/1", b"again".to_vec(), Expect::Absent).await,
        Err(Error::Conflict { .. })
    ));
    let r2 = store
        .put("/a/1", b"uno".to_vec(), Expect::Revision(r1))
        .await
        .unwrap();
    assert!(r2 > r1);
    match store.put("/a/1", b"x".to_vec(), Expect::Revision(r1)).await {
        Err(Error::Conflict {
            expected, found, ..
        }) => assert_eq!((expected, found), (r1, r2)),
        other => panic!("a stale revision must conflict: {other:?}"),
    }
    store
        .put("/a/2", b"two".to_vec(), Expect::Any)
        .await
        .unwrap();
    store.put("/b/1", b"b".to_vec(), Expect::Any).await.unwrap();
    let keys = |kvs: Vec<KeyValue>| kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
    assert_eq!(
        keys(store.list("/a/", "", 10).await.unwrap()),
        ["/a/1", "/a/2"]
    );
    assert_eq!(keys(store.list("/a/", "/a/1", 10).await.unwrap()), ["/a/2"]);
    assert_eq!(keys(store.list("/a/", "", 1).await.unwrap()), ["/a/1"]);
    // Counted by prefix: `/a/` holds two, `/` all three, a prefix of nothing none.
    assert_eq!(store.count("/a/").await.unwrap(), 2);
    assert_eq!(store.count("/").await.unwrap(), 3);
    assert_eq!(store.count("/c/").await.unwrap(), 0);
    // A transaction's limit, each write with its compare, is taken (etcd's own limit is
    // the same); one write past it is refused as such, and nothing of it written.
    let many = |n: usize| {
        (0..n)
            .map(|i| (format!("/many/{i}"), Vec::new(), Expect::Absent))
            .collect::<Vec<_>>()
    };
    store
        .put_all(many(crate::metadata::MAX_PUT_ALL))
        .await
        .unwrap();
    for (key, _, _) in many(crate::metadata::MAX_PUT_ALL) {
        assert!(store.delete(&key, Expect::Any).await.unwrap());
    }
    assert!(matches!(
        store.put_all(many(crate::metadata::MAX_PUT_ALL + 1)).await,
        Err(Error::TooManyWrites { writes }) if writes == crate::metadata::MAX_PUT_ALL + 1
    ));
    assert_eq!(store.count("/many/").await.unwrap(), 0);
    let kv = store.get("/a/1").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (b"uno".as_slice(), r2)
    );
    assert!(matches!(
        store.delete("/a/1", Expect::Revision(r1)).await,
        Err(Error::Conflict { .. })
    ));
    assert!(store.delete("/a/2", Expect::Any).await.unwrap());
    assert!(!store.delete("/a/2", Expect::Any).await.unwrap());
    assert!(store.get("/a/2").await.unwrap().is_none());
    r2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port someone else holds: the etcd given it exits, and that is reported (for
    /// [`Etcd::start`] to try fresh ports), not taken for this etcd answering.
    #[test]
    fn an_etcd_whose_port_is_taken_is_reported_as_exited() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let started = Etcd::try_start_on(&dir.path().join("etcd"), port, free_port());
        assert!(started.is_err(), "took the held port for a started etcd");
    }
}
