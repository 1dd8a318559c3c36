//! The files of a data directory by name (`log-<first index>.seg`, `snapshot-<index>.snap`,
//! `*.tmp`), and the file operations whose order crash safety rests on: a segment is created
//! synced, and segments are removed one at a time with a directory sync after each.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::ids::LogIndex;

pub(super) fn segment_path(dir: &Path, first: LogIndex) -> PathBuf {
    dir.join(format!("log-{:020}.seg", first.0))
}

pub(super) fn snapshot_path(dir: &Path, index: LogIndex) -> PathBuf {
    dir.join(format!("snapshot-{:020}.snap", index.0))
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The files of a data directory: snapshots and segments, each sorted by index.
pub(in crate::storage) struct Listing {
    pub(in crate::storage) snapshots: Vec<(LogIndex, PathBuf)>,
    pub(in crate::storage) segments: Vec<(LogIndex, PathBuf)>,
    pub(super) temporaries: Vec<PathBuf>,
}

pub(in crate::storage) fn list(dir: &Path) -> Result<Listing> {
    let mut listing = Listing {
        snapshots: Vec::new(),
        segments: Vec::new(),
        temporaries: Vec::new(),
    };
    for item in fs::read_dir(dir)? {
        let path = item?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let index = |prefix: &str, suffix: &str| {
            name.strip_prefix(prefix)
                .and_then(|n| n.strip_suffix(suffix))
                .and_then(|n| n.parse::<u64>().ok())
                .map(LogIndex)
        };
        if let Some(i) = index("snapshot-", ".snap") {
            listing.snapshots.push((i, path));
        } else if let Some(i) = index("log-", ".seg") {
            listing.segments.push((i, path));
        } else if name.ends_with(".tmp") {
            listing.temporaries.push(path);
        }
    }
    listing.snapshots.sort();
    listing.segments.sort();
    Ok(listing)
}

/// Creates an empty segment file, synced (the directory is synced by the caller).
pub(super) fn create_segment(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    file.sync_all()?;
    Ok(file)
}

/// Deletes segment files in the order given, syncing the directory after each, so that a crash
/// persists a prefix of the deletions (keeping the log contiguous).
pub(super) fn remove_segments<'a>(
    dir: &Path,
    paths: impl Iterator<Item = &'a PathBuf>,
) -> io::Result<()> {
    for path in paths {
        fs::remove_file(path)?;
        sync_dir(dir)?;
    }
    Ok(())
}
