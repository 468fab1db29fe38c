//! Where the join keeps its requests' states ([`States`]): each request's [`Entry`] with the time it
//! comes due (a decision's maturity or window end, a waiting label's wait), by partition.
//!
//! - [`MemStates`]: in memory, for the pure join's tests and simulations.
//! - [`DiskStates`]: on local disk in an embedded LSM tree (fjall), so that the open decisions of a
//!   weeks-long window fit: memory is its block cache and write buffers, bounded by configuration
//!   whatever the number of requests. The changelog topic stays the source of truth; the store is a
//!   cache of it that lets a restart skip reading it again:
//!   - a batch's changes are kept apart in memory until its transaction commits ([`DiskStates::commit`]);
//!     a failed transaction drops them ([`DiskStates::discard`]), so the disk only ever holds committed
//!     state (as Kafka's KIP-892 proposes for Streams);
//!   - each commit also writes, atomically with the changes, the changelog offset per partition that the
//!     store reflects (its checkpoint): after a restart, a crash or a rebalance only the changelog's tail
//!     past it is read; a partition without a usable checkpoint is rebuilt from the whole changelog.
//!
//! Layout (three fjall keyspaces): `states`: partition (4 bytes) · request id → due (8) · Avro
//! `ScoreState`; `due`: partition · due · request id → nothing, the expiry order; `meta`: per partition
//! its checkpoint and the number of states.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use fjall::config::{CompressionPolicy, FilterPolicy, HashRatioPolicy, PartitioningPolicy, PinningPolicy};
use fjall::{CompressionType, Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::changelog;
use super::join::Entry;
use crate::codec::{Codec, Millis};
use crate::record::quality::QualitySpec;

/// A request's state and when it comes due.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub due: Millis,
    pub entry: Entry,
}

/// The join's storage.
pub trait States {
    /// The state of request `id` on `partition`, as the batch so far left it.
    fn get(&mut self, partition: i32, id: &str) -> Option<Stored>;
    /// Sets (Some) or forgets (None) the state of request `id` on `partition`.
    fn set(&mut self, partition: i32, id: &str, state: Option<Stored>);
    /// Up to `limit` states due at or before `now`, earliest first.
    fn due(&mut self, now: Millis, limit: usize) -> Vec<(i32, String, Stored)>;
    /// Reads ahead the states of `keys` (partition, request id) that a batch is about to get, in
    /// parallel where the storage gains by it. Nothing else changes.
    fn prefetch(&mut self, _keys: Vec<(i32, String)>) {}
    /// States held.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// States in memory.
#[derive(Debug, Default)]
pub struct MemStates {
    map: HashMap<(i32, String), Stored>,
    order: BTreeSet<(Millis, i32, String)>,
}

impl States for MemStates {
    fn get(&mut self, partition: i32, id: &str) -> Option<Stored> {
        self.map.get(&(partition, id.to_string())).cloned()
    }

    fn set(&mut self, partition: i32, id: &str, state: Option<Stored>) {
        let key = (partition, id.to_string());
        if let Some(old) = self.map.remove(&key) {
            self.order.remove(&(old.due, partition, key.1.clone()));
        }
        if let Some(state) = state {
            self.order.insert((state.due, partition, key.1.clone()));
            self.map.insert(key, state);
        }
    }

    fn due(&mut self, now: Millis, limit: usize) -> Vec<(i32, String, Stored)> {
        (self.order.iter())
            .take_while(|(due, _, _)| *due <= now)
            .take(limit)
            .map(|(_, p, id)| (*p, id.clone(), self.map[&(*p, id.clone())].clone()))
            .collect()
    }

    fn len(&self) -> u64 {
        self.map.len() as u64
    }
}

/// Where a partition's state on disk stands: the changelog offset it reflects (the next one to read)
/// and when that was written (wall clock, ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub offset: i64,
    pub written_at: Millis,
}

/// A state the current batch read or changed: the due of the state on disk (to move its index key) and
/// the state now. Reading keeps it too, so that the change that usually follows needs no second lookup.
#[derive(Debug)]
struct Pending {
    on_disk: Option<Millis>,
    state: Option<Stored>,
    changed: bool,
}

/// Settings of the store on disk.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub dir: PathBuf,
    /// Block cache, bytes.
    pub cache_bytes: u64,
    /// Memtables of all its partitions together, bytes.
    pub write_buffer_bytes: u64,
}

