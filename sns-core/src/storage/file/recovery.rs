//! Opening a data directory: reading the snapshot, the segments, the last-segment marker and
//! the commit index, checking that together they hold one log with nothing missing, and only
//! then changing files (cutting a torn tail, removing what an interrupted compaction left,
//! and, when repairing, cutting the log at the first damage).
//!
//! What counts as what (the module documentation of `file` says why):
//! - **Torn tail**, cut with a WARN: in the newest segment, the first record that is not
//!   whole (the file ends inside its header or body, its length is 0 or over the maximum, or
//!   its checksum fails), when no byte offset from there to the end of the file starts a whole
//!   record that passes its checksum, decodes and has an index at or after the bad one's; and
//!   the cut leaves every entry the snapshot and the commit index say existed.
//! - **Damage**, refused (or cut away by a repair): everything else that is wrong. A whole
//!   record that passes its checksum but does not decode or breaks index continuity; a bad
//!   record followed by a valid one; any bad record in an earlier segment (those were synced
//!   before the next segment began); a missing or misnamed segment; a log that stops before the
//!   segment the last-segment marker names, or before the commit index; no segment at all next
//!   to a snapshot; a damaged snapshot or marker.
//!
//! A repair cuts the log at the first damage: the damaged segment is truncated there (or, for
//! a missing segment, the log ends where the last one present ends) and every later segment is
//! removed. Damage that lies wholly within what the snapshot covers costs only those old
//! segments: they are removed and the log after the snapshot is kept. A damaged snapshot is
//! dropped only when the log still starts at index 1, so replaying it loses nothing.
//!
//! Telling a torn tail from damage after a segment's first bad record is `recovery/tail.rs`.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use super::Opened;
use super::format::{CommitFile, parse_segment, read_commit, read_snapshot};
use super::index::{LogMap, SegmentMap};
use super::layout::{create_segment, list, remove_segments, segment_path, sync_dir};
use super::marker::{LAST_SEGMENT_FILE, Marker, read_last_segment, write_last_segment};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::LogIndex;
use crate::storage::positions::Positions;
use crate::storage::{Recovered, Snapshot};

mod tail;

use tail::{Tail, classify};

/// Where damage sits, for cutting it away.
enum Location {
    /// Before the segment at `path` (a gap or an overlap): the segment is not part of the log.
    Before { path: PathBuf, records: u64 },
    /// Inside the kept segment at `path`, at byte `offset`; `records` valid ones after it.
    Within {
        path: PathBuf,
        offset: u64,
        records: u64,
    },
    /// Nowhere in particular (a missing newest segment, a damaged marker).
    Nowhere,
}

/// A truncation of a segment file.
struct Cut {
    path: PathBuf,
    offset: u64,
}

/// The open scan: what it has kept and what it will change once everything checked out.
struct Scan<'a> {
    dir: &'a Path,
    repair: bool,
    /// The index the snapshot covers up to (0 without one).
    base: LogIndex,
    /// The kept segments, contiguous, and what they hold.
    kept: Vec<SegmentMap>,
    entries: Vec<LogEntry>,
    positions: Positions,
    /// The index after the last record kept, once a segment is kept.
    end: Option<LogIndex>,
    /// The log was cut (torn tail or repair): every later segment goes.
    stopped: bool,
    cut: Option<Cut>,
    /// A torn tail cut (segment, byte), for the commit check's message.
    torn: Option<(PathBuf, u64)>,
    /// Segments to remove oldest first: covered by the snapshot.
    covered: Vec<PathBuf>,
    /// Segments after the cut, removed newest first.
    later: Vec<PathBuf>,
    /// Snapshot files to remove: older ones, and damaged ones a repair dropped.
    stale_snapshots: Vec<PathBuf>,
    marker: Marker,
    /// The commit index to persist again, lowered by a repair.
    reset_commit: Option<LogIndex>,
    /// Valid records a repair dropped, and the damage it cut away.
    dropped_records: u64,
    repaired: Vec<String>,
    /// Said at WARN when the changes are made.
    warnings: Vec<String>,
}

