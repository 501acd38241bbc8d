//! The in-memory index: a fixed-capacity, open-addressing table from a path's 64-bit tag to the
//! device location of the file's Publish record.
//!
//! Sixteen bytes a slot, allocated once at start-up. Lookups are lock-free (two atomic loads a
//! probe) and never wait for writers; writers are serialised by a mutex. A tag is a hash, so a
//! slot may name another path: the caller always checks the path stored in the record it reads,
//! which also makes a lookup that races a slot's reuse safe. The full path lives on disk only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A location of zero marks a deleted slot (a tombstone); offset zero is a superblock, never a
/// record.
const TOMBSTONE: u64 = 0;
/// A tag of zero marks an empty slot; `tag_of` never returns it.
const EMPTY: u64 = 0;

/// Fraction of slots the table may fill, in percent; capacity is sized from it.
pub const LOAD_PERCENT_MAX: u64 = 80;

/// The 64-bit tag of a content path (xxh3, stable across versions and machines).
pub fn tag_of(path: &str) -> u64 {
    match xxhash_rust::xxh3::xxh3_64(path.as_bytes()) {
        EMPTY => 1,
        tag => tag,
    }
}

#[derive(Default)]
struct Slot {
    tag: AtomicU64,
    location: AtomicU64,
}

/// The table is full: the configured file capacity is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexFull;

/// A fixed-capacity tag -> location table.
pub struct Index {
    slots: Box<[Slot]>,
    writer: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    /// Slots that are not empty (live or tombstone).
    used: u64,
    /// Live entries.
    live: u64,
}

impl Index {
    /// A table for up to `files_max` entries, every slot allocated and touched now.
    pub fn with_capacity(files_max: u64) -> Index {
        let slot_count = (files_max.max(1) * 100).div_ceil(LOAD_PERCENT_MAX) + 1;
        let slot_count = usize::try_from(slot_count).expect("index fits in memory");
        let slots: Vec<Slot> = std::iter::repeat_with(Slot::default)
            .take(slot_count)
            .collect();
        Index {
            slots: slots.into_boxed_slice(),
            writer: Mutex::new(Counts::default()),
        }
    }

    /// Bytes of memory the table holds.
    pub fn memory_bytes(&self) -> u64 {
        (self.slots.len() * std::mem::size_of::<Slot>()) as u64
    }

    /// Number of live entries.
    pub fn len(&self) -> u64 {
        self.counts().live
    }

    /// True when no entry is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.writer
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn home(&self, tag: u64) -> usize {
        let slot_count = self.slots.len() as u128;
        usize::try_from((u128::from(tag) * slot_count) >> 64).expect("below slot count")
    }

    /// Calls `visit` with each live location stored under `tag`, in probe order, until it
    /// returns `Some`.
    pub fn find<T>(&self, tag: u64, mut visit: impl FnMut(u64) -> Option<T>) -> Option<T> {
        self.probe(tag, |_, location| visit(location))
    }

    /// True when `tag` currently maps to `location`.
    pub fn contains(&self, tag: u64, location: u64) -> bool {
        self.find(tag, |found| (found == location).then_some(()))
            .is_some()
    }

    /// Adds an entry (a tag may hold several locations: different paths, same hash).
    pub fn insert(&self, tag: u64, location: u64) -> Result<(), IndexFull> {
        assert!(tag != EMPTY && location != TOMBSTONE);
        let mut counts = self.counts();
        let limit = (self.slots.len() as u64 * LOAD_PERCENT_MAX) / 100;
        let mut position = self.home(tag);
        let mut reusable = None;
        for _ in 0..self.slots.len() {
            let slot = &self.slots[position];
            let slot_tag = slot.tag.load(Ordering::SeqCst);
            if slot_tag == EMPTY {
                break;
            }
            if reusable.is_none() && slot.location.load(Ordering::SeqCst) == TOMBSTONE {
                reusable = Some(position);
            }
            position = (position + 1) % self.slots.len();
        }
        if counts.live >= limit {
            return Err(IndexFull);
        }
        let target = match reusable {
            Some(position) => position,
            // Live entries are what the limit counts; one slot always stays empty so that
            // every probe ends.
            None if counts.used + 1 < self.slots.len() as u64 => {
                counts.used += 1;
                position
            }
            None => return Err(IndexFull),
        };
        let slot = &self.slots[target];
        // Location first, then tag: a reader that sees the new tag sees a valid location. A
        // reader that matched the old tag may see the new location: it checks the record's
        // path, so it is never misled.
        slot.location.store(location, Ordering::SeqCst);
        slot.tag.store(tag, Ordering::SeqCst);
        counts.live += 1;
        Ok(())
    }

