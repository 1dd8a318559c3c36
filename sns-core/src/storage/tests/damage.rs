//! Every kind of damage to a data directory, as one table. Each case damages a freshly built
//! directory and says what opening it must do: refuse with a message naming the damage (and
//! change no file), or recover exactly the entries listed; then the same with repair on. After
//! a repair, a plain open accepts the directory and finds the same entries.

use std::fs;
use std::path::{Path, PathBuf};

use super::{
    DamageFixture, entries, files_of, first_held, fixture_options, name_of, read_all_from, runtime,
};
use crate::error::Error;
use crate::ids::LogIndex;
use crate::storage::{FileStorage, FileStorageOptions, Storage};

/// How the directory of a case is built.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// [`DamageFixture`]: entries 1..=22 in segments of four (1, 5, 9, 13, 17, 21), a
    /// snapshot at 6, every segment kept.
    Segments,
    /// Entries 1..=5 in one segment, commit index 3, no snapshot.
    OneSegment,
}

/// A built directory and where its records are.
struct Built {
    dir: tempfile::TempDir,
    /// First index and path of each segment, oldest first.
    segments: Vec<(u64, PathBuf)>,
    /// Per segment, the byte offset where each of its records ends.
    ends: Vec<Vec<usize>>,
}

impl Built {
    fn new(layout: Layout) -> Self {
        match layout {
            Layout::Segments => {
                let fixture = DamageFixture::new(&runtime());
                let ends = (0..fixture.segments.len())
                    .map(|k| fixture.record_ends(k))
                    .collect();
                let firsts: Vec<u64> = fixture.segments.iter().map(|s| s.0).collect();
                assert_eq!(firsts, [1, 5, 9, 13, 17, 21], "the layout the cases assume");
                assert_eq!(fixture.snapshot, 6);
                Self {
                    segments: fixture.segments,
                    dir: fixture.dir,
                    ends,
                }
            }
            Layout::OneSegment => {
                let dir = tempfile::tempdir().expect("temp dir");
                runtime().block_on(async {
                    let storage =
                        FileStorage::open_with(dir.path(), super::without_room()).expect("open");
                    storage.append(entries(1..=5)).await.expect("append");
                    storage.set_commit(LogIndex(3));
                });
                let segments = vec![(1, dir.path().join(format!("log-{:020}.seg", 1)))];
                let mut framed = Vec::new();
                let mut ends = Vec::new();
                for e in entries(1..=5) {
                    super::frame(&mut framed, &e);
                    ends.push(framed.len());
                }
                assert_eq!(fs::read(&segments[0].1).expect("read"), framed);
                Self {
                    dir,
                    segments,
                    ends: vec![ends],
                }
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The segment starting at `first`.
    fn segment(&self, first: u64) -> &Path {
        &self
            .segments
            .iter()
            .find(|s| s.0 == first)
            .expect("a segment")
            .1
    }

    fn name(&self, first: u64) -> String {
        name_of(self.segment(first))
    }

    /// The byte offset where the record with index `index` starts in its segment.
    fn offset_of(&self, index: u64) -> (u64, usize) {
        let k = self
            .segments
            .iter()
            .rposition(|s| s.0 <= index)
            .expect("a segment holds it");
        let nth = (index - self.segments[k].0) as usize;
        let start = nth.checked_sub(1).map_or(0, |n| self.ends[k][n]);
        (self.segments[k].0, start)
    }

    fn remove(&self, first: u64) {
        fs::remove_file(self.segment(first)).expect("remove segment");
    }

    /// Flips a bit of the payload of the record with index `index`.
    fn flip(&self, index: u64) {
        let (first, start) = self.offset_of(index);
        let path = self.segment(first);
        let mut bytes = fs::read(path).expect("read");
        bytes[start + 12] ^= 0x10;
        fs::write(path, bytes).expect("write");
    }

    /// Cuts the segment starting at `first` to `len` bytes.
    fn cut(&self, first: u64, len: usize) {
        let bytes = fs::read(self.segment(first)).expect("read");
        fs::write(self.segment(first), &bytes[..len]).expect("write");
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        fs::write(self.path().join(name), bytes).expect("write");
    }

    fn snapshot_name(&self) -> String {
        format!("snapshot-{:020}.snap", 6)
    }
}

/// What opening the damaged directory must do.
#[derive(Debug)]
enum Outcome {
    /// Fail with [`Error::Corrupt`] whose message contains each of these, changing no file.
    Refuse(Vec<String>),
    /// Open: the snapshot at this index (if any), the entries after it up to `last`, the
    /// first index still readable, and the commit index.
    Keep {
        snapshot: Option<u64>,
        last: u64,
        first_held: u64,
        commit: u64,
    },
}

fn refuse(parts: &[&str]) -> Outcome {
    Outcome::Refuse(parts.iter().map(|p| p.to_string()).collect())
}

/// Keeps the fixture's snapshot, entries 7..=`last` and the log from index 1.
fn keep(last: u64) -> Outcome {
    Outcome::Keep {
        snapshot: Some(6),
        last,
        first_held: 1,
        commit: 0,
    }
}

struct Case {
    name: &'static str,
    layout: Layout,
    damage: fn(&Built),
    plain: fn(&Built) -> Outcome,
    repaired: fn(&Built) -> Outcome,
}

const CASES: &[Case] = &[
    Case {
        name: "missing only segment",
        layout: Layout::OneSegment,
        damage: |b| b.remove(1),
        plain: |b| refuse(&[&b.name(1), "is missing"]),
        repaired: |_| Outcome::Keep {
            snapshot: None,
            last: 0,
            first_held: 1,
            commit: 0,
        },
    },
    Case {
        name: "missing newest segment",
        layout: Layout::Segments,
        damage: |b| b.remove(21),
        plain: |b| {
            refuse(&[
                &b.name(21),
                "is missing",
                "entries from index 21 on are lost",
            ])
        },
        repaired: |_| keep(20),
    },
    Case {
        name: "missing segment between the snapshot and the newest",
        layout: Layout::Segments,
        damage: |b| b.remove(9),
        plain: |b| refuse(&["entries 9..=12 are missing", &b.name(5), &b.name(13)]),
        repaired: |_| keep(8),
    },
    Case {
        name: "missing segment holding the snapshot's index",
        layout: Layout::Segments,
        damage: |b| b.remove(5),
        plain: |b| refuse(&["entries 5..=8 are missing", &b.name(1), &b.name(9)]),
        // Entries 7 and 8 are gone: the log restarts after the snapshot.
        repaired: |_| Outcome::Keep {
            snapshot: Some(6),
            last: 6,
            first_held: 7,
            commit: 0,
        },
    },
    Case {
        name: "no segment at all beside the snapshot",
        layout: Layout::Segments,
        damage: |b| {
            for first in [1, 5, 9, 13, 17, 21] {
                b.remove(first);
            }
        },
        plain: |b| refuse(&[&b.name(21), "is missing"]),
        repaired: |_| Outcome::Keep {
            snapshot: Some(6),
            last: 6,
            first_held: 7,
            commit: 0,
        },
    },
    Case {
        name: "no segment and no marker beside the snapshot",
        layout: Layout::Segments,
        damage: |b| {
            for first in [1, 5, 9, 13, 17, 21] {
                b.remove(first);
            }
            fs::remove_file(b.path().join("last-segment")).expect("remove marker");
        },
        plain: |b| {
            refuse(&[
                "there is no log segment",
                &b.snapshot_name(),
                "reached index 6",
            ])
        },
        repaired: |_| Outcome::Keep {
            snapshot: Some(6),
            last: 6,
            first_held: 7,
            commit: 0,
        },
    },
    Case {
        name: "segment names say earlier entries existed",
        layout: Layout::Segments,
        damage: |b| {
            for first in [1, 5] {
                b.remove(first);
            }
        },
        plain: |b| {
            refuse(&[
                "entries 7..=8 are missing",
                &b.name(9),
                "the snapshot ends at 6",
            ])
        },
        repaired: |_| Outcome::Keep {
            snapshot: Some(6),
            last: 6,
            first_held: 7,
            commit: 0,
        },
    },
    Case {
        name: "empty log where the commit index says entries existed",
        layout: Layout::OneSegment,
        damage: |b| b.cut(1, 0),
        plain: |_| refuse(&["entries up to 3 were committed", "the log ends at 0"]),
        repaired: |_| Outcome::Keep {
            snapshot: None,
            last: 0,
            first_held: 1,
            commit: 0,
        },
    },
    Case {
        name: "bit flip with valid records after it, newest segment",
        layout: Layout::Segments,
        damage: |b| b.flip(21),
        plain: |b| {
            refuse(&[
                &b.name(21),
                "at byte 0 ",
                "checksum mismatch",
                "valid records follow it",
            ])
        },
        repaired: |_| keep(20),
    },
    Case {
        name: "bit flip with valid records after it, earlier segment",
        layout: Layout::Segments,
        damage: |b| b.flip(10),
        plain: |b| {
            let at = format!("at byte {} ", b.offset_of(10).1);
            refuse(&[&b.name(9), &at, "later segments hold synced records"])
        },
        repaired: |_| keep(9),
    },
    Case {
        name: "bit flip in a segment the snapshot covers",
        layout: Layout::Segments,
        damage: |b| b.flip(2),
        plain: |b| {
            let at = format!("at byte {} ", b.offset_of(2).1);
            refuse(&[&b.name(1), &at, "later segments hold synced records"])
        },
        // Only that segment goes; everything after the snapshot stays.
        repaired: |_| Outcome::Keep {
            snapshot: Some(6),
            last: 22,
            first_held: 5,
            commit: 0,
        },
    },
    Case {
        name: "a whole record that does not continue the log, at the end",
        layout: Layout::Segments,
        damage: |b| {
            // Record 21 again in place of record 22.
            let (_, start) = b.offset_of(22);
            let path = b.segment(21);
            let bytes = fs::read(path).expect("read");
            let mut damaged = bytes[..start].to_vec();
            damaged.extend_from_slice(&bytes[..start]);
            fs::write(path, damaged).expect("write");
        },
        plain: |b| {
            let at = format!("at byte {} ", b.offset_of(22).1);
            refuse(&[&b.name(21), &at, "cannot be a torn write"])
        },
        repaired: |_| keep(21),
    },
    Case {
        name: "torn tail",
        layout: Layout::Segments,
        damage: |b| b.cut(21, b.offset_of(22).1 + 20),
        plain: |_| keep(21),
        repaired: |_| keep(21),
    },
    Case {
        name: "torn tail of zeros",
        layout: Layout::Segments,
        damage: |b| {
            let mut bytes = fs::read(b.segment(21)).expect("read");
            bytes.extend_from_slice(&[0; 100]);
            fs::write(b.segment(21), bytes).expect("write");
        },
        plain: |_| keep(22),
        repaired: |_| keep(22),
    },
    Case {
        name: "torn tail below the commit index",
        layout: Layout::OneSegment,
        damage: |b| b.cut(1, b.offset_of(2).1 + 5),
        plain: |b| {
            let at = format!("torn end at byte {} of", b.offset_of(2).1);
            refuse(&[
                "entries up to 3 were committed",
                "the log ends at 1",
                &at,
                &b.name(1),
            ])
        },
        repaired: |_| Outcome::Keep {
            snapshot: None,
            last: 1,
            first_held: 1,
            commit: 1,
        },
    },
    Case {
        name: "garbage snapshot",
        layout: Layout::Segments,
        damage: |b| {
            b.write(
                &b.snapshot_name(),
                b"not a snapshot at all, just some garbage",
            )
        },
        plain: |b| refuse(&[&b.snapshot_name(), "is damaged", "bad magic"]),
        // The log still starts at 1: replaying it replaces the snapshot.
        repaired: |_| Outcome::Keep {
            snapshot: None,
            last: 22,
            first_held: 1,
            commit: 0,
        },
    },
    Case {
        name: "garbage snapshot, the log compacted",
        layout: Layout::Segments,
        damage: |b| {
            b.write(&b.snapshot_name(), &[0x55; 64]);
            b.remove(1);
        },
        plain: |b| refuse(&[&b.snapshot_name(), "is damaged"]),
        repaired: |b| {
            refuse(&[
                &b.snapshot_name(),
                "the log starts at index 5",
                "a repair cannot replace the snapshot",
            ])
        },
    },
    Case {
        name: "garbage last-segment marker",
        layout: Layout::Segments,
        damage: |b| b.write("last-segment", b"junk"),
        plain: |_| refuse(&["last-segment is damaged"]),
        repaired: |_| keep(22),
    },
];

/// Opens `built` (repairing or not) and checks the outcome.
fn check(built: &Built, repair: bool, expected: &Outcome, what: &str) {
    let before = files_of(built.path());
    let options = FileStorageOptions {
        repair,
        ..fixture_options()
    };
    let opened = FileStorage::open_with(built.path(), options);
    match (opened, expected) {
        (Err(Error::Corrupt(message)), Outcome::Refuse(parts)) => {
            assert!(!message.contains('\n'), "{what}: one line: {message}");
            for part in parts {
                assert!(
                    message.contains(part.as_str()),
                    "{what}: {part:?} in {message}"
                );
            }
            assert_eq!(files_of(built.path()), before, "{what}: no file changed");
        }
        (Ok(storage), Outcome::Keep { .. }) => {
            check_kept(&storage, expected, what);
            drop(storage);
            if repair {
                // A repaired directory opens without repair, holding the same (and the
                // entry the check appended).
                let storage = FileStorage::open_with(built.path(), fixture_options())
                    .unwrap_or_else(|e| panic!("{what}: reopen after the repair: {e}"));
                check_reopened(&storage, expected, what);
            }
        }
        (Err(e), _) => panic!("{what}: expected {expected:?}, got the error {e}"),
        (Ok(_), Outcome::Refuse(parts)) => panic!("{what}: opened, expected a refusal {parts:?}"),
    }
}

fn check_kept(storage: &FileStorage, expected: &Outcome, what: &str) {
    let Outcome::Keep {
        snapshot,
        last,
        first_held: first,
        commit,
    } = *expected
    else {
        return;
    };
    runtime().block_on(async {
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.snapshot.map(|s| s.index.0), snapshot, "{what}");
        let after = snapshot.unwrap_or(0) + 1;
        assert_eq!(back.entries, entries(after..=last), "{what}");
        assert_eq!(back.commit, LogIndex(commit), "{what}");
        assert_eq!(first_held(storage).await, first, "{what}");
        assert_eq!(
            read_all_from(storage, first).await,
            entries(first..=last),
            "{what}"
        );
        storage
            .append(entries(last + 1..=last + 1))
            .await
            .unwrap_or_else(|e| panic!("{what}: append after the open: {e}"));
    });
}

fn check_reopened(storage: &FileStorage, expected: &Outcome, what: &str) {
    let Outcome::Keep {
        snapshot,
        last,
        first_held: first,
        ..
    } = *expected
    else {
        return;
    };
    runtime().block_on(async {
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.snapshot.map(|s| s.index.0), snapshot, "{what}");
        let after = snapshot.unwrap_or(0) + 1;
        assert_eq!(back.entries, entries(after..=last + 1), "{what}");
        assert_eq!(first_held(storage).await, first, "{what}");
    });
}

#[test]
fn every_kind_of_damage_is_refused_or_recovered_exactly() {
    for case in CASES {
        let built = Built::new(case.layout);
        (case.damage)(&built);
        check(&built, false, &(case.plain)(&built), case.name);
    }
}

#[test]
fn a_repair_cuts_every_kind_of_damage_at_the_first_damage() {
    for case in CASES {
        let built = Built::new(case.layout);
        (case.damage)(&built);
        let what = format!("{} (repair)", case.name);
        check(&built, true, &(case.repaired)(&built), &what);
    }
}
