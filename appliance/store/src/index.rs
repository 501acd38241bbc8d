//! The in-memory index: a fixed-capacity, open-addressing table from a path's 64-bit tag to the
//! device location of the file's Publish record.
//!
//! Sixteen bytes a slot, allocated once at start-up. Lookups are lock-free (two atomic loads a
//! probe) and never wait for writers; writers are serialised by a mutex. A tag is a hash, so a
//! slot may name another path: the caller always checks the path stored in the record it reads,
//! which also makes a lookup that races a slot's reuse safe. The full path lives on disk only.
//!
//! Removal leaves no tombstone: it shifts the rest of the probe run back (linear probing's
//! backward-shift deletion), so churn never lengthens probes and a lookup of an absent path
//! stops at the first empty slot however many files came and went. A shift can make a
//! concurrent lookup miss an entry that is being moved, so removals bump a sequence counter
//! (odd while shifting) and a lookup that found nothing retries when the counter moved. A
//! lookup that found something needs no retry: an entry is copied to its new slot before its
//! old slot is cleared, and the caller checks the record's path anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
    /// Live entries; its mutex serialises writers.
    writer: Mutex<u64>,
    /// Bumped before and after every removal's shift: odd while entries move.
    shifts: AtomicU64,
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
            writer: Mutex::new(0),
            shifts: AtomicU64::new(0),
        }
    }

    /// Bytes of memory the table holds.
    pub fn memory_bytes(&self) -> u64 {
        (self.slots.len() * std::mem::size_of::<Slot>()) as u64
    }

    /// Number of live entries.
    pub fn len(&self) -> u64 {
        *self.live()
    }

    /// True when no entry is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn live(&self) -> std::sync::MutexGuard<'_, u64> {
        self.writer
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn home(&self, tag: u64) -> usize {
        let slot_count = self.slots.len() as u128;
        usize::try_from((u128::from(tag) * slot_count) >> 64).expect("below slot count")
    }

    fn next(&self, position: usize) -> usize {
        (position + 1) % self.slots.len()
    }

    /// Calls `visit` with each location stored under `tag`, in probe order, until it returns
    /// `Some`. `visit` may see a location twice when a removal shifts entries meanwhile.
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
        assert!(tag != EMPTY && location != 0);
        let mut live = self.live();
        // Live entries are what the limit counts; empty slots always remain, so every probe
        // ends.
        if *live >= (self.slots.len() as u64 * LOAD_PERCENT_MAX) / 100 {
            return Err(IndexFull);
        }
        let mut position = self.home(tag);
        while self.slots[position].tag.load(Ordering::SeqCst) != EMPTY {
            position = self.next(position);
        }
        self.fill(position, tag, location);
        *live += 1;
        Ok(())
    }

    /// Writes an entry into an empty slot: location first, then tag, so that a reader that sees
    /// the tag sees a valid location. A reader that matched the slot's previous tag may see the
    /// new location: it checks the record's path, so it is never misled.
    fn fill(&self, position: usize, tag: u64, location: u64) {
        let slot = &self.slots[position];
        slot.location.store(location, Ordering::SeqCst);
        slot.tag.store(tag, Ordering::SeqCst);
    }

    fn clear(&self, position: usize) {
        let slot = &self.slots[position];
        slot.tag.store(EMPTY, Ordering::SeqCst);
        slot.location.store(0, Ordering::SeqCst);
    }

    /// Points the entry `tag -> old` at `new`; false when no such entry exists.
    pub fn replace(&self, tag: u64, old: u64, new: u64) -> bool {
        assert!(new != 0);
        let _live = self.live();
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
        let mut live = self.live();
        match self.position_of(tag, location) {
            Some(position) => {
                self.remove_at(position);
                *live -= 1;
                true
            }
            None => false,
        }
    }

    /// Empties `hole` and shifts later entries of the run back so that no probe run is broken.
    /// The caller holds the writer lock.
    fn remove_at(&self, mut hole: usize) {
        self.shifts.fetch_add(1, Ordering::SeqCst);
        self.clear(hole);
        let slot_count = self.slots.len();
        let mut position = self.next(hole);
        loop {
            let tag = self.slots[position].tag.load(Ordering::SeqCst);
            if tag == EMPTY {
                break;
            }
            let home = self.home(tag);
            let distance = |to: usize| (to + slot_count - home) % slot_count;
            // The entry may move back to the hole when the hole lies on its probe path.
            if distance(hole) < distance(position) {
                let location = self.slots[position].location.load(Ordering::SeqCst);
                self.fill(hole, tag, location);
                self.clear(position);
                hole = position;
            }
            position = self.next(position);
        }
        self.shifts.fetch_add(1, Ordering::SeqCst);
    }

    /// Removes every entry whose location satisfies `doomed`; returns how many.
    pub fn remove_where(&self, doomed: impl Fn(u64) -> bool) -> u64 {
        let mut live = self.live();
        let mut removed = 0;
        // A shift may carry an entry around the end of the table into slots already passed:
        // repeat until a sweep finds nothing.
        loop {
            let before = removed;
            for position in 0..self.slots.len() {
                while self.slots[position].tag.load(Ordering::SeqCst) != EMPTY
                    && doomed(self.slots[position].location.load(Ordering::SeqCst))
                {
                    self.remove_at(position);
                    removed += 1;
                }
            }
            if removed == before {
                break;
            }
        }
        *live -= removed;
        removed
    }

    /// Calls `visit(tag, location)` for every live entry; writers wait meanwhile, so the view
    /// is consistent.
    pub fn for_each(&self, mut visit: impl FnMut(u64, u64)) {
        let _live = self.live();
        for slot in self.slots.iter() {
            let tag = slot.tag.load(Ordering::SeqCst);
            if tag != EMPTY {
                visit(tag, slot.location.load(Ordering::SeqCst));
            }
        }
    }

    /// Slots a lookup of `tag` inspects before it stops (benchmarks and tests).
    pub fn probe_length(&self, tag: u64) -> u64 {
        let mut position = self.home(tag);
        let mut length = 1;
        while self.slots[position].tag.load(Ordering::SeqCst) != EMPTY {
            position = self.next(position);
            length += 1;
        }
        length
    }

    fn position_of(&self, tag: u64, location: u64) -> Option<usize> {
        self.probe(tag, |position, found| {
            (found == location).then_some(position)
        })
    }

    /// Walks `tag`'s probe run, calling `visit(position, location)` for each slot holding
    /// `tag`, until it returns `Some` or an empty slot ends the run. Finding nothing is
    /// trusted only when no removal shifted entries meanwhile.
    fn probe<T>(&self, tag: u64, mut visit: impl FnMut(usize, u64) -> Option<T>) -> Option<T> {
        loop {
            let before = self.shifts.load(Ordering::SeqCst);
            if before % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            let mut position = self.home(tag);
            for _ in 0..self.slots.len() {
                let slot = &self.slots[position];
                let slot_tag = slot.tag.load(Ordering::SeqCst);
                if slot_tag == EMPTY {
                    break;
                }
                if slot_tag == tag {
                    let location = slot.location.load(Ordering::SeqCst);
                    if location != 0 {
                        if let Some(found) = visit(position, location) {
                            return Some(found);
                        }
                    }
                }
                position = self.next(position);
            }
            if self.shifts.load(Ordering::SeqCst) == before {
                return None;
            }
        }
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
    fn removed_slots_are_reused_and_the_limit_holds() {
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
        for number in (0..count).filter(|number| *number >= 4) {
            let tag = tag_of(&format!("/f{number}"));
            assert!(index.contains(tag, 4096 * (number + 1)), "/f{number} kept");
        }
    }

    /// Churn of ten times the capacity leaves absent-path lookups as short as on a fresh
    /// table (with tombstones they grew to scans of the whole table).
    #[test]
    fn churn_keeps_probes_short() {
        let capacity = 1000u64;
        let index = Index::with_capacity(capacity);
        let live = capacity * 3 / 4;
        for number in 0..live {
            index
                .insert(tag_of(&format!("/f{number}")), 4096 * (number + 1))
                .unwrap();
        }
        for number in live..live + capacity * 10 {
            let gone = number - live;
            assert!(index.remove(tag_of(&format!("/f{gone}")), 4096 * (gone + 1)));
            index
                .insert(tag_of(&format!("/f{number}")), 4096 * (number + 1))
                .unwrap();
        }
        assert_eq!(index.len(), live);
        for number in capacity * 10..capacity * 10 + live {
            assert!(index.contains(tag_of(&format!("/f{number}")), 4096 * (number + 1)));
        }
        let absent: u64 = (0..1000)
            .map(|n| index.probe_length(tag_of(&format!("/no{n}"))))
            .sum();
        // Linear probing at 60% load expects about 3.6 slots for a miss.
        assert!(
            absent / 1000 < 12,
            "mean absent probe length {}",
            absent / 1000
        );
    }

    /// Lookups of present entries never miss while other entries are removed and inserted.
    #[test]
    fn lookups_never_miss_during_removals() {
        let index = std::sync::Arc::new(Index::with_capacity(2000));
        let stable: Vec<(u64, u64)> = (0..500)
            .map(|number| (tag_of(&format!("/stable{number}")), 4096 * (number + 1)))
            .collect();
        for (tag, location) in &stable {
            index.insert(*tag, *location).unwrap();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let index = std::sync::Arc::clone(&index);
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut number = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let tag = tag_of(&format!("/churn{}", number % 1000));
                    let location = (1 << 40) + 4096 * number;
                    index.insert(tag, location).unwrap();
                    assert!(index.remove(tag, location));
                    number += 1;
                }
            })
        };
        for _ in 0..200 {
            for (tag, location) in &stable {
                assert!(
                    index.contains(*tag, *location),
                    "a present entry was missed"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
    }

    #[test]
    fn tags_are_stable() {
        assert_eq!(tag_of(""), xxhash_rust::xxh3::xxh3_64(b""));
        assert_ne!(tag_of("/a"), tag_of("/b"));
    }
}