    /// Points the entry `tag -> old` at `new`; false when no such entry exists.
    pub fn replace(&self, tag: u64, old: u64, new: u64) -> bool {
        assert!(new != TOMBSTONE);
        let _counts = self.counts();
        match self.position_of(tag, old) {
            Some(position) => {
                self.slots[position].location.store(new, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Removes the entry `tag -> location`; false when no such entry exists.
    pub fn remove(&self, tag: u64, location: u64) -> bool {
        let mut counts = self.counts();
        match self.position_of(tag, location) {
            Some(position) => {
                self.slots[position]
                    .location
                    .store(TOMBSTONE, Ordering::SeqCst);
                counts.live -= 1;
                true
            }
            None => false,
        }
    }

    /// Removes every entry whose location satisfies `doomed`; returns how many.
    pub fn remove_where(&self, doomed: impl Fn(u64) -> bool) -> u64 {
        let mut counts = self.counts();
        let mut removed = 0;
        for slot in self.slots.iter() {
            let location = slot.location.load(Ordering::SeqCst);
            if slot.tag.load(Ordering::SeqCst) != EMPTY && location != TOMBSTONE && doomed(location)
            {
                slot.location.store(TOMBSTONE, Ordering::SeqCst);
                removed += 1;
            }
        }
        counts.live -= removed;
        removed
    }

    /// Calls `visit(tag, location)` for every live entry; writers wait meanwhile, so the view
    /// is consistent.
    pub fn for_each(&self, mut visit: impl FnMut(u64, u64)) {
        let _counts = self.counts();
        for slot in self.slots.iter() {
            let tag = slot.tag.load(Ordering::SeqCst);
            let location = slot.location.load(Ordering::SeqCst);
            if tag != EMPTY && location != TOMBSTONE {
                visit(tag, location);
            }
        }
    }

    fn position_of(&self, tag: u64, location: u64) -> Option<usize> {
        self.probe(tag, |position, found| {
            (found == location).then_some(position)
        })
    }

    /// Walks `tag`'s probe sequence, calling `visit(position, location)` for each live slot
    /// holding `tag`, until it returns `Some` or an empty slot ends the sequence.
    fn probe<T>(&self, tag: u64, mut visit: impl FnMut(usize, u64) -> Option<T>) -> Option<T> {
        let mut position = self.home(tag);
        for _ in 0..self.slots.len() {
            let slot = &self.slots[position];
            let slot_tag = slot.tag.load(Ordering::SeqCst);
            if slot_tag == EMPTY {
                return None;
            }
            if slot_tag == tag {
                let location = slot.location.load(Ordering::SeqCst);
                if location != TOMBSTONE {
                    if let Some(found) = visit(position, location) {
                        return Some(found);
                    }
                }
            }
            position = (position + 1) % self.slots.len();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_replace_remove() {
        let index = Index::with_capacity(100);
        let tag = tag_of("/video/a.mp4");
        index.insert(tag, 4096).unwrap();
        index.insert(tag, 8192).unwrap();
        let mut seen = Vec::new();
        index.find(tag, |location| {
            seen.push(location);
            None::<()>
        });
        assert_eq!(seen, vec![4096, 8192]);
        assert!(index.replace(tag, 4096, 12288));
        assert!(!index.replace(tag, 4096, 12288));
        assert!(index.contains(tag, 12288));
        assert!(index.remove(tag, 12288));
        assert!(!index.contains(tag, 12288));
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn tombstones_are_reused_and_the_limit_holds() {
        let index = Index::with_capacity(10);
        let mut count = 0u64;
        while index
            .insert(tag_of(&format!("/f{count}")), 4096 * (count + 1))
            .is_ok()
        {
            count += 1;
        }
        assert!(
            (10..=12).contains(&count),
            "room for the capacity asked: {count}"
        );
        assert!(index.remove(tag_of("/f3"), 4096 * 4));
        index.insert(tag_of("/new"), 1 << 30).unwrap();
        assert!(index.contains(tag_of("/new"), 1 << 30));
        assert_eq!(index.insert(tag_of("/more"), 1 << 31), Err(IndexFull));
        assert_eq!(index.remove_where(|location| location < 4096 * 5), 3);
        assert_eq!(index.len(), count - 3);
    }

    #[test]
    fn tags_are_stable() {
        assert_eq!(tag_of(""), xxhash_rust::xxh3::xxh3_64(b""));
        assert_ne!(tag_of("/a"), tag_of("/b"));
    }
}