/// States on local disk (see the module docs).
pub struct DiskStates {
    db: Database,
    states: Keyspace,
    due: Keyspace,
    meta: Keyspace,
    /// Plain Avro for the entries (the store is local: no registry framing).
    codec: Codec,
    /// The partitions whose states are followed (due, len).
    assigned: Vec<i32>,
    /// States on disk per partition (assigned or not).
    counts: HashMap<i32, u64>,
    pending: HashMap<(i32, String), Pending>,
    /// States the pending changes add (or, negative, remove) on assigned partitions.
    delta: i64,
    /// Per partition, a due time below which no state is left: the expiry scan starts there. The index
    /// keys of expired states are deleted, and an LSM tree keeps their tombstones until compaction: a
    /// scan from the start would walk over all of them at every tick.
    floor: HashMap<i32, Millis>,
    /// Held so that a second process cannot open the same store.
    _lock: File,
}

impl std::fmt::Debug for DiskStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStates").field("assigned", &self.assigned).field("counts", &self.counts).finish()
    }
}

/// How a request id is kept in keys: a canonical UUID (lower-case, with dashes) or 32 lower-case hex
/// digits as their 16 bytes, any other id as it is — a request id is in two keys per state, and text
/// UUIDs would be most of the store.
fn packed_id(id: &str, key: &mut Vec<u8>) {
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    let bytes = id.as_bytes();
    let uuid = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, &b)| if [8, 13, 18, 23].contains(&i) { b == b'-' } else { hex(b) });
    if !(uuid || bytes.len() == 32 && bytes.iter().all(|&b| hex(b))) {
        key.push(ID_TEXT);
        return key.extend_from_slice(bytes);
    }
    key.push(if uuid { ID_UUID } else { ID_HEX });
    let nibble = |b: u8| if b.is_ascii_digit() { b - b'0' } else { b - b'a' + 10 };
    let digits: Vec<u8> = bytes.iter().filter(|&&b| b != b'-').map(|&b| nibble(b)).collect();
    key.extend(digits.chunks(2).map(|pair| pair[0] << 4 | pair[1]));
}

/// The request id of a key's packed id ([`packed_id`]).
fn unpacked_id(packed: &[u8]) -> String {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    match packed.split_first() {
        Some((&ID_UUID, b)) if b.len() == 16 => {
            format!("{}-{}-{}-{}-{}", hex(&b[..4]), hex(&b[4..6]), hex(&b[6..8]), hex(&b[8..10]), hex(&b[10..]))
        }
        Some((&ID_HEX, b)) if b.len() == 16 => hex(b),
        Some((_, text)) => String::from_utf8_lossy(text).into_owned(),
        None => String::new(),
    }
}

/// Keys per reading thread below which [`States::prefetch`] is not worth its threads.
const PREFETCH_MIN: usize = 64;

const ID_TEXT: u8 = 0;
const ID_UUID: u8 = 1;
const ID_HEX: u8 = 2;

fn state_key(partition: i32, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(5 + id.len());
    key.extend_from_slice(&partition.to_be_bytes());
    packed_id(id, &mut key);
    key
}

/// Millis in an order-keeping byte form (negative times sort first).
fn ordered(ms: Millis) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn due_key(partition: i32, due: Millis, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(13 + id.len());
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(&ordered(due));
    packed_id(id, &mut key);
    key
}

fn meta_key(kind: u8, partition: i32) -> [u8; 5] {
    let p = partition.to_be_bytes();
    [kind, p[0], p[1], p[2], p[3]]
}

const CHECKPOINT: u8 = b'c';
const COUNT: u8 = b'n';
/// The Kafka cluster whose changelog the store reflects.
const CLUSTER: &[u8] = b"cluster";

fn io(error: impl std::fmt::Display) -> String {
    format!("score state store: {error}")
}

