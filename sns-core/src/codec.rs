//! A small, explicit binary codec (little-endian, fixed width) for log records and snapshots.
//!
//! Decoding never panics: every read is bounds-checked and a short or malformed buffer is
//! [`Error::Corrupt`].

use crate::error::{Error, Result};

/// Appends fixed-width little-endian values to a buffer.
#[derive(Debug, Default)]
pub(crate) struct Encoder {
    pub(crate) buf: Vec<u8>,
}

impl Encoder {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A length-prefixed UTF-8 string.
    pub(crate) fn str(&mut self, v: &str) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(v.as_bytes());
    }
    /// A collection length.
    pub(crate) fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }
}

/// Reads what [`Encoder`] wrote, failing cleanly on anything short or malformed.
#[derive(Debug)]
pub(crate) struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(Error::Corrupt(format!(
                "record ends early: wanted {n} bytes, {} left",
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }
    pub(crate) fn i64(&mut self) -> Result<i64> {
        self.array().map(i64::from_le_bytes)
    }
    pub(crate) fn str(&mut self) -> Result<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|e| Error::Corrupt(format!("bad UTF-8: {e}")))
    }
    /// A collection length, checked against what is left so a corrupt length cannot make the
    /// caller reserve absurd amounts of memory (each element takes at least `min_size` bytes).
    pub(crate) fn len(&mut self, min_size: usize) -> Result<usize> {
        let n = self.u64()?;
        let max = (self.rest.len() / min_size.max(1)) as u64;
        if n > max {
            return Err(Error::Corrupt(format!(
                "collection of {n} elements cannot fit in {} bytes",
                self.rest.len()
            )));
        }
        Ok(n as usize)
    }
    /// Whether everything has been read (for a trailing section that older writers omit).
    pub(crate) fn at_end(&self) -> bool {
        self.rest.is_empty()
    }
    pub(crate) fn finish(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::Corrupt(format!(
                "{} unexpected bytes after the record",
                self.rest.len()
            )))
        }
    }
}