/// Opens the directory's contents: checks everything, then makes the changes (see the module
/// documentation), and builds the in-memory index.
pub(super) fn open_log(dir: &Path, repair: bool) -> Result<Opened> {
    let listing = list(dir)?;
    let mut scan = Scan {
        dir,
        repair,
        base: LogIndex(0),
        kept: Vec::new(),
        entries: Vec::new(),
        positions: Positions::default(),
        end: None,
        stopped: false,
        cut: None,
        torn: None,
        covered: Vec::new(),
        later: Vec::new(),
        stale_snapshots: Vec::new(),
        marker: read_last_segment(dir)?,
        reset_commit: None,
        dropped_records: 0,
        repaired: Vec::new(),
        warnings: Vec::new(),
    };
    let snapshot = scan.snapshot(&listing.snapshots, listing.segments.first().map(|s| s.0))?;
    scan.check_marker(&listing.segments)?;
    if listing.segments.is_empty()
        && let Some((snapshot, path)) = &snapshot
    {
        scan.damage(
            scan.base.next(),
            format!(
                "there is no log segment, though snapshot {} shows the log reached index {}",
                path.display(),
                snapshot.index
            ),
            Location::Nowhere,
        )?;
    }
    let count = listing.segments.len();
    for (position, (first, path)) in listing.segments.into_iter().enumerate() {
        scan.segment(first, path, position + 1 == count)?;
    }
    let last = scan.settle();
    let commit = read_commit(dir)?;
    if commit > last {
        let torn = scan
            .torn
            .as_ref()
            .map(|(path, at)| {
                format!(
                    " (once its torn end at byte {at} of {} is cut)",
                    path.display()
                )
            })
            .unwrap_or_default();
        scan.damage(
            last.next(),
            format!(
                "the commit file says entries up to {commit} were committed, but the log ends at \
                 {last}{torn}"
            ),
            Location::Nowhere,
        )?;
        scan.reset_commit = Some(last);
    }
    for tmp in &listing.temporaries {
        fs::remove_file(tmp)?;
    }
    scan.apply(snapshot, last)
}