impl DiskStates {
    /// Opens (or creates) the store in `config.dir`. A second process cannot open it while this one
    /// holds it: the lock is retried for up to `lock_wait` (a previous process shutting down).
    pub fn open(config: &DiskConfig, lock_wait: std::time::Duration) -> Result<DiskStates, String> {
        std::fs::create_dir_all(&config.dir).map_err(|e| format!("creating {}: {e}", config.dir.display()))?;
        let lock = lock(&config.dir.join("LOCK"), lock_wait)?;
        // Written by a release on fjall 2, whose tables fjall 3 cannot read: dropped, so every partition
        // finds no checkpoint and is rebuilt from its changelog.
        let earlier = config.dir.join("lsm");
        if earlier.exists() {
            tracing::warn!(dir = %earlier.display(), "score state store: an earlier release's store is removed; its partitions are rebuilt from the changelog");
            std::fs::remove_dir_all(&earlier).map_err(|e| format!("removing {}: {e}", earlier.display()))?;
        }
        let db = Database::builder(config.dir.join("db"))
            .cache_size(config.cache_bytes)
            // The journal a crash leaves is replayed when the store is opened again: kept about as large
            // as the write buffers (fjall's floor is 64 MiB), it bounds that replay to seconds.
            .max_journaling_size(config.write_buffer_bytes.max(64 << 20))
            // Journals are persisted with each commit ([`DiskStates::commit`]).
            .manual_journal_persist(true)
            // One background worker: with more, fjall's first worker hands every compaction on to the
            // others and, while they are busy, spins doing so (22% of the cores on 2 cores, perf). One
            // joins labels faster here: 60,000-64,000/s against 55,000 with 10 M open.
            .worker_threads(1)
            .open()
            .map_err(io)?;
        // The write buffers: half for the states, a quarter each for the expiry index and the rest. fjall
        // keeps a keyspace's options from its creation: a new size applies to a new store only.
        let options = |share: u64| {
            move || {
                KeyspaceCreateOptions::default()
                    .manual_journal_persist(true)
                    .max_memtable_size((config.write_buffer_bytes / share).max(1 << 20))
                    // Compressed at every level (fjall 3 leaves the first two uncompressed): a state is
                    // about 60 bytes, and LZ4 keeps the disk at the size fjall 2 gave.
                    .data_block_compression_policy(CompressionPolicy::all(CompressionType::Lz4))
                    // Filters and indexes held in memory at every level, whole, as fjall 2 held them
                    // (about 1.25 + 0.5 bytes per state). fjall 3 leaves them to the block cache below
                    // the first levels: once the tables outgrow the cache, every decision's look-up for
                    // an early label (a miss) read a table's whole filter from the page cache and
                    // checksummed it, and writes fell to a crawl past 40 M open (perf: 70% of the time).
                    .filter_block_pinning_policy(PinningPolicy::all(true))
                    .index_block_pinning_policy(PinningPolicy::all(true))
                    .filter_block_partitioning_policy(PartitioningPolicy::all(false))
                    .index_block_partitioning_policy(PartitioningPolicy::all(false))
            }
        };
        // A hash index in each data block (one bucket per state): a label's look-up finds its state's
        // place in the block without a binary search. About 1 byte more per state on disk; labels with
        // 10 M open, same machine and hour: 55,900 -> 62,900/s read ahead, 39,400 -> 46,400/s one by one.
        let states = db
            .keyspace("states", move || options(2)().data_block_hash_ratio_policy(HashRatioPolicy::all(1.0)))
            .map_err(io)?;
        // Only ever scanned by range: filters would buy nothing.
        let due = db.keyspace("due", move || options(4)().filter_policy(FilterPolicy::disabled())).map_err(io)?;
        let meta = db.keyspace("meta", options(4)).map_err(io)?;
        let mut counts = HashMap::new();
        for kv in meta.prefix([COUNT]) {
            let (key, value) = kv.into_inner().map_err(io)?;
            let partition = i32::from_be_bytes(key[1..5].try_into().map_err(io)?);
            counts.insert(partition, u64::from_be_bytes(value[..8].try_into().map_err(io)?));
        }
        Ok(DiskStates {
            db,
            states,
            due,
            meta,
            codec: Codec::default(),
            assigned: Vec::new(),
            counts,
            pending: HashMap::new(),
            delta: 0,
            floor: HashMap::new(),
            _lock: lock,
        })
    }

    /// Follows `partitions` from now on (their states count in [`States::len`] and come due).
    pub fn assign(&mut self, partitions: &[i32]) {
        self.discard();
        self.assigned = partitions.to_vec();
    }

