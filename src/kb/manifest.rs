//! `manifest.json`: what a knowledge-base generation holds and how it was made. Opening a KB checks the
//! format version and the file sizes; retrieving checks that the query encoder matches the recorded one.

use crate::encoders::EncoderFingerprint;
use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::Path;

/// Format tag written into every manifest.
pub const FORMAT: &str = "rustrag-kb";
/// Bumped on any incompatible change of the on-disk layout.
pub const FORMAT_VERSION: u32 = 2;
/// Version 1 differed only in its HNSW file (a usearch graph): v1 KBs without a graph are read as v2.
const COMPATIBLE_WITHOUT_HNSW: u64 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
/// The CRC32 of `manifest.json`'s bytes (8 hex digits), written beside it: a flipped byte in the
/// manifest that still parses (a digit of τ, a name) is caught on open like one in a data file.
/// Generations written before it existed have none and open unchecked.
pub const MANIFEST_CRC_FILE: &str = "manifest.crc32";

/// Element type of the stored embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingDtype {
    F32,
    F16,
}

impl EmbeddingDtype {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
}

/// Size and sha256 of one data file, and the CRC32 of each of its blocks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
    /// Absent in KBs written before block checksums existed (then only `--verify` checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<BlockChecksums>,
}

/// Block size of [`BlockChecksums`] for the embeddings and the HNSW graph, which are only
/// checked whole: 1 MiB, so a 1.5 GB embedding matrix has ~1500 entries.
pub const CHECKSUM_BLOCK_BYTES: u64 = 1 << 20;

/// Block size of [`BlockChecksums`] for `passages.bin`, whose blocks are checked on every passage
/// read ([`super::PassageStore`]): a read hashes the 16 KiB around its passage, not 1 MiB. A
/// random read of a 1M-passage KB takes ~2.5 µs so (0.9 µs unchecked, ~9 µs with 64 KiB blocks;
/// docs/safety.md), for 64 times the manifest entries of 1 MiB blocks (~650 K, ~13 MB of JSON,
/// for 10 GiB of passages).
pub const RECORDS_CHECKSUM_BLOCK_BYTES: u64 = 16 << 10;

/// Block size of [`BlockChecksums`] for the passage store's indexes (`passages.idx`, `ids.idx`:
/// 8 and 4 bytes a passage), also checked on every read.
pub const INDEX_CHECKSUM_BLOCK_BYTES: u64 = 4 << 10;

/// The block size a writer records for the data file called `name` ([`file_entry`]). Readers
/// take the one recorded in the manifest, so KBs written with other sizes read as before.
pub fn checksum_block_bytes(name: &str) -> u64 {
    use super::store::{IDS_FILE, OFFSETS_FILE, RECORDS_FILE};
    match name {
        RECORDS_FILE => RECORDS_CHECKSUM_BLOCK_BYTES,
        OFFSETS_FILE | IDS_FILE => INDEX_CHECKSUM_BLOCK_BYTES,
        _ => CHECKSUM_BLOCK_BYTES,
    }
}

/// CRC32 (IEEE, SIMD via crc32fast) of each `block_bytes` block of a file (the last one may be
/// short): checked in parallel when the KB is opened and by re-checks of an opened KB, and per
/// block on passage reads.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockChecksums {
    pub block_bytes: u64,
    pub crc32: Vec<u32>,
}

impl BlockChecksums {
    /// Error naming `path`, the block and its byte range when `data` does not match.
    pub fn check(&self, path: &Path, data: &[u8]) -> Result<()> {
        use rayon::prelude::*;
        let bs = self.layout(path, data.len())?;
        let bad = data
            .par_chunks(bs)
            .zip(self.crc32.par_iter())
            .position_first(|(chunk, &want)| crc32fast::hash(chunk) != want);
        match bad {
            Some(i) => Err(self.mismatch(path, i, data.len())),
            None => Ok(()),
        }
    }

