//! The file pool behind the controller's async [`VolumeProvider`]: its synchronous, fsync-ordered
//! code runs unchanged on the blocking pool. Listing pages cost O(page): a listing reads the
//! directory of records once, keeps the sorted ids, and each page reads only its own records.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{is_volume_id, round_size, FilePool};
use crate::storage::contract::{FormatGrant, PublishContext};
use crate::storage::provider::{Features, Page, Segments, VolumeProvider};
use crate::storage::{
    Attachment, BlockStorage, Capacity, Error, GroupSnapshot, Health, NewVolume, Provisioning,
    Result, Snapshot, Volume,
};
use crate::TOPOLOGY_KEY;

/// Everything the file pool serves.
pub const FEATURES: Features = Features {
    publish: true,
    list_volumes: true,
    capacity: true,
    get_volume: true,
    snapshots: true,
    list_snapshots: true,
    clone: true,
    expand: true,
    modify: true,
    group_snapshots: true,
    topology: true,
};

/// How many listings in progress keep their id lists, and for how long. A token whose list
/// was dropped still works: its next page reads the directory again and goes on after the
/// token's id, so only the cost changes, never the answer.
const KEPT_LISTINGS: usize = 8;
const LISTING_TTL: Duration = Duration::from_secs(600);

/// Page tokens: `<listing>.<last id>`. Ids are ordered, so whatever is created or deleted
/// between pages, an entry that existed for the whole listing is neither skipped nor repeated.
const TOKEN_SEP: char = '.';

pub struct FilePoolProvider {
    pool: Arc<FilePool>,
    listings: Mutex<Listings>,
}

#[derive(Default)]
struct Listings {
    next: u64,
    kept: VecDeque<Listing>,
}

struct Listing {
    id: u64,
    /// "v" for volumes, "s" for snapshots: a token of one cannot continue the other.
    kind: char,
    ids: Arc<Vec<String>>,
    made: Instant,
}

impl FilePoolProvider {
    pub fn new(pool: Arc<FilePool>) -> FilePoolProvider {
        FilePoolProvider {
            pool,
            listings: Mutex::new(Listings::default()),
        }
    }

    pub fn pool(&self) -> &Arc<FilePool> {
        &self.pool
    }

    /// Runs the pool's synchronous code on the blocking pool.
    async fn blocking<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&FilePool) -> Result<T> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || work(&pool))
            .await
            .map_err(|e| Error::Unavailable(format!("pool worker failed: {e}")))?
    }

    /// The ids of the listing a token continues (read anew when the token's list is gone) and
    /// the id to continue after.
    async fn listing(
        &self,
        kind: char,
        token: &str,
        read: fn(&FilePool) -> Result<Vec<String>>,
    ) -> Result<(u64, Arc<Vec<String>>, Option<String>)> {
        let (listing, after) = if token.is_empty() {
            (None, None)
        } else {
            let bad = || {
                Error::InvalidToken(format!(
                    "starting_token {token:?} was not issued by this driver"
                ))
            };
            let (head, after) = token.split_once(TOKEN_SEP).ok_or_else(bad)?;
            let number = head
                .strip_prefix(kind)
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(bad)?;
            let valid = if kind == 'v' {
                is_volume_id(after)
            } else {
                super::is_snapshot_id(after)
            };
            if !valid {
                return Err(bad());
            }
            (Some(number), Some(after.to_string()))
        };
        if let Some(n) = listing {
            let mut l = self.listings.lock().unwrap_or_else(|e| e.into_inner());
            l.kept.retain(|x| x.made.elapsed() < LISTING_TTL);
            if let Some(x) = l.kept.iter().find(|x| x.id == n && x.kind == kind) {
                return Ok((n, x.ids.clone(), after));
            }
        }
        let ids = Arc::new(self.blocking(read).await?);
        let mut l = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        let n = listing.unwrap_or_else(|| {
            l.next += 1;
            l.next
        });
        if l.kept.len() >= KEPT_LISTINGS {
            l.kept.pop_front();
        }
        l.kept.push_back(Listing {
            id: n,
            kind,
            ids: ids.clone(),
            made: Instant::now(),
        });
        Ok((n, ids, after))
    }

    /// Reads the records of one page: ids after `after`, up to `max` present ones (0 = all).
    async fn page<T, F>(
        &self,
        kind: char,
        token: &str,
        max: usize,
        read_ids: fn(&FilePool) -> Result<Vec<String>>,
        load: F,
    ) -> Result<Page<T>>
    where
        T: Send + 'static,
        F: Fn(&FilePool, &str) -> Result<Option<T>> + Send + Sync + 'static,
    {
        let (listing, ids, after) = self.listing(kind, token, read_ids).await?;
        let start = after
            .as_deref()
            .map_or(0, |a| ids.partition_point(|x| x.as_str() <= a));
        let limit = if max == 0 { usize::MAX } else { max };
        let (entries, last, more) = self
            .blocking(move |pool| {
                let mut out = Vec::new();
                let mut last = None;
                let mut at = start;
                while at < ids.len() && out.len() < limit {
                    // Deleted since the listing began: simply gone.
                    if let Some(item) = load(pool, &ids[at])? {
                        out.push(item);
                        last = Some(ids[at].clone());
                    }
                    at += 1;
                }
                Ok((out, last, at < ids.len()))
            })
            .await?;
        let next_token = match (more, last) {
            (true, Some(last)) => format!("{kind}{listing}{TOKEN_SEP}{last}"),
            _ => String::new(),
        };
        Ok(Page {
            entries,
            next_token,
        })
    }
}