    /// Where partition `partition`'s state stands, if it was ever written.
    pub fn checkpoint(&self, partition: i32) -> Result<Option<Checkpoint>, String> {
        let Some(value) = self.meta.get(meta_key(CHECKPOINT, partition)).map_err(io)? else { return Ok(None) };
        let number = |at: usize| value.get(at..at + 8).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes);
        Ok(number(0).zip(number(8)).map(|(offset, written_at)| Checkpoint { offset, written_at }))
    }

    /// Forgets everything kept of `partition` (before rebuilding it from the changelog). Its checkpoint
    /// goes first: a wipe cut short by a crash leaves a partition without one, wiped again before use.
    pub fn wipe(&mut self, partition: i32) -> Result<u64, String> {
        self.discard();
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        batch.remove(&self.meta, meta_key(CHECKPOINT, partition));
        batch.remove(&self.meta, meta_key(COUNT, partition));
        batch.commit().map_err(io)?;
        self.counts.remove(&partition);
        let mut removed = 0;
        for tree in [&self.states, &self.due] {
            let mut batch = self.db.batch();
            for kv in tree.prefix(partition.to_be_bytes()) {
                batch.remove(tree, kv.key().map_err(io)?);
                removed += 1;
                if batch.len() >= 10_000 {
                    std::mem::replace(&mut batch, self.db.batch()).commit().map_err(io)?;
                }
            }
            batch.commit().map_err(io)?;
        }
        Ok(removed / 2)
    }

    /// Makes sure the store reflects the changelog of cluster `id`: a store written from another
    /// cluster's (a broker set up anew under the same address) is wiped whole. Returns whether it was.
    pub fn belong_to(&mut self, cluster: &str) -> Result<bool, String> {
        let stored = self.meta.get(CLUSTER).map_err(io)?;
        if stored.as_deref() == Some(cluster.as_bytes()) {
            return Ok(false);
        }
        let mut partitions: BTreeSet<i32> = self.counts.keys().copied().collect();
        for kv in self.meta.prefix([CHECKPOINT]) {
            let key = kv.key().map_err(io)?;
            partitions.extend(key.get(1..5).and_then(|b| b.try_into().ok()).map(i32::from_be_bytes));
        }
        for partition in &partitions {
            self.wipe(*partition)?;
        }
        self.meta.insert(CLUSTER, cluster.as_bytes()).map_err(io)?;
        Ok(stored.is_some())
    }

    /// Drops the changes of a batch whose transaction failed.
    pub fn discard(&mut self) {
        self.pending.clear();
        self.delta = 0;
        self.floor.clear();
    }

    /// Writes the batch's changes, with `checkpoints` (partition, the changelog offset the store now
    /// reflects) in one atomic write, flushed to the operating system (a kill -9 loses nothing of it).
    pub fn commit(&mut self, checkpoints: &[(i32, i64)], now: Millis) -> Result<(), String> {
        if checkpoints.is_empty() && !self.pending.values().any(|p| p.changed) {
            self.pending.clear();
            return Ok(());
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        let mut touched: BTreeSet<i32> = BTreeSet::new();
        self.delta = 0;
        for ((partition, id), change) in self.pending.drain().filter(|(_, change)| change.changed) {
            let count = self.counts.entry(partition).or_default();
            match (&change.on_disk, &change.state) {
                (None, Some(_)) => *count += 1,
                (Some(_), None) => *count = count.saturating_sub(1),
                _ => {}
            }
            touched.insert(partition);
            if let Some(before) = change.on_disk
                && change.state.as_ref().is_none_or(|s| s.due != before)
            {
                batch.remove(&self.due, due_key(partition, before, &id));
            }
            match change.state {
                Some(state) => {
                    if change.on_disk != Some(state.due) {
                        batch.insert(&self.due, due_key(partition, state.due, &id), []);
                    }
                    let mut value = state.due.to_be_bytes().to_vec();
                    value.extend_from_slice(&changelog::encode(&state.entry, &self.codec));
                    batch.insert(&self.states, state_key(partition, &id), value);
                }
                None if change.on_disk.is_some() => batch.remove(&self.states, state_key(partition, &id)),
                None => {}
            }
        }
        for partition in touched {
            batch.insert(&self.meta, meta_key(COUNT, partition), self.counts[&partition].to_be_bytes());
        }
        for (partition, offset) in checkpoints {
            let mut value = offset.to_be_bytes().to_vec();
            value.extend_from_slice(&now.to_be_bytes());
            batch.insert(&self.meta, meta_key(CHECKPOINT, *partition), value);
        }
        batch.commit().map_err(io)
    }

    /// Marks the checkpoints of the assigned partitions as current at `now`, offsets unchanged: the store
    /// reflects their changelogs to the end while this instance holds them and nothing else writes there.
    /// A checkpoint is trusted for as long as the changelog keeps tombstones (see the stage's catch-up):
    /// without this, a partition nothing was written to for a day would be rebuilt at the next start.
    pub fn touch_checkpoints(&mut self, now: Millis) -> Result<(), String> {
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        for &partition in &self.assigned {
            if let Some(c) = self.checkpoint(partition)? {
                let mut value = c.offset.to_be_bytes().to_vec();
                value.extend_from_slice(&now.to_be_bytes());
                batch.insert(&self.meta, meta_key(CHECKPOINT, partition), value);
            }
        }
        batch.commit().map_err(io)
    }

    /// Bytes on disk of the states and of the expiry index (tables written out).
    pub fn disk_space(&self) -> (u64, u64) {
        (self.states.disk_space(), self.due.disk_space())
    }

    /// Writes the write buffers out as tables and flushes everything to the disk itself (at a clean
    /// stop): opening the store again then has no journal to replay.
    pub fn sync(&self) -> Result<(), String> {
        for tree in [&self.states, &self.due, &self.meta] {
            tree.rotate_memtable_and_wait().map_err(io)?;
        }
        self.db.persist(PersistMode::SyncAll).map_err(io)
    }

    fn read(&self, partition: i32, id: &str) -> Option<Stored> {
        let value = match self.states.get(state_key(partition, id)) {
            Ok(value) => value?,
            Err(error) => {
                tracing::error!(%error, "score state store: cannot read a request's state");
                return None;
            }
        };
        let due = i64::from_be_bytes(value.get(..8)?.try_into().ok()?);
        match changelog::decode(id, &value[8..], &self.codec, |_| QualitySpec::default()) {
            Ok(entry) => Some(Stored { due, entry }),
            Err(error) => {
                tracing::error!(%error, request_id = id, "score state store: unreadable state skipped");
                None
            }
        }
    }

    /// The due of the state on disk, if one (without decoding it).
    fn read_due(&self, partition: i32, id: &str) -> Option<Millis> {
        let value = self.states.get(state_key(partition, id)).ok()??;
        Some(i64::from_be_bytes(value.get(..8)?.try_into().ok()?))
    }

    /// The due of the state as the batch left it: Some(None) when the batch forgot it.
    fn pending_due(&self, partition: i32, id: &str) -> Option<Option<Millis>> {
        self.pending.get(&(partition, id.to_string())).map(|p| p.state.as_ref().map(|s| s.due))
    }
}

