//! Memory-mapped passage store. Three files:
//! - `passages.bin`: records `[u32 len][id][u32 len][title][u32 len][text]` (little-endian, UTF-8);
//! - `passages.idx`: `n + 1` u64 byte offsets of the records;
//! - `ids.idx`: `n` u32 rows sorted by id bytes, for binary-search lookup by id.
//!
//! Lookups touch only the pages they need; nothing is loaded up front. Each read checks the block
//! checksums of what it read (see [`PassageStore`]).

use super::manifest::{BlockChecksums, Manifest};
use super::Passage;
use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

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
    // SAFETY: KB generation files are immutable once committed (new data goes to a new
    // generation). Bytes changed in place anyway (bit rot, a hand edit) are caught by the block
    // checksums: on passage reads, and on open and re-checks for the other files.
    unsafe { Mmap::map(&f) }.with_context(|| format!("mmap {}", path.display()))
}

/// One mapped store file and its block checksums (`None`: a KB written before they existed).
struct Mapped {
    path: PathBuf,
    map: Mmap,
    blocks: Option<BlockChecksums>,
}

impl Mapped {
    fn open(dir: &Path, name: &str, manifest: &Manifest) -> Result<Self> {
        let path = dir.join(name);
        Ok(Self {
            map: map(&path)?,
            blocks: manifest.files.get(name).and_then(|f| f.blocks.clone()),
            path,
        })
    }

    /// Check the blocks that bytes `range` lie in.
    fn verify(&self, range: Range<usize>) -> Result<()> {
        match &self.blocks {
            Some(b) => b.check_range(&self.path, &self.map, range),
            None => Ok(()),
        }
    }

    fn verify_all(&self) -> Result<()> {
        match &self.blocks {
            Some(b) => b.check(&self.path, &self.map),
            None => Ok(()),
        }
    }
}

/// Read-only, memory-mapped passages. Every passage read checks the CRC32 of the blocks its
/// record and its offsets lie in (manifest [`BlockChecksums`]), so bytes corrupted on disk after
/// the files were mapped are an error naming the file and block, never returned.
pub struct PassageStore {
    records: Mapped,
    offsets: Mapped,
    ids: Mapped,
    len: usize,
}

impl PassageStore {
    /// Map the store in `dir`, checking that it holds the manifest's number of passages.
    pub fn open(dir: &Path, manifest: &Manifest) -> Result<Self> {
        let records = Mapped::open(dir, RECORDS_FILE, manifest)?;
        let offsets = Mapped::open(dir, OFFSETS_FILE, manifest)?;
        let ids = Mapped::open(dir, IDS_FILE, manifest)?;
        let len = usize::try_from(manifest.passages)?;
        // Checked: a corrupt count must not wrap around to the sizes of the files at hand.
        let sizes = len
            .checked_add(1)
            .and_then(|n| n.checked_mul(8))
            .zip(len.checked_mul(4));
        if sizes != Some((offsets.map.len(), ids.map.len())) {
            bail!(
                "{}: passage index sizes ({} and {} bytes) do not match {len} passages in the manifest",
                dir.display(),
                offsets.map.len(),
                ids.map.len()
            );
        }
        let store = Self {
            records,
            offsets,
            ids,
            len,
        };
        if store.offset(len) as usize != store.records.map.len() {
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
        let b = &self.offsets.map[i * 8..i * 8 + 8];
        u64::from_le_bytes(b.try_into().expect("8 bytes"))
    }

    /// The bytes of `row`'s record in `passages.bin`, if its offsets make sense.
    fn record_range(&self, row: usize) -> Option<Range<usize>> {
        let (start, end) = (self.offset(row) as usize, self.offset(row + 1) as usize);
        (start <= end && end <= self.records.map.len()).then_some(start..end)
    }

    fn parse(&self, row: usize) -> Result<[&str; 3]> {
        let range = self
            .record_range(row)
            .with_context(|| format!("passage store corrupt at row {row}"))?;
        let mut rec = &self.records.map[range];
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

    /// `take` of `row`'s `[id, title, text]`, returned once the blocks they were read from pass
    /// their checksums when `verify` (always when the record does not parse, so that corruption
    /// is named as such). Checked after `take` copied them: bytes overwritten while being read
    /// are caught as well.
    fn read<'a, T>(
        &'a self,
        row: usize,
        verify: bool,
        take: impl FnOnce([&'a str; 3]) -> T,
    ) -> Result<T> {
        ensure!(
            row < self.len,
            "passage row {row} out of range (knowledge base has {})",
            self.len
        );
        let out = self.parse(row).map(take);
        if verify || out.is_err() {
            self.offsets.verify(row * 8..row * 8 + 16)?;
            if let Some(range) = self.record_range(row) {
                self.records.verify(range)?;
            }
        }
        out
    }

    /// Passage id of `row` without copying title/text.
    pub fn id(&self, row: usize) -> Result<&str> {
        self.read(row, true, |[id, _, _]| id)
    }

    pub fn get(&self, row: usize) -> Result<Passage> {
        self.read(row, true, passage)
    }

    /// Row of the passage with this id (binary search over `ids.idx`; the row found is checked).
    pub fn row_of(&self, id: &str) -> Result<Option<usize>> {
        let (mut lo, mut hi) = (0usize, self.len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let at = mid * 4..mid * 4 + 4;
            let row =
                u32::from_le_bytes(self.ids.map[at.clone()].try_into().expect("4 bytes")) as usize;
            if row >= self.len {
                self.ids.verify(at)?;
                bail!("{}: row {row} out of range", self.ids.path.display());
            }
            // Unchecked on the way: only the row found is returned.
            match self.read(row, false, |[found, _, _]| found.cmp(id))? {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    self.ids.verify(at)?;
                    return self.read(row, true, |_| Some(row));
                }
            }
        }
        Ok(None)
    }

    /// All passages in row order (copies; for rebuilds and incremental adds). The files are
    /// checked whole first, each block once.
    pub fn all(&self) -> Result<Vec<Passage>> {
        self.records.verify_all()?;
        self.offsets.verify_all()?;
        (0..self.len)
            .map(|r| self.read(r, false, passage))
            .collect()
    }
}

fn passage([id, title, text]: [&str; 3]) -> Passage {
    Passage {
        id: id.to_string(),
        title: title.to_string(),
        text: text.to_string(),
    }
}