#[tonic::async_trait]
impl VolumeProvider for FilePoolProvider {
    fn features(&self) -> Features {
        FEATURES
    }

    fn topology(&self) -> Option<Segments> {
        Some(Segments::from([(
            TOPOLOGY_KEY.to_string(),
            self.pool.pool_id().to_string(),
        )]))
    }

    fn topology_of(&self, _volume: &Volume) -> Vec<Segments> {
        self.topology().into_iter().collect()
    }

    fn is_volume_id(&self, s: &str) -> bool {
        is_volume_id(s)
    }

    async fn ready(&self) -> Result<()> {
        // One statvfs, answered from the pool's mount: cheaper inline than a hop to the
        // blocking pool, and Probe is called often.
        self.pool.capacity().map(|_| ())
    }

    async fn create_volume(&self, req: NewVolume) -> Result<Volume> {
        self.blocking(move |p| p.create_volume(&req)).await
    }

    async fn delete_volume(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.blocking(move |p| p.delete_volume(&id)).await
    }

    async fn volume(&self, id: &str) -> Result<Volume> {
        let id = id.to_string();
        self.blocking(move |p| p.volume(&id)).await
    }

    async fn health(&self, volume: &Volume) -> Health {
        let v = volume.clone();
        self.blocking(move |p| Ok(p.health(&v)))
            .await
            .unwrap_or_else(|e| Health {
                abnormal: true,
                message: e.to_string(),
            })
    }

    async fn list_volumes(&self, token: &str, max_entries: usize) -> Result<Page<Volume>> {
        self.page('v', token, max_entries, FilePool::volume_ids, |p, id| {
            p.volume_if_any(id)
        })
        .await
    }

    async fn publish(
        &self,
        id: &str,
        node: &str,
        attachment: Attachment,
    ) -> Result<PublishContext> {
        let (id, node) = (id.to_string(), node.to_string());
        let volume = self
            .blocking(move |p| p.attach(&id, &node, &attachment))
            .await?;
        // Every node reads the pool's shared records through its ledger, which remembers the
        // volume's whole history: the grant adds nothing there, so it is always `Allowed`.
        Ok(PublishContext {
            device: Some(format!("volumes/{}.img", volume.id)),
            format: FormatGrant::Allowed,
        })
    }

    async fn unpublish(&self, id: &str, node: &str) -> Result<()> {
        let (id, node) = (id.to_string(), node.to_string());
        self.blocking(move |p| {
            if !node.is_empty() {
                return p.detach(&id, &node);
            }
            // No node: every publication goes, as the spec allows.
            let volume = p.volume(&id)?;
            for n in volume.attachments.keys() {
                p.detach(&id, n)?;
            }
            Ok(())
        })
        .await
    }

    async fn expand(&self, id: &str, bytes: u64) -> Result<Volume> {
        let id = id.to_string();
        self.blocking(move |p| p.expand_volume(&id, bytes)).await
    }

    fn round_size(&self, required: u64, limit: u64, min: u64) -> Result<u64> {
        round_size(required, limit, min)
    }

    async fn set_provisioning(&self, id: &str, provisioning: Provisioning) -> Result<Volume> {
        let id = id.to_string();
        self.blocking(move |p| p.set_provisioning(&id, provisioning))
            .await
    }

    async fn capacity(&self) -> Result<Capacity> {
        self.blocking(|p| p.capacity()).await
    }

    async fn create_snapshot(&self, name: &str, source_volume_id: &str) -> Result<Snapshot> {
        let (name, source) = (name.to_string(), source_volume_id.to_string());
        self.blocking(move |p| p.create_snapshot(&name, &source))
            .await
    }

    async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.blocking(move |p| p.delete_snapshot(&id)).await
    }

    async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        let id = id.to_string();
        self.blocking(move |p| p.snapshot(&id)).await
    }

    async fn list_snapshots(
        &self,
        token: &str,
        max_entries: usize,
        source_volume_id: &str,
    ) -> Result<Page<Snapshot>> {
        let source = source_volume_id.to_string();
        self.page(
            's',
            token,
            max_entries,
            FilePool::snapshot_ids,
            move |p, id| {
                Ok(p.snapshot_if_any(id)?
                    .filter(|s| source.is_empty() || s.source_volume_id == source))
            },
        )
        .await
    }

    async fn create_group_snapshot(
        &self,
        name: &str,
        volume_ids: &[String],
    ) -> Result<GroupSnapshot> {
        let (name, ids) = (name.to_string(), volume_ids.to_vec());
        self.blocking(move |p| p.create_group_snapshot(&name, &ids))
            .await
    }

    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot> {
        let id = id.to_string();
        self.blocking(move |p| p.group_snapshot(&id)).await
    }

    async fn delete_group_snapshot(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.blocking(move |p| p.delete_group_snapshot(&id)).await
    }
}