impl States for DiskStates {
    fn get(&mut self, partition: i32, id: &str) -> Option<Stored> {
        let key = (partition, id.to_string());
        if let Some(pending) = self.pending.get(&key) {
            return pending.state.clone();
        }
        let state = self.read(partition, id);
        let on_disk = state.as_ref().map(|s| s.due);
        self.pending.insert(key, Pending { on_disk, state: state.clone(), changed: false });
        state
    }

    /// Point reads of an LSM tree spend their time finding and decompressing a block and decoding the
    /// state (perf: 61% and 13% of a label's join with 100 M open), independent for each key: a batch's
    /// are split among the cores.
    fn prefetch(&mut self, mut keys: Vec<(i32, String)>) {
        keys.retain(|key| !self.pending.contains_key(key));
        keys.sort_unstable();
        keys.dedup();
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        if keys.len() < PREFETCH_MIN * 2 || threads < 2 {
            return;
        }
        let chunk = keys.len().div_ceil(threads);
        let this = &*self;
        let read: Vec<Vec<Option<Stored>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (keys.chunks(chunk))
                .map(|part| scope.spawn(move || part.iter().map(|(p, id)| this.read(*p, id)).collect::<Vec<_>>()))
                .collect();
            workers.into_iter().map(|w| w.join().expect("a store read panicked")).collect()
        });
        for (key, state) in keys.into_iter().zip(read.into_iter().flatten()) {
            let on_disk = state.as_ref().map(|s| s.due);
            self.pending.insert(key, Pending { on_disk, state, changed: false });
        }
    }

    fn set(&mut self, partition: i32, id: &str, state: Option<Stored>) {
        let key = (partition, id.to_string());
        let held_before = match self.pending.get(&key) {
            Some(pending) => pending.state.is_some(),
            None => {
                let on_disk = self.read_due(partition, id);
                self.pending.insert(key.clone(), Pending { on_disk, state: None, changed: true });
                on_disk.is_some()
            }
        };
        if self.assigned.contains(&partition) {
            self.delta += state.is_some() as i64 - held_before as i64;
        }
        if let (Some(state), Some(floor)) = (&state, self.floor.get_mut(&partition)) {
            *floor = (*floor).min(state.due);
        }
        let pending = self.pending.get_mut(&key).expect("inserted above");
        pending.state = state;
        pending.changed = true;
    }

    fn due(&mut self, now: Millis, limit: usize) -> Vec<(i32, String, Stored)> {
        let mut found = Vec::new();
        for &partition in &self.assigned {
            let mut start = partition.to_be_bytes().to_vec();
            start.extend_from_slice(&ordered(self.floor.get(&partition).copied().unwrap_or(Millis::MIN)));
            let mut end = partition.to_be_bytes().to_vec();
            end.extend_from_slice(&ordered(now.saturating_add(1)));
            for kv in self.due.range(start..end) {
                let Ok(key) = kv.key() else { break };
                let Some(due) =
                    key.get(4..12).and_then(|b| b.try_into().ok()).map(|b| (u64::from_be_bytes(b) ^ (1 << 63)) as i64)
                else {
                    continue;
                };
                let id = unpacked_id(&key[12..]);
                // The batch may have changed it already: its own due then counts (below).
                if self.pending_due(partition, &id).is_some() {
                    continue;
                }
                // An index key always names a state with that due (both change in one write).
                if let Some(state) = self.read(partition, &id).filter(|s| s.due == due) {
                    found.push((partition, id, state));
                }
                if found.len() >= limit {
                    break;
                }
            }
        }
        for ((partition, id), pending) in &self.pending {
            if let Some(state) = pending.state.as_ref().filter(|s| s.due <= now)
                && self.assigned.contains(partition)
            {
                found.push((*partition, id.clone(), state.clone()));
            }
        }
        found.sort_by_key(|(_, _, s)| s.due);
        found.truncate(limit);
        // The caller ends or moves every state returned: the next scan of a partition starts at the last
        // due returned (a state set below it lowers it again, see `set`).
        for (partition, _, state) in &found {
            let floor = self.floor.entry(*partition).or_insert(Millis::MIN);
            *floor = (*floor).max(state.due);
        }
        found
    }

    fn len(&self) -> u64 {
        let on_disk: u64 = self.assigned.iter().map(|p| self.counts.get(p).copied().unwrap_or(0)).sum();
        (on_disk as i64 + self.delta).max(0) as u64
    }
}