impl Scan<'_> {
    /// Damage at log index `index`: refused, or (repairing) cut away. Damage `Nowhere` in
    /// particular is only noted (what it lost is lost; the walk goes on).
    fn damage(&mut self, index: LogIndex, message: String, at: Location) -> Result<()> {
        if !self.repair {
            return Err(Error::Corrupt(message));
        }
        self.repaired.push(message);
        match at {
            Location::Nowhere => {}
            at if index <= self.base => {
                // Only the snapshot's part of the log is damaged: drop it, keep what follows.
                self.dropped_records += self.kept_records();
                if let Location::Within { records, .. } = at {
                    self.dropped_records += records;
                }
                self.covered.extend(self.kept.drain(..).map(|s| s.path));
                self.entries.clear();
                self.positions.clear();
                self.end = None;
            }
            Location::Before { path, records } => {
                self.stopped = true;
                self.dropped_records += records;
                self.later.push(path);
            }
            Location::Within {
                path,
                offset,
                records,
            } => {
                self.stopped = true;
                self.dropped_records += records;
                self.cut = Some(Cut { path, offset });
            }
        }
        Ok(())
    }

    /// Records held by the kept segments.
    fn kept_records(&self) -> u64 {
        match (self.kept.first(), self.end) {
            (Some(first), Some(end)) => end.0 - first.first.0,
            _ => 0,
        }
    }

    /// Reads the newest snapshot that is intact (a repair drops damaged ones, as long as the
    /// log reaches back far enough to replace them); older snapshots are left to remove.
    fn snapshot(
        &mut self,
        snapshots: &[(LogIndex, PathBuf)],
        log_start: Option<LogIndex>,
    ) -> Result<Option<(Snapshot, PathBuf)>> {
        let mut chosen = None;
        let mut dropped = Vec::new();
        for (index, path) in snapshots.iter().rev() {
            if chosen.is_some() {
                self.stale_snapshots.push(path.clone());
                continue;
            }
            let read = read_snapshot(path).and_then(|snapshot| {
                if snapshot.index == *index {
                    Ok(snapshot)
                } else {
                    Err(Error::Corrupt(format!(
                        "snapshot {} is damaged: it holds index {}",
                        path.display(),
                        snapshot.index
                    )))
                }
            });
            match read {
                Ok(snapshot) => chosen = Some((snapshot, path.clone())),
                Err(Error::Corrupt(why)) if self.repair => dropped.push((path.clone(), why)),
                Err(e) => return Err(e),
            }
        }
        self.base = chosen.as_ref().map(|(s, _)| s.index).unwrap_or_default();
        if let Some((_, why)) = dropped.first() {
            if log_start.is_none_or(|first| first > self.base.next()) {
                let log = match log_start {
                    Some(first) => format!("the log starts at index {first}"),
                    None => "there is no log".to_string(),
                };
                return Err(Error::Corrupt(format!(
                    "{why}; {log}, so the entries before it exist nowhere else and a repair \
                     cannot replace the snapshot"
                )));
            }
            for (path, why) in dropped {
                self.repaired.push(why);
                self.stale_snapshots.push(path);
            }
        }
        Ok(chosen)
    }

    /// Checks that the segment the last-segment marker names is there.
    fn check_marker(&mut self, segments: &[(LogIndex, PathBuf)]) -> Result<()> {
        match self.marker.clone() {
            Marker::Absent => {
                if !segments.is_empty() {
                    self.warnings.push(format!(
                        "no {LAST_SEGMENT_FILE} file in the data directory (written since this \
                         version): recording the newest segment"
                    ));
                }
                Ok(())
            }
            Marker::Damaged(why) => self.damage(
                LogIndex(0),
                format!(
                    "{} is damaged ({why})",
                    self.dir.join(LAST_SEGMENT_FILE).display()
                ),
                Location::Nowhere,
            ),
            Marker::Names(first) if segments.iter().any(|(f, _)| *f == first) => Ok(()),
            Marker::Names(first) => self.damage(
                first,
                format!(
                    "log segment {} is missing (the {LAST_SEGMENT_FILE} file records it as the \
                     newest); its entries from index {first} on are lost",
                    segment_path(self.dir, first).display()
                ),
                Location::Nowhere,
            ),
        }
    }

    /// Reads, checks and keeps (or drops) the segment starting at `first`.
    fn segment(&mut self, first: LogIndex, path: PathBuf, newest: bool) -> Result<()> {
        let bytes = fs::read(&path)?;
        let (found, valid, damage) = parse_segment(&bytes, first);
        if self.stopped {
            self.dropped_records += found.len() as u64;
            self.later.push(path);
            return Ok(());
        }
        let records = found.len() as u64;
        while let Some((index, message)) = self.gap(first, &path) {
            let at = Location::Before {
                path: path.clone(),
                records,
            };
            self.damage(index, message, at)?;
            if self.stopped {
                return Ok(());
            }
        }
        let end = self.keep(first, path.clone(), &bytes[..valid], found);
        let Some(why) = damage else {
            return Ok(());
        };
        let tail = classify(&bytes, valid, end);
        let place = format!(
            "segment {} is damaged at byte {valid} (record index {end}: {why})",
            path.display()
        );
        let (message, records) = match tail {
            Tail::Torn if newest && end > self.base => {
                self.warnings.push(format!(
                    "cutting a torn log tail: {} from byte {valid} on ({} bytes: {why}); the \
                     records before it are kept",
                    path.display(),
                    bytes.len() - valid
                ));
                self.torn = Some((path.clone(), valid as u64));
                self.cut = Some(Cut {
                    path,
                    offset: valid as u64,
                });
                self.stopped = true;
                return Ok(());
            }
            _ if !newest => (
                format!("{place}, and later segments hold synced records"),
                match tail {
                    Tail::ValidAfter { records, .. } => records,
                    Tail::Torn | Tail::BadRecord => 0,
                },
            ),
            Tail::Torn => (
                format!(
                    "{place}, and the snapshot shows entries up to {} were written",
                    self.base
                ),
                0,
            ),
            Tail::BadRecord => (
                format!("{place}; a whole, checksummed record cannot be a torn write"),
                0,
            ),
            Tail::ValidAfter { offset, records } => (
                format!("{place}, and valid records follow it (from byte {offset})"),
                records,
            ),
        };
        self.damage(
            end,
            message,
            Location::Within {
                path,
                offset: valid as u64,
                records,
            },
        )
    }

    /// Where a segment starting at `first` (at `path`) starts, against where the log so far
    /// ends: the first missing or doubled index and what is wrong there, if anything is.
    /// Clears what an interrupted compaction to a snapshot ahead of the log left, which is
    /// not damage.
    fn gap(&mut self, first: LogIndex, path: &Path) -> Option<(LogIndex, String)> {
        match self.end {
            None if first > self.base.next() => Some((
                self.base.next(),
                format!(
                    "entries {}..={} are missing: the log starts at {}{}",
                    self.base.next(),
                    first.0 - 1,
                    path.display(),
                    match self.base {
                        LogIndex(0) => " and there is no snapshot".to_string(),
                        base => format!(" but the snapshot ends at {base}"),
                    }
                ),
            )),
            None => None,
            Some(end) if first == end => None,
            Some(end) if first == self.base.next() && end < first => {
                // What a compaction to a snapshot ahead of the log leaves when it is
                // interrupted: old segments before the new one (all covered).
                self.warnings.push(format!(
                    "removing {} segment(s) left by an interrupted compaction (they end at \
                     index {}, before the snapshot at {})",
                    self.kept.len(),
                    end.0 - 1,
                    self.base
                ));
                self.covered.extend(self.kept.drain(..).map(|s| s.path));
                self.entries.clear();
                self.positions.clear();
                self.end = None;
                None
            }
            Some(end) if first > end => Some((
                end,
                format!(
                    "entries {end}..={} are missing: {}, and the next segment is {}",
                    first.0 - 1,
                    match self.kept.last() {
                        Some(prev) if prev.first == end => {
                            format!("segment {} holds no record", prev.path.display())
                        }
                        Some(prev) => format!(
                            "segment {} stops at index {}",
                            prev.path.display(),
                            end.0 - 1
                        ),
                        None => "no segment holds them".to_string(),
                    },
                    path.display()
                ),
            )),
            Some(end) => Some((
                end,
                format!(
                    "segment {} starts at index {first}, inside the previous segment (which \
                     ends at {})",
                    path.display(),
                    end.0 - 1
                ),
            )),
        }
    }

    /// Keeps the segment starting at `first` whose valid records are `valid`, holding
    /// `found`; returns the index after its last entry.
    fn keep(
        &mut self,
        first: LogIndex,
        path: PathBuf,
        valid: &[u8],
        found: Vec<LogEntry>,
    ) -> LogIndex {
        let mut segment = SegmentMap::new(first, path);
        segment.note_records(valid, first, 0);
        segment.len = valid.len() as u64;
        let end = LogIndex(first.0 + found.len() as u64);
        self.end = Some(end);
        for entry in found {
            self.positions.push(entry.event.id, entry.index);
            if entry.index > self.base {
                self.entries.push(entry);
            }
        }
        self.kept.push(segment);
        end
    }

    /// After the walk: a log that ends before the snapshot restarts after it (what an
    /// interrupted compaction to a snapshot ahead of the log leaves). Returns the last index.
    fn settle(&mut self) -> LogIndex {
        let end = self.end.unwrap_or(self.base.next());
        if !self.kept.is_empty() && end <= self.base {
            self.warnings.push(format!(
                "the log ends at index {}, before the snapshot at {}: a compaction was \
                 interrupted; the log restarts after the snapshot",
                end.0 - 1,
                self.base
            ));
            self.covered.extend(self.kept.drain(..).map(|s| s.path));
            self.entries.clear();
            self.positions.clear();
            self.cut = None;
        }
        if self.kept.is_empty() {
            self.base
        } else {
            LogIndex(end.0 - 1)
        }
    }

    /// Makes the changes, in an order a crash can interrupt anywhere (each step leaves a
    /// directory the next open accepts or repairs again the same way).
    fn apply(mut self, snapshot: Option<(Snapshot, PathBuf)>, last: LogIndex) -> Result<Opened> {
        for warning in &self.warnings {
            tracing::warn!("{warning}");
        }
        if !self.repaired.is_empty() {
            tracing::warn!(
                damage = %self.repaired.join("; "),
                "repair: cut the damage away, dropping {} valid record(s) and {} segment \
                 file(s); the log now ends at index {last}",
                self.dropped_records,
                self.covered.len() + self.later.len(),
            );
        }
        let dir = self.dir;
        // A new segment first, then the marker, then removals: a crash leaves the marker
        // naming a segment that exists.
        if self.kept.is_empty() {
            let first = last.next();
            let path = segment_path(dir, first);
            create_segment(&path)?;
            sync_dir(dir)?;
            self.kept.push(SegmentMap::new(first, path));
        }
        let newest = self.kept.last().map(|s| s.first).unwrap_or(last.next());
        if self.marker != Marker::Names(newest) {
            write_last_segment(dir, newest)?;
        }
        // Newest first, so a crash leaves a contiguous log.
        remove_segments(dir, self.later.iter().rev())?;
        if let Some(cut) = &self.cut {
            let file = OpenOptions::new().write(true).open(&cut.path)?;
            file.set_len(cut.offset)?;
            file.sync_all()?;
        }
        // Oldest first, as compaction does.
        remove_segments(dir, self.covered.iter())?;
        for path in &self.stale_snapshots {
            fs::remove_file(path)?;
        }
        let mut commit_file = CommitFile::open(dir)?;
        if let Some(index) = self.reset_commit {
            commit_file.reset(index)?;
        }
        sync_dir(dir)?;
        let commit = commit_file.persisted;
        let active = self
            .kept
            .last()
            .ok_or_else(|| Error::Corrupt("no log segment after the open".to_string()))?;
        let file = OpenOptions::new().write(true).open(&active.path)?;
        let file_len = active.len;
        let allocated = file.metadata()?.len().max(file_len);
        let (snapshot, snapshot_file) = match snapshot {
            Some((snapshot, path)) => {
                let index = snapshot.index;
                (Some(snapshot), Some((index, path)))
            }
            None => (None, None),
        };
        Ok(Opened {
            recovered: Recovered {
                snapshot,
                entries: self.entries,
                commit,
            },
            map: LogMap {
                segments: self.kept,
                last,
                snapshot: snapshot_file,
                commit,
                positions: self.positions,
                generation: 0,
            },
            file,
            file_len,
            allocated,
            next: last.next(),
            commit: commit_file,
        })
    }
}
