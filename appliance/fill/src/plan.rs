//! The fill planner: from the manifest, what the store holds, what was dropped earlier and the
//! free space, decides what to fetch (most popular first), what to delete now, which dropped
//! files to keep through their grace period and what cannot fit. Pure and deterministic: must
//! not touch the store, the network or a clock (the time is an input).
//!
//! Space accounting: a fetch of a file the store does not hold needs its size; a fetch that
//! replaces a held version needs only its growth (new size minus held size, never below zero),
//! since the old version is freed when the new one is published. Deleted files free their held
//! size. When the next fetch does not fit, dropped files still in their grace period are deleted
//! early, least popular (highest last rank) first, but only if that makes the fetch fit; if even
//! deleting all of them would not, the fetch goes to `cannot_fit` and nothing is deleted for it,
//! so a smaller, less popular file may still use the space. A manifest file is never deleted to
//! make room.

use crate::manifest::{Manifest, ManifestFile};
use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

/// A file the store holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldFile {
    pub path: String,
    pub size_bytes: u64,
    pub sha256: [u8; 32],
}

/// A held file no longer in the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub path: String,
    /// When it left the manifest (first seen missing).
    pub since_unix_s: u64,
    /// Its rank in the last manifest that listed it; `u64::MAX` when unknown.
    pub last_rank: u64,
}

pub struct PlanInput<'a> {
    pub manifest: &'a Manifest,
    pub held: &'a [HeldFile],
    /// Files held but no longer in the manifest, as the previous plan's `keep_dropped` left them.
    pub dropped: &'a [Dropped],
    /// Free space the store can still take, all drives together.
    pub free_bytes: u64,
    pub now_unix_s: u64,
    pub delete_grace_s: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    /// Files to download, most popular first (rank ascending, ties by path): those missing or
    /// held with another SHA-256 or size.
    pub fetch: Vec<ManifestFile>,
    /// Paths to delete now: dropped files past their grace period (by path), then dropped files
    /// deleted early to make room (least popular first).
    pub delete: Vec<String>,
    /// Dropped files still within their grace period, by path; the caller persists this list
    /// and passes it back as `PlanInput::dropped`.
    pub keep_dropped: Vec<Dropped>,
    /// Manifest paths that do not fit even after deleting every dropped file, in rank order.
    pub cannot_fit: Vec<String>,
    /// Manifest files already held with the right SHA-256 and size.
    pub held_ok: u64,
}

/// A dropped file with the size it occupies.
struct DroppedHeld {
    dropped: Dropped,
    size_bytes: u64,
}

/// A manifest file to fetch with the space it needs.
struct Wanted<'a> {
    file: &'a ManifestFile,
    growth_bytes: u64,
}

/// Plans one fill. A path listed twice in the manifest or in `held` counts once (the first).
pub fn plan(input: &PlanInput) -> Plan {
    let mut manifest_by_path: HashMap<&str, &ManifestFile> =
        HashMap::with_capacity(input.manifest.files.len());
    for file in &input.manifest.files {
        manifest_by_path.entry(file.path.as_str()).or_insert(file);
    }
    let mut held_by_path: HashMap<&str, &HeldFile> = HashMap::with_capacity(input.held.len());
    for held in input.held {
        held_by_path.entry(held.path.as_str()).or_insert(held);
    }

    let mut result = Plan::default();
    let (wanted, held_ok) = wanted_files(input.manifest, &held_by_path);
    result.held_ok = held_ok;

    let (expired, mut in_grace) = dropped_files(input, &manifest_by_path);
    let mut available_bytes = input.free_bytes;
    for file in expired {
        available_bytes = available_bytes.saturating_add(file.size_bytes);
        result.delete.push(file.dropped.path);
    }

    // Eviction order: least popular first, ties by path.
    in_grace.sort_by(|a, b| {
        (Reverse(a.dropped.last_rank), &a.dropped.path)
            .cmp(&(Reverse(b.dropped.last_rank), &b.dropped.path))
    });
    let mut evictable_bytes = in_grace
        .iter()
        .fold(0u64, |sum, file| sum.saturating_add(file.size_bytes));
    let mut evicted_count = 0usize;

    for wanted in wanted {
        let need_bytes = wanted.growth_bytes;
        if need_bytes > available_bytes.saturating_add(evictable_bytes) {
            result.cannot_fit.push(wanted.file.path.clone());
            continue;
        }
        while need_bytes > available_bytes {
            let Some(victim) = in_grace.get(evicted_count) else {
                break;
            };
            evicted_count += 1;
            available_bytes = available_bytes.saturating_add(victim.size_bytes);
            evictable_bytes = evictable_bytes.saturating_sub(victim.size_bytes);
            result.delete.push(victim.dropped.path.clone());
        }
        if need_bytes > available_bytes {
            // Unreachable by the check above; kept so that a miscount can never overcommit.
            result.cannot_fit.push(wanted.file.path.clone());
            continue;
        }
        available_bytes -= need_bytes;
        result.fetch.push(wanted.file.clone());
    }

    let mut keep: Vec<Dropped> = in_grace
        .into_iter()
        .skip(evicted_count)
        .map(|file| file.dropped)
        .collect();
    keep.sort_by(|a, b| a.path.cmp(&b.path));
    result.keep_dropped = keep;
    result
}