/// An exclusive lock on `path`, waited for up to `wait`.
fn lock(path: &Path, wait: std::time::Duration) -> Result<File, String> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err(error) => {
                return Err(format!(
                    "{} is held by another process ({error}): each instance needs its own quality.state_dir",
                    path.display()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{DecisionStatus, ScoredDecision};
    use crate::quality::join::Decided;

    fn open(at: Millis, user: &str) -> Stored {
        let decision = ScoredDecision {
            user_id: user.into(),
            deployment: "fraud".into(),
            model: "v1".into(),
            cohort: "control".into(),
            config_version: 1,
            status: DecisionStatus::Ok,
            score: Some(0.5),
            decided_at: at,
        };
        Stored { due: at + 100, entry: Entry::Open(Decided { partition: 0, decision, shadows: Vec::new() }) }
    }

    fn config(dir: &Path) -> DiskConfig {
        DiskConfig { dir: dir.to_path_buf(), cache_bytes: 1 << 20, write_buffer_bytes: 1 << 20 }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("switchyard-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// The same operations on both stores, and what the disk keeps across a reopen.
    #[test]
    fn the_disk_store_keeps_only_committed_changes_and_agrees_with_memory() {
        let dir = temp_dir("commit");
        let mut disk = DiskStates::open(&config(&dir), std::time::Duration::ZERO).unwrap();
        let mut mem = MemStates::default();
        disk.assign(&[0, 1]);
        for states in [&mut disk as &mut dyn States, &mut mem] {
            states.set(0, "a", Some(open(1_000, "ua")));
            states.set(1, "b", Some(open(500, "ub")));
            states.set(0, "c", Some(open(2_000, "uc")));
            states.set(0, "c", None);
            assert_eq!(states.len(), 2);
            assert_eq!(states.get(0, "a"), Some(open(1_000, "ua")), "read back before the commit");
            let due: Vec<String> = states.due(1_100, 10).into_iter().map(|(_, id, _)| id).collect();
            assert_eq!(due, ["b", "a"], "earliest first, pending changes included");
        }
        disk.commit(&[(0, 7), (1, 3)], 42).unwrap();
        // A failed batch: moved and forgotten, then dropped.
        disk.set(0, "a", Some(Stored { due: 9_999, ..open(1_000, "ua") }));
        disk.set(1, "b", None);
        assert_eq!(disk.len(), 1);
        disk.discard();
        assert_eq!(disk.len(), 2);
        // A committed move of the due time.
        disk.set(0, "a", Some(Stored { due: 5_000, ..open(1_000, "ua") }));
        disk.commit(&[(0, 8)], 43).unwrap();
        drop(disk);

        let mut disk = DiskStates::open(&config(&dir), std::time::Duration::ZERO).unwrap();
        disk.assign(&[0, 1]);
        assert_eq!(disk.len(), 2);
        assert_eq!(disk.checkpoint(0).unwrap(), Some(Checkpoint { offset: 8, written_at: 43 }));
        assert_eq!(disk.checkpoint(1).unwrap(), Some(Checkpoint { offset: 3, written_at: 42 }));
        assert_eq!(disk.checkpoint(2).unwrap(), None);
        disk.touch_checkpoints(50).unwrap();
        assert_eq!(disk.checkpoint(0).unwrap(), Some(Checkpoint { offset: 8, written_at: 50 }), "offsets kept");
        assert_eq!(disk.checkpoint(2).unwrap(), None, "none made up");
        let due: Vec<(String, Millis)> = disk.due(10_000, 10).into_iter().map(|(_, id, s)| (id, s.due)).collect();
        assert_eq!(due, [("b".to_string(), 600), ("a".to_string(), 5_000)], "the old due key is gone");
        disk.assign(&[1]);
        assert_eq!(disk.len(), 1, "only assigned partitions count");
        assert_eq!(disk.wipe(1).unwrap(), 1);
        assert_eq!((disk.len(), disk.checkpoint(1).unwrap()), (0, None));
        disk.assign(&[0, 1]);
        assert_eq!(disk.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Reading a batch's states ahead changes nothing the batch sees: committed states, states the batch
    /// changed already, states that do not exist, and a batch that fails.
    #[test]
    fn states_read_ahead_are_the_states_the_batch_would_have_read() {
        let dir = temp_dir("prefetch");
        let mut disk = DiskStates::open(&config(&dir), std::time::Duration::ZERO).unwrap();
        disk.assign(&[0, 1]);
        let ids: Vec<String> = (0..1_000).map(|i| format!("r{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            disk.set((i % 2) as i32, id, Some(open(i as Millis, id)));
        }
        disk.commit(&[(0, 1)], 1).unwrap();
        disk.set(0, "r0", None);
        disk.set(1, "r1", Some(open(7, "moved")));
        let mut keys: Vec<(i32, String)> = ids.iter().enumerate().map(|(i, id)| ((i % 2) as i32, id.clone())).collect();
        keys.extend([(0, "absent".to_string()), (1, "r0".to_string()), (0, "r2".to_string())]);
        disk.prefetch(keys);
        assert_eq!(disk.get(0, "r0"), None, "forgotten by the batch before");
        assert_eq!(disk.get(1, "r1"), Some(open(7, "moved")), "changed by the batch before");
        assert_eq!(disk.get(0, "r2"), Some(open(2, "r2")));
        assert_eq!(disk.get(1, "r999"), Some(open(999, "r999")));
        assert_eq!((disk.get(0, "absent"), disk.get(1, "r0")), (None, None));
        assert_eq!(disk.len(), 999);
        disk.discard();
        assert_eq!(disk.len(), 1_000);
        assert_eq!(disk.get(0, "r0"), Some(open(0, "r0")), "the failed batch's changes are gone");
        disk.prefetch(ids.iter().enumerate().map(|(i, id)| ((i % 2) as i32, id.clone())).collect());
        disk.set(0, "r4", None);
        disk.commit(&[], 2).unwrap();
        assert_eq!(disk.len(), 999);
        assert_eq!(disk.get(0, "r4"), None, "a state read ahead and then forgotten is removed from the disk");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn request_ids_are_packed_in_keys_and_read_back_the_same() {
        for id in [
            "0b0f6c3e-8d6a-4c1e-9a51-3f2d7e9b1c04",
            "0b0f6c3e8d6a4c1e9a513f2d7e9b1c04",
            "0B0F6C3E-8D6A-4C1E-9A51-3F2D7E9B1C04",
            "0b0f6c3e-8d6a-4c1e-9a51-3f2d7e9b1c0z",
            "0b0f6c3e+8d6a-4c1e-9a51-3f2d7e9b1c04",
            "req-42",
            "",
            "ünïcode-id",
            "ü0f6c3e-8d6a-4c1e-9a51-3f2d7e9b1c04",
        ] {
            let mut key = Vec::new();
            packed_id(id, &mut key);
            assert_eq!(unpacked_id(&key), id);
            let packs = id.len() >= 32 && !id.contains(['B', 'z', '+', 'ü']);
            assert_eq!(key.len(), if packs { 17 } else { 1 + id.len() }, "{id}");
        }
    }

    /// The expiry scan starts past the states it already handed out, and still finds one set below that.
    #[test]
    fn the_expiry_scan_skips_what_it_handed_out_but_not_what_is_set_below_it() {
        let dir = temp_dir("floor");
        let mut disk = DiskStates::open(&config(&dir), std::time::Duration::ZERO).unwrap();
        disk.assign(&[0]);
        disk.set(0, "a", Some(open(0, "ua")));
        disk.set(0, "c", Some(open(900, "uc")));
        disk.commit(&[], 1).unwrap();
        let ids = |found: Vec<(i32, String, Stored)>| found.into_iter().map(|(_, id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(disk.due(200, 10)), ["a"]);
        disk.set(0, "a", None);
        disk.commit(&[], 2).unwrap();
        assert_eq!(disk.floor[&0], 100, "the scan starts at the last due handed out");
        disk.set(0, "b", Some(open(-50, "ub")));
        disk.commit(&[], 3).unwrap();
        assert_eq!(ids(disk.due(2_000, 10)), ["b", "c"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_store_of_another_cluster_is_wiped() {
        let dir = temp_dir("cluster");
        let mut disk = DiskStates::open(&config(&dir), std::time::Duration::ZERO).unwrap();
        disk.assign(&[0, 3]);
        assert!(!disk.belong_to("one").unwrap(), "a new store belongs to its first cluster");
        disk.set(3, "a", Some(open(1_000, "ua")));
        disk.commit(&[(3, 9)], 1).unwrap();
        assert!(!disk.belong_to("one").unwrap());
        assert_eq!(disk.len(), 1);
        assert!(disk.belong_to("two").unwrap());
        assert_eq!((disk.len(), disk.checkpoint(3).unwrap(), disk.get(3, "a")), (0, None, None));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_process_cannot_open_the_same_store() {
        let dir = temp_dir("lock");
        let _first = DiskStates::open(&config(&dir), std::time::Duration::ZERO).unwrap();
        // Locks are per open file description: a second open in this process is refused like another's.
        let error = DiskStates::open(&config(&dir), std::time::Duration::from_millis(200)).unwrap_err();
        assert!(error.contains("held by another process"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_earlier_releases_store_is_dropped_and_its_partitions_have_no_checkpoint() {
        let dir = temp_dir("earlier");
        std::fs::create_dir_all(dir.join("lsm/partitions/states")).unwrap();
        std::fs::write(dir.join("lsm/version"), b"fjall 2").unwrap();
        let store = DiskStates::open(&config(&dir), std::time::Duration::ZERO).unwrap();
        assert!(!dir.join("lsm").exists());
        assert_eq!(store.checkpoint(0).unwrap(), None);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