    /// [`BlockChecksums::check`] of only the blocks that bytes `range` of `data` lie in (a passage
    /// read): their cost, not the file's.
    pub fn check_range(&self, path: &Path, data: &[u8], range: Range<usize>) -> Result<()> {
        let bs = self.layout(path, data.len())?;
        ensure!(
            range.start <= range.end && range.end <= data.len(),
            "{}: bytes {}..{} are outside its {} bytes",
            path.display(),
            range.start,
            range.end,
            data.len()
        );
        let blocks = range.start / bs..range.end.div_ceil(bs);
        for i in blocks {
            let chunk = &data[i * bs..((i + 1) * bs).min(data.len())];
            if crc32fast::hash(chunk) != self.crc32[i] {
                return Err(self.mismatch(path, i, data.len()));
            }
        }
        Ok(())
    }

    /// The block size, once the number of blocks is known to match a file of `len` bytes.
    fn layout(&self, path: &Path, len: usize) -> Result<usize> {
        let bs = usize::try_from(self.block_bytes).unwrap_or(usize::MAX);
        ensure!(
            bs > 0,
            "{}: manifest records a block size of 0",
            path.display()
        );
        let blocks = len.div_ceil(bs);
        if blocks != self.crc32.len() {
            bail!(
                "{}: {len} bytes make {blocks} blocks, the manifest records {} (corrupt or partially copied)",
                path.display(),
                self.crc32.len()
            );
        }
        Ok(bs)
    }

    /// The error of block `i` failing its check, in a file of `len` bytes.
    fn mismatch(&self, path: &Path, i: usize, len: usize) -> anyhow::Error {
        let bs = self.block_bytes as usize;
        let end = ((i + 1) * bs).min(len);
        anyhow::anyhow!(
            "{}: block {i} (bytes {}..{end}) fails its CRC32 check: the file is corrupt and is not served; rebuild the knowledge base or restore it from a copy",
            path.display(),
            i * bs
        )
    }
}

/// Parameters of a persisted HNSW graph.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HnswParams {
    /// Max neighbours per node on the upper layers (`M`; layer 0 keeps `2 M`).
    pub m: usize,
    pub ef_construction: usize,
    /// Default `ef_search` used when a query does not set one.
    pub ef_search: usize,
}

impl HnswParams {
    /// Upper bound of `m` (faiss and hnswlib use 4–64; 256 is already far past any gain). Each
    /// node stores up to `2 m` neighbours on layer 0, so `m` scales the graph's memory.
    pub const MAX_M: usize = 256;
    /// Upper bound of `ef_construction` and `ef_search` (candidate lists beyond this are an exact
    /// search done slowly).
    pub const MAX_EF: usize = 10_000;

    /// Error naming the parameter and its bounds when one is out of them.
    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                bail!("HNSW --{name} {v} is out of bounds: it must be in {lo}..={hi}");
            }
            Ok(())
        };
        check("m", self.m, 2, Self::MAX_M)?;
        check("ef-construction", self.ef_construction, 1, Self::MAX_EF)?;
        check("ef-search", self.ef_search, 1, Self::MAX_EF)
    }
}

/// The fields in which two encoder fingerprints differ, each as `field: a vs b` (source ignored:
/// one model may be loaded from two paths).
pub fn fingerprint_differences(a: &EncoderFingerprint, b: &EncoderFingerprint) -> Vec<String> {
    let mut d = Vec::new();
    let mut field = |name: &str, x: String, y: String| {
        if x != y {
            d.push(format!("{name}: {x} vs {y}"));
        }
    };
    field("kind", a.kind.clone(), b.kind.clone());
    field("dim", a.dim.to_string(), b.dim.to_string());
    field("pooling", a.pooling.clone(), b.pooling.clone());
    field(
        "normalized",
        a.normalized.to_string(),
        b.normalized.to_string(),
    );
    field(
        "weights sha256",
        short(&a.weights_sha256).into(),
        short(&b.weights_sha256).into(),
    );
    field("int8", a.int8.to_string(), b.int8.to_string());
    field(
        "query prefix",
        format!("{:?}", a.prefixes.query),
        format!("{:?}", b.prefixes.query),
    );
    field(
        "passage prefix",
        format!("{:?}", a.prefixes.passage),
        format!("{:?}", b.prefixes.passage),
    );
    d
}

/// Contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// rustrag version that wrote the KB.
    pub writer: String,
    pub encoder: EncoderFingerprint,
    pub dim: usize,
    pub dtype: EmbeddingDtype,
    /// Number of passages (rows).
    pub passages: u64,
    /// Number of source documents the passages were split from.
    pub documents: u64,
    /// Words per passage used when splitting (0 = documents not split).
    pub words_per_passage: usize,
    /// Corpus files/dirs ingested, in order.
    pub sources: Vec<String>,
    /// Data files of this generation (name -> size, sha256).
    pub files: BTreeMap<String, FileEntry>,
    pub hnsw: Option<HnswParams>,
    pub created_unix: u64,
    /// τ of the RAG doc prior p(z|x) = softmax(q·d / τ) over retrieved passages: the scale the
    /// encoder's scores were trained at. Absent in KBs written before it existed: then
    /// [`default_prior_temperature`] of the encoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_temperature: Option<f64>,
}

/// τ for an encoder's scores when the KB does not record one. Unit-normalised (cosine) encoders:
/// 0.05, sentence-transformers' `MultipleNegativesRankingLoss` default scale of 20 that
/// all-MiniLM-L6-v2 and most sentence-transformers retrievers were trained with (cosine × 20 are
/// the logits of their in-batch softmax). Raw inner products (DPR): 1, the logits DPR and RAG
/// were trained on.
pub fn default_prior_temperature(encoder: &EncoderFingerprint) -> f64 {
    if encoder.normalized {
        0.05
    } else {
        1.0
    }
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let crc_path = dir.join(MANIFEST_CRC_FILE);
        match std::fs::read_to_string(&crc_path) {
            Ok(want) => {
                let got = format!("{:08x}", crc32fast::hash(&bytes));
                if want.trim() != got {
                    bail!(
                        "{}: CRC32 {got} does not match the {:?} recorded in {}: the manifest is corrupt (if you edited it by hand, remove the .crc32 file; τ can be set per query with --prior-temperature)",
                        path.display(),
                        want.trim(),
                        crc_path.display()
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", crc_path.display())),
        }
        let text = std::str::from_utf8(&bytes)
            .with_context(|| format!("{}: not UTF-8", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if format != FORMAT {
            bail!(
                "{}: not a rustrag knowledge base (format {format:?}, expected {FORMAT:?})",
                path.display()
            );
        }
        let version = v
            .get("format_version")
            .and_then(|f| f.as_u64())
            .unwrap_or(0);
        let v1_without_graph =
            version == COMPATIBLE_WITHOUT_HNSW && v.get("hnsw").is_none_or(|h| h.is_null());
        if version != FORMAT_VERSION as u64 && !v1_without_graph {
            bail!(
                "{}: knowledge base format version {version}, this rustrag reads version {FORMAT_VERSION}; rebuild it with `rustrag index build`",
                path.display()
            );
        }
        serde_json::from_value(v).with_context(|| format!("{}: malformed manifest", path.display()))
    }

    /// The recorded τ, or the encoder's default ([`default_prior_temperature`]).
    pub fn prior_temperature(&self) -> f64 {
        self.prior_temperature
            .unwrap_or_else(|| default_prior_temperature(&self.encoder))
    }

    pub fn to_json(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec_pretty(self)?)
    }

    /// Write `manifest.json` and its [`MANIFEST_CRC_FILE`] into the generation directory `dir`
    /// (before it is committed), each synced.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = self.to_json()?;
        super::store::write_synced(&dir.join(MANIFEST_FILE), &json)?;
        let crc = format!("{:08x}\n", crc32fast::hash(&json));
        super::store::write_synced(&dir.join(MANIFEST_CRC_FILE), crc.as_bytes())
    }

    /// Refuse a query encoder that does not match the one that embedded the passages.
    pub fn check_query_encoder(&self, q: &EncoderFingerprint) -> Result<()> {
        let kb = &self.encoder;
        if q.dim != self.dim {
            bail!(
                "query encoder {} has dim {}, the knowledge base was embedded with dim {} by {}",
                q.source,
                q.dim,
                self.dim,
                kb.source
            );
        }
        if q.pooling != kb.pooling || q.normalized != kb.normalized {
            bail!(
                "query encoder {} (pooling {}, normalized {}) does not match the knowledge base encoder {} (pooling {}, normalized {})",
                q.source, q.pooling, q.normalized, kb.source, kb.pooling, kb.normalized
            );
        }
        // DPR pairs a question encoder with a different context encoder: same kind, different weights.
        if kb.kind != "dpr" && q.weights_sha256 != kb.weights_sha256 {
            bail!(
                "query encoder {} (weights sha256 {}) is not the encoder that embedded the knowledge base ({}, sha256 {})",
                q.source,
                short(&q.weights_sha256),
                kb.source,
                short(&kb.weights_sha256)
            );
        }
        if q.kind != kb.kind {
            bail!(
                "query encoder kind {} does not match the knowledge base encoder kind {}",
                q.kind,
                kb.kind
            );
        }
        // Instruction prefixes (E5's "query: "): queries must carry the one the KB was built for.
        if q.prefixes.query != kb.prefixes.query {
            bail!(
                "query encoder {} prefixes queries with {:?} ({}), the knowledge base was built for the query prefix {:?} ({}); omit --encoder to use the manifest's",
                q.source,
                q.prefixes.query,
                or_none(&q.prefixes.source),
                kb.prefixes.query,
                or_none(&kb.prefixes.source)
            );
        }
        Ok(())
    }
}

fn or_none(source: &str) -> &str {
    if source.is_empty() {
        "no prefix"
    } else {
        source
    }
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

/// sha256 (hex), size and block checksums (blocks of [`checksum_block_bytes`] for its name) of a
/// file, streamed.
pub fn file_entry(path: &Path) -> Result<FileEntry> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let block_bytes = checksum_block_bytes(
        &path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
    );
    let bs = block_bytes as usize;
    let mut buf = vec![0u8; bs];
    let mut bytes = 0u64;
    let mut crc32 = Vec::new();
    loop {
        // Fill a whole block (a read may return less) so that blocks line up with the file.
        let mut n = 0;
        while n < bs {
            let got = f
                .read(&mut buf[n..])
                .with_context(|| format!("read {}", path.display()))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        crc32.push(crc32fast::hash(&buf[..n]));
        bytes += n as u64;
        if n < bs {
            break;
        }
    }
    Ok(FileEntry {
        bytes,
        sha256: format!("{:x}", h.finalize()),
        blocks: Some(BlockChecksums { block_bytes, crc32 }),
    })
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(normalized: bool, tau: Option<f64>) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            writer: "test".into(),
            encoder: EncoderFingerprint {
                source: "enc".into(),
                kind: if normalized {
                    "sentence-transformers"
                } else {
                    "dpr"
                }
                .into(),
                dim: 4,
                pooling: "mean".into(),
                normalized,
                weights_sha256: "00".into(),
                int8: false,
                prefixes: Default::default(),
            },
            dim: 4,
            dtype: EmbeddingDtype::F32,
            passages: 1,
            documents: 1,
            words_per_passage: 0,
            sources: vec![],
            files: BTreeMap::new(),
            hnsw: None,
            created_unix: 0,
            prior_temperature: tau,
        }
    }

    /// A manifest written before the prior temperature existed still reads, with the encoder's
    /// default τ; a recorded τ wins.
    #[test]
    fn prior_temperature_defaults_for_old_manifests() -> Result<()> {
        for (normalized, want) in [(true, 0.05), (false, 1.0)] {
            let mut v = serde_json::to_value(manifest(normalized, Some(0.3)))?;
            v.as_object_mut().unwrap().remove("prior_temperature");
            let old: Manifest = serde_json::from_value(v)?;
            assert_eq!(old.prior_temperature, None);
            assert_eq!(old.prior_temperature(), want);
        }
        let m: Manifest = serde_json::from_slice(&manifest(true, Some(0.3)).to_json()?)?;
        assert_eq!(m.prior_temperature(), 0.3);
        Ok(())
    }
}