/// The manifest files to fetch, most popular first (rank, then path), with the space each
/// needs; and how many are already held as listed.
fn wanted_files<'a>(
    manifest: &'a Manifest,
    held_by_path: &HashMap<&str, &HeldFile>,
) -> (Vec<Wanted<'a>>, u64) {
    let mut wanted = Vec::new();
    let mut held_ok = 0u64;
    let mut seen: HashSet<&str> = HashSet::with_capacity(manifest.files.len());
    for file in &manifest.files {
        if !seen.insert(file.path.as_str()) {
            continue;
        }
        match held_by_path.get(file.path.as_str()) {
            Some(held) if held.sha256 == file.sha256 && held.size_bytes == file.size_bytes => {
                held_ok = held_ok.saturating_add(1);
            }
            Some(held) => wanted.push(Wanted {
                file,
                growth_bytes: file.size_bytes.saturating_sub(held.size_bytes),
            }),
            None => wanted.push(Wanted {
                file,
                growth_bytes: file.size_bytes,
            }),
        }
    }
    wanted.sort_by(|a, b| (a.file.rank, &a.file.path).cmp(&(b.file.rank, &b.file.path)));
    (wanted, held_ok)
}

/// Held files not in the manifest, split into those past their grace period (by path) and
/// those still within it. A file newly missing is dropped since now with an unknown rank; one
/// already dropped keeps its earlier `since` and rank. Dropped entries no longer held, or back
/// in the manifest, are forgotten.
fn dropped_files(
    input: &PlanInput,
    manifest_by_path: &HashMap<&str, &ManifestFile>,
) -> (Vec<DroppedHeld>, Vec<DroppedHeld>) {
    let mut known: HashMap<&str, &Dropped> = HashMap::with_capacity(input.dropped.len());
    for dropped in input.dropped {
        known
            .entry(dropped.path.as_str())
            .and_modify(|earlier| {
                if dropped.since_unix_s < earlier.since_unix_s {
                    *earlier = dropped;
                }
            })
            .or_insert(dropped);
    }
    let mut seen: HashSet<&str> = HashSet::with_capacity(input.held.len());
    let mut expired = Vec::new();
    let mut in_grace = Vec::new();
    for held in input.held {
        let path = held.path.as_str();
        if manifest_by_path.contains_key(path) || !seen.insert(path) {
            continue;
        }
        let dropped = match known.get(path) {
            Some(known) => Dropped::clone(known),
            None => Dropped {
                path: held.path.clone(),
                since_unix_s: input.now_unix_s,
                last_rank: u64::MAX,
            },
        };
        let deadline_unix_s = dropped.since_unix_s.saturating_add(input.delete_grace_s);
        let file = DroppedHeld {
            dropped,
            size_bytes: held.size_bytes,
        };
        if input.now_unix_s >= deadline_unix_s {
            expired.push(file);
        } else {
            in_grace.push(file);
        }
    }
    expired.sort_by(|a, b| a.dropped.path.cmp(&b.dropped.path));
    (expired, in_grace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;
    const GRACE: u64 = 86_400;

    fn sha(byte: u8) -> [u8; 32] {
        [byte; 32]
    }

    /// A manifest file `(path, size_bytes, sha byte, rank)`.
    fn wanted(path: &str, size_bytes: u64, sha_byte: u8, rank: u64) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            size_bytes,
            sha256: sha(sha_byte),
            rank,
        }
    }

    fn held(path: &str, size_bytes: u64, sha_byte: u8) -> HeldFile {
        HeldFile {
            path: path.into(),
            size_bytes,
            sha256: sha(sha_byte),
        }
    }

    fn dropped(path: &str, since_unix_s: u64, last_rank: u64) -> Dropped {
        Dropped {
            path: path.into(),
            since_unix_s,
            last_rank,
        }
    }

    struct Case {
        manifest: Vec<ManifestFile>,
        held: Vec<HeldFile>,
        dropped: Vec<Dropped>,
        free_bytes: u64,
    }

    fn paths(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|path| path.to_string()).collect()
    }

    fn check(input: Case, expected: Plan) {
        let manifest = Manifest {
            version: 1,
            generated_at: "2026-11-23T02:00:00Z".into(),
            files: input.manifest,
        };
        let actual = plan(&PlanInput {
            manifest: &manifest,
            held: &input.held,
            dropped: &input.dropped,
            free_bytes: input.free_bytes,
            now_unix_s: NOW,
            delete_grace_s: GRACE,
        });
        assert_eq!(actual, expected);
    }

    #[test]
    fn plan_what_to_fetch() {
        // Empty store: everything, by rank then path.
        check(
            Case {
                manifest: vec![
                    wanted("/c", 10, 1, 2),
                    wanted("/b", 10, 1, 1),
                    wanted("/a", 10, 1, 2),
                ],
                held: vec![],
                dropped: vec![],
                free_bytes: 1_000,
            },
            Plan {
                fetch: vec![
                    wanted("/b", 10, 1, 1),
                    wanted("/a", 10, 1, 2),
                    wanted("/c", 10, 1, 2),
                ],
                ..Plan::default()
            },
        );
        // Empty manifest, empty store.
        check(
            Case {
                manifest: vec![],
                held: vec![],
                dropped: vec![],
                free_bytes: 0,
            },
            Plan::default(),
        );
        // All held.
        check(
            Case {
                manifest: vec![wanted("/a", 10, 1, 1), wanted("/b", 20, 2, 2)],
                held: vec![held("/b", 20, 2), held("/a", 10, 1)],
                dropped: vec![],
                free_bytes: 0,
            },
            Plan {
                held_ok: 2,
                ..Plan::default()
            },
        );
        // Changed checksum or size: fetched again; only growth needs space.
        check(
            Case {
                manifest: vec![
                    wanted("/a", 10, 9, 1),
                    wanted("/b", 25, 2, 2),
                    wanted("/c", 5, 3, 3),
                ],
                held: vec![held("/a", 10, 1), held("/b", 20, 2), held("/c", 5, 3)],
                dropped: vec![],
                free_bytes: 5,
            },
            Plan {
                fetch: vec![wanted("/a", 10, 9, 1), wanted("/b", 25, 2, 2)],
                held_ok: 1,
                ..Plan::default()
            },
        );
        // A duplicated manifest path counts once.
        check(
            Case {
                manifest: vec![wanted("/a", 10, 1, 1), wanted("/a", 10, 2, 1)],
                held: vec![held("/a", 10, 1)],
                dropped: vec![],
                free_bytes: 100,
            },
            Plan {
                held_ok: 1,
                ..Plan::default()
            },
        );
    }

    #[test]
    fn plan_dropped_files() {
        // Newly missing: dropped since now, rank unknown; an earlier `since` is kept.
        check(
            Case {
                manifest: vec![wanted("/a", 10, 1, 1)],
                held: vec![held("/a", 10, 1), held("/old", 10, 1), held("/new", 10, 1)],
                dropped: vec![dropped("/old", NOW - 10, 7)],
                free_bytes: 0,
            },
            Plan {
                keep_dropped: vec![dropped("/new", NOW, u64::MAX), dropped("/old", NOW - 10, 7)],
                held_ok: 1,
                ..Plan::default()
            },
        );
        // Past the grace period (exactly at it counts): deleted.
        check(
            Case {
                manifest: vec![],
                held: vec![held("/z", 10, 1), held("/y", 10, 1), held("/x", 10, 1)],
                dropped: vec![
                    dropped("/z", NOW - GRACE, 1),
                    dropped("/y", NOW - GRACE - 1, 1),
                    dropped("/x", NOW - GRACE + 1, 1),
                ],
                free_bytes: 0,
            },
            Plan {
                delete: paths(&["/y", "/z"]),
                keep_dropped: vec![dropped("/x", NOW - GRACE + 1, 1)],
                ..Plan::default()
            },
        );
        // Back in the manifest: no longer dropped; a dropped entry no longer held is forgotten.
        check(
            Case {
                manifest: vec![wanted("/back", 10, 1, 3)],
                held: vec![held("/back", 10, 1)],
                dropped: vec![dropped("/back", 0, 3), dropped("/gone", 0, 3)],
                free_bytes: 0,
            },
            Plan {
                held_ok: 1,
                ..Plan::default()
            },
        );
        // A `since` in the future (clock stepped back) waits; a huge one never overflows.
        check(
            Case {
                manifest: vec![],
                held: vec![held("/a", 10, 1), held("/b", 10, 1)],
                dropped: vec![dropped("/a", NOW + 5, 1), dropped("/b", u64::MAX, 1)],
                free_bytes: 0,
            },
            Plan {
                keep_dropped: vec![dropped("/a", NOW + 5, 1), dropped("/b", u64::MAX, 1)],
                ..Plan::default()
            },
        );
    }

    #[test]
    fn plan_space() {
        // Expired deletions free space first; then in-grace files go, least popular first,
        // ties by path; the most popular dropped file survives.
        check(
            Case {
                manifest: vec![wanted("/new1", 30, 1, 1), wanted("/new2", 30, 1, 2)],
                held: vec![
                    held("/expired", 10, 1),
                    held("/hot", 20, 1),
                    held("/cold-b", 20, 1),
                    held("/cold-a", 20, 1),
                    held("/unknown", 5, 1),
                ],
                dropped: vec![
                    dropped("/expired", 0, 1),
                    dropped("/hot", NOW, 2),
                    dropped("/cold-b", NOW, 50),
                    dropped("/cold-a", NOW, 50),
                ],
                free_bytes: 20,
            },
            Plan {
                fetch: vec![wanted("/new1", 30, 1, 1), wanted("/new2", 30, 1, 2)],
                delete: paths(&["/expired", "/unknown", "/cold-a", "/cold-b"]),
                keep_dropped: vec![dropped("/hot", NOW, 2)],
                ..Plan::default()
            },
        );
        // Too big even after deleting every dropped file: cannot fit, nothing deleted for it,
        // and a smaller, less popular file still fits in the free space.
        check(
            Case {
                manifest: vec![
                    wanted("/big", 100, 1, 1),
                    wanted("/small", 10, 1, 2),
                    wanted("/medium", 40, 1, 3),
                ],
                held: vec![held("/d", 20, 1)],
                dropped: vec![dropped("/d", NOW, 9)],
                free_bytes: 30,
            },
            Plan {
                fetch: vec![wanted("/small", 10, 1, 2), wanted("/medium", 40, 1, 3)],
                delete: paths(&["/d"]),
                cannot_fit: paths(&["/big"]),
                ..Plan::default()
            },
        );
        // Held manifest files are never deleted for room; exact fit counts as fitting.
        check(
            Case {
                manifest: vec![
                    wanted("/keep", 50, 1, 9),
                    wanted("/a", 10, 1, 1),
                    wanted("/b", 11, 1, 1),
                ],
                held: vec![held("/keep", 50, 1)],
                dropped: vec![],
                free_bytes: 10,
            },
            Plan {
                fetch: vec![wanted("/a", 10, 1, 1)],
                cannot_fit: paths(&["/b"]),
                held_ok: 1,
                ..Plan::default()
            },
        );
        // Sizes near u64::MAX do not overflow.
        check(
            Case {
                manifest: vec![wanted("/a", u64::MAX, 1, 1), wanted("/b", 1, 1, 2)],
                held: vec![held("/x", u64::MAX, 1)],
                dropped: vec![dropped("/x", NOW, 1)],
                free_bytes: u64::MAX,
            },
            Plan {
                fetch: vec![wanted("/a", u64::MAX, 1, 1), wanted("/b", 1, 1, 2)],
                delete: paths(&["/x"]),
                ..Plan::default()
            },
        );
    }
}
