//! Memory-mapped passage store. Three files:
//! - `passages.bin`: records `[u32 len][id][u32 len][title][u32 len][text]` (little-endian, UTF-8);
//! - `passages.idx`: `n + 1` u64 byte offsets of the records;
//! - `ids.idx`: `n` u32 rows sorted by id bytes, for binary-search lookup by id.
//!
//! Lookups touch only the pages they need; nothing is loaded up front.

use super::Passage;
use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

pub const RECORDS_FILE: &str = "passages.bin";
pub const OFFSETS_FILE: &str = "passages.idx";
pub const IDS_FILE: &str = "ids.idx";

/// Write the three store files for `passages` (rows in order) into `dir`.
/// Ids must be unique (checked by the caller, which can name the source lines).
pub fn write_store(dir: &Path, passages: &[Passage]) -> Result<()> {
    ensure!(
        passages.len() < u32::MAX as usize,
        "too many passages for one knowledge base ({})",
        passages.len()
    );
    let rec_path = dir.join(RECORDS_FILE);
    let mut rec = BufWriter::new(
        File::create(&rec_path).with_context(|| format!("create {}", rec_path.display()))?,
    );
    let mut offsets = Vec::with_capacity((passages.len() + 1) * 8);
    let mut off = 0u64;
    for p in passages {
        offsets.extend_from_slice(&off.to_le_bytes());
        for field in [&p.id, &p.title, &p.text] {
            let len = u32::try_from(field.len()).context("passage field over 4 GiB")?;
            rec.write_all(&len.to_le_bytes())?;
            rec.write_all(field.as_bytes())?;
            off += 4 + field.len() as u64;
        }
    }
    offsets.extend_from_slice(&off.to_le_bytes());
    rec.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    write_synced(&dir.join(OFFSETS_FILE), &offsets)?;
    let mut order: Vec<u32> = (0..passages.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| passages[a as usize].id.cmp(&passages[b as usize].id));
    let ids: Vec<u8> = order.iter().flat_map(|r| r.to_le_bytes()).collect();
    write_synced(&dir.join(IDS_FILE), &ids)
}

/// Write `bytes` to `path` and fsync it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))
}

pub(crate) fn map(path: &Path) -> Result<Mmap> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: KB generation files are immutable once committed (new data goes to a new generation).
    unsafe { Mmap::map(&f) }.with_context(|| format!("mmap {}", path.display()))
}

/// Read-only, memory-mapped passages.
pub struct PassageStore {
    records: Mmap,
    offsets: Mmap,
    ids: Mmap,
    len: usize,
}

impl PassageStore {
    /// Map the store in `dir`, checking that it holds `expected` passages.
    pub fn open(dir: &Path, expected: u64) -> Result<Self> {
        let records = map(&dir.join(RECORDS_FILE))?;
        let offsets = map(&dir.join(OFFSETS_FILE))?;
        let ids = map(&dir.join(IDS_FILE))?;
        let len = usize::try_from(expected)?;
        // Checked: a corrupt count must not wrap around to the sizes of the files at hand.
        let sizes = len
            .checked_add(1)
            .and_then(|n| n.checked_mul(8))
            .zip(len.checked_mul(4));
        if sizes != Some((offsets.len(), ids.len())) {
            bail!(
                "{}: passage index sizes ({} and {} bytes) do not match {len} passages in the manifest",
                dir.display(),
                offsets.len(),
                ids.len()
            );
        }
        let store = Self {
            records,
            offsets,
            ids,
            len,
        };
        if store.offset(len) as usize != store.records.len() {
            bail!(
                "{}: {} is truncated or corrupt",
                dir.display(),
                RECORDS_FILE
            );
        }
        Ok(store)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn offset(&self, i: usize) -> u64 {
        let b = &self.offsets[i * 8..i * 8 + 8];
        u64::from_le_bytes(b.try_into().expect("8 bytes"))
    }

    fn fields(&self, row: usize) -> Result<[&str; 3]> {
        ensure!(
            row < self.len,
            "passage row {row} out of range (knowledge base has {})",
            self.len
        );
        let (start, end) = (self.offset(row) as usize, self.offset(row + 1) as usize);
        ensure!(
            start <= end && end <= self.records.len(),
            "passage store corrupt at row {row}"
        );
        let mut rec = &self.records[start..end];
        let mut out = [""; 3];
        for slot in &mut out {
            ensure!(rec.len() >= 4, "passage store corrupt at row {row}");
            let n = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes")) as usize;
            ensure!(rec.len() >= 4 + n, "passage store corrupt at row {row}");
            *slot = std::str::from_utf8(&rec[4..4 + n])
                .with_context(|| format!("passage row {row}: invalid UTF-8"))?;
            rec = &rec[4 + n..];
        }
        Ok(out)
    }

    /// Passage id of `row` without copying title/text.
    pub fn id(&self, row: usize) -> Result<&str> {
        Ok(self.fields(row)?[0])
    }

    pub fn get(&self, row: usize) -> Result<Passage> {
        let [id, title, text] = self.fields(row)?;
        Ok(Passage {
            id: id.to_string(),
            title: title.to_string(),
            text: text.to_string(),
        })
    }

    /// Row of the passage with this id (binary search over `ids.idx`).
    pub fn row_of(&self, id: &str) -> Result<Option<usize>> {
        let (mut lo, mut hi) = (0usize, self.len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let row =
                u32::from_le_bytes(self.ids[mid * 4..mid * 4 + 4].try_into().expect("4 bytes"))
                    as usize;
            match self.id(row)?.cmp(id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(row)),
            }
        }
        Ok(None)
    }

    /// All passages in row order (copies; for rebuilds and incremental adds).
    pub fn all(&self) -> Result<Vec<Passage>> {
        (0..self.len).map(|r| self.get(r)).collect()
    }
}
