//! The `last-segment` marker: `SNSLAST1`, the newest segment's first index (u64 LE), its crc32.
//! It is replaced atomically whenever the newest segment changes, so that a missing newest
//! segment is noticed (the names of the segments alone cannot tell).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::layout::sync_dir;
use crate::ids::LogIndex;

/// The file naming the newest segment (by its first index).
pub(super) const LAST_SEGMENT_FILE: &str = "last-segment";
const LAST_SEGMENT_MAGIC: &[u8; 8] = b"SNSLAST1";
const LAST_SEGMENT_BYTES: usize = 8 + 8 + 4;

/// Records `first` as the newest segment's first index: written to a temporary file, synced,
/// renamed over the marker and the directory synced, so a crash leaves the old or the new one.
pub(super) fn write_last_segment(dir: &Path, first: LogIndex) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(LAST_SEGMENT_BYTES);
    bytes.extend_from_slice(LAST_SEGMENT_MAGIC);
    bytes.extend_from_slice(&first.0.to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&first.0.to_le_bytes()).to_le_bytes());
    let tmp = dir.join(format!("{LAST_SEGMENT_FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join(LAST_SEGMENT_FILE))?;
    sync_dir(dir)
}

/// What the last-segment marker says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Marker {
    /// No marker: a new directory, or one written before markers existed.
    Absent,
    /// The newest segment starts at this index.
    Names(LogIndex),
    /// The marker cannot be read; why.
    Damaged(String),
}

/// Reads the marker of `dir`; a marker that does not check out is [`Marker::Damaged`].
pub(super) fn read_last_segment(dir: &Path) -> io::Result<Marker> {
    let bytes = match fs::read(dir.join(LAST_SEGMENT_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Marker::Absent),
        Err(e) => return Err(e),
    };
    if bytes.len() != LAST_SEGMENT_BYTES {
        return Ok(Marker::Damaged(format!(
            "{} bytes where {LAST_SEGMENT_BYTES} were expected",
            bytes.len()
        )));
    }
    if &bytes[..8] != LAST_SEGMENT_MAGIC {
        return Ok(Marker::Damaged("bad magic".to_string()));
    }
    let mut index = [0u8; 8];
    index.copy_from_slice(&bytes[8..16]);
    let crc = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    if crc32fast::hash(&index) != crc {
        return Ok(Marker::Damaged("checksum mismatch".to_string()));
    }
    Ok(Marker::Names(LogIndex(u64::from_le_bytes(index))))
}
