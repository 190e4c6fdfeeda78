//! Passage embeddings on disk: a headerless little-endian row-major matrix `[n, dim]` of f32 or f16
//! (`embeddings.f32` / `embeddings.f16`), memory-mapped for search. Shape and dtype live in the manifest.

use super::manifest::EmbeddingDtype;
use super::store::map;
use anyhow::{bail, ensure, Context, Result};
use half::f16;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub fn file_name(dtype: EmbeddingDtype) -> &'static str {
    match dtype {
        EmbeddingDtype::F32 => "embeddings.f32",
        EmbeddingDtype::F16 => "embeddings.f16",
    }
}

/// Streams rows to an embeddings file.
pub struct EmbeddingWriter {
    out: BufWriter<File>,
    path: PathBuf,
    dim: usize,
    dtype: EmbeddingDtype,
    rows: u64,
}

impl EmbeddingWriter {
    pub fn create(dir: &Path, dim: usize, dtype: EmbeddingDtype) -> Result<Self> {
        let path = dir.join(file_name(dtype));
        let f = File::create(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, f),
            path,
            dim,
            dtype,
            rows: 0,
        })
    }

    /// Append rows: `data` is `[rows, dim]` row-major f32.
    pub fn append(&mut self, data: &[f32]) -> Result<()> {
        ensure!(
            data.len().is_multiple_of(self.dim),
            "embedding batch of {} floats is not a multiple of dim {}",
            data.len(),
            self.dim
        );
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            bail!(
                "embedding row {} has a non-finite value",
                self.rows + (i / self.dim) as u64
            );
        }
        let io = |e: std::io::Error| {
            anyhow::Error::from(e).context(format!("write {}", self.path.display()))
        };
        match self.dtype {
            EmbeddingDtype::F32 => {
                for x in data {
                    self.out.write_all(&x.to_le_bytes()).map_err(io)?;
                }
            }
            EmbeddingDtype::F16 => {
                for x in data {
                    self.out
                        .write_all(&f16::from_f32(*x).to_le_bytes())
                        .map_err(io)?;
                }
            }
        }
        // Flush per batch so partial progress is visible on disk (the data only counts once committed).
        self.out.flush().map_err(io)?;
        self.rows += (data.len() / self.dim) as u64;
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Flush and fsync; returns the number of rows written.
    pub fn finish(self) -> Result<u64> {
        let f = self.out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
            .with_context(|| format!("fsync {}", self.path.display()))?;
        Ok(self.rows)
    }
}

/// A memory-mapped `[n, dim]` embedding matrix.
pub struct EmbeddingMatrix {
    map: Mmap,
    rows: usize,
    dim: usize,
    dtype: EmbeddingDtype,
}

impl EmbeddingMatrix {
    pub fn open(dir: &Path, rows: u64, dim: usize, dtype: EmbeddingDtype) -> Result<Self> {
        let path = dir.join(file_name(dtype));
        let map = map(&path)?;
        let rows = usize::try_from(rows)?;
        // Checked: a corrupt shape must not wrap around to the size of the file at hand.
        let want = rows
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(dtype.size()));
        if want != Some(map.len()) {
            let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
            bail!(
                "{}: {} bytes, expected {want} for {rows} x {dim} {:?} (truncated or from another build)",
                path.display(),
                map.len(),
                dtype
            );
        }
        // mmap is page-aligned, so the f32/f16 views below are aligned.
        ensure!(
            (map.as_ptr() as usize).is_multiple_of(4),
            "{}: unaligned mapping",
            path.display()
        );
        ensure!(
            cfg!(target_endian = "little"),
            "embedding files are little-endian; big-endian hosts unsupported"
        );
        Ok(Self {
            map,
            rows,
            dim,
            dtype,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn dtype(&self) -> EmbeddingDtype {
        self.dtype
    }

    /// The whole matrix as f32 `[rows * dim]` when stored as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self.dtype {
            // SAFETY: aligned (checked at open), length checked, every bit pattern is a valid f32.
            EmbeddingDtype::F32 => Some(unsafe {
                std::slice::from_raw_parts(self.map.as_ptr() as *const f32, self.rows * self.dim)
            }),
            EmbeddingDtype::F16 => None,
        }
    }

    /// The whole matrix as f16 `[rows * dim]` when stored as f16.
    pub fn as_f16(&self) -> Option<&[f16]> {
        match self.dtype {
            // SAFETY: as above; f16 is a transparent u16.
            EmbeddingDtype::F16 => Some(unsafe {
                std::slice::from_raw_parts(self.map.as_ptr() as *const f16, self.rows * self.dim)
            }),
            EmbeddingDtype::F32 => None,
        }
    }

    /// Rows `start..end` converted to f32 into `out` (`[(end - start) * dim]`).
    pub fn rows_f32_into(&self, start: usize, end: usize, out: &mut Vec<f32>) {
        out.clear();
        match self.dtype {
            EmbeddingDtype::F32 => out
                .extend_from_slice(&self.as_f32().expect("f32")[start * self.dim..end * self.dim]),
            EmbeddingDtype::F16 => out.extend(
                self.as_f16().expect("f16")[start * self.dim..end * self.dim]
                    .iter()
                    .map(|x| x.to_f32()),
            ),
        }
    }

    /// One row as f32.
    pub fn row(&self, row: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.dim);
        self.rows_f32_into(row, row + 1, &mut v);
        v
    }
}
