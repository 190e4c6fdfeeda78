//! HNSW graph (Malkov & Yashunin 2018) for maximum-inner-product search over a knowledge base's
//! embedding matrix.
//!
//! The graph stores only links; vectors stay in the memory-mapped embeddings file, so the KB holds
//! each vector once. Construction follows hnswlib/faiss: random levels with `mL = 1 / ln M`, greedy
//! descent through the upper layers, `ef_construction` beam search, the neighbour-selection
//! heuristic (keep a candidate only if it is closer to the new node than to every neighbour kept so
//! far), `2 M` links on layer 0. Insertion runs in batches: searches in parallel, links written in
//! order, so the graph is the same for any thread count. Search is the same beam search with
//! `ef_search`, SIMD inner products and prefetching of the neighbours' vectors.
//!
//! Scores are inner products (higher is better) throughout.

use super::quantized::{QuantizedEmbeddings, Query as QuantizedQuery};
use super::row_scorer::RowScorer;
use super::scored::{Scored, Worst};
use crate::kb::{EmbeddingMatrix, HnswParams};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

const MAGIC: &[u8; 8] = b"RRHNSW\0\0";
const VERSION: u32 = 1;
/// Header words after the magic: version, dim, n, m, m0, ef_construction, entry, max_level.
const HEADER_WORDS: usize = 8;
/// Nodes inserted per batch (fixed, so that the graph does not depend on the thread count).
const INSERT_BATCH: usize = 64;
/// Levels above this are never drawn in practice (p = M^-MAX_LEVEL); it bounds bad files too.
const MAX_LEVEL: usize = 16;

/// The vectors being linked: the matrix (rows as f32 for the heuristic) and a SIMD scorer.
struct Vectors<'a> {
    matrix: &'a EmbeddingMatrix,
    scorer: RowScorer<'a>,
}

impl<'a> Vectors<'a> {
    fn new(matrix: &'a EmbeddingMatrix) -> Self {
        Self {
            matrix,
            scorer: RowScorer::new(matrix),
        }
    }

    fn row_into(&self, row: u32, out: &mut Vec<f32>) {
        let r = row as usize;
        self.matrix.rows_f32_into(r, r + 1, out);
    }
}

/// What a walk scores queries with: f32 rows, or the quantised copy's integer estimates.
trait Scorer: Sync {
    type Query: ?Sized;
    fn score(&self, q: &Self::Query, row: u32) -> f32;
    fn score4(&self, q: &Self::Query, rows: [u32; 4]) -> [f32; 4];
    fn prefetch(&self, row: u32);
}

impl Scorer for Vectors<'_> {
    type Query = [f32];
    #[inline]
    fn score(&self, q: &[f32], row: u32) -> f32 {
        self.scorer.score(q, row as usize)
    }
    #[inline]
    fn score4(&self, q: &[f32], rows: [u32; 4]) -> [f32; 4] {
        self.scorer.score4(q, rows.map(|r| r as usize))
    }
    #[inline]
    fn prefetch(&self, row: u32) {
        self.scorer.prefetch(row as usize);
    }
}

impl Scorer for QuantizedEmbeddings {
    type Query = QuantizedQuery;
    #[inline]
    fn score(&self, q: &QuantizedQuery, row: u32) -> f32 {
        self.estimate(q, row as usize)
    }
    #[inline]
    fn score4(&self, q: &QuantizedQuery, rows: [u32; 4]) -> [f32; 4] {
        self.estimate4(q, rows.map(|r| r as usize))
    }
    #[inline]
    fn prefetch(&self, row: u32) {
        QuantizedEmbeddings::prefetch(self, row as usize);
    }
}

/// Per-thread search scratch: visit stamps (one per node) and the two heaps.
struct Scratch {
    visited: Vec<u32>,
    stamp: u32,
    candidates: BinaryHeap<Scored>,
    results: BinaryHeap<Worst>,
    links: Vec<u32>,
}

impl Scratch {
    fn new(n: usize) -> Self {
        Self {
            visited: vec![0; n],
            stamp: 0,
            candidates: BinaryHeap::new(),
            results: BinaryHeap::new(),
            links: Vec::new(),
        }
    }

    fn next_query(&mut self) {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.visited.fill(0);
            self.stamp = 1;
        }
    }
}

/// Where a search reads a node's links: the frozen graph, or the lists under construction.
trait Links: Sync {
    /// The links of `node` on `layer`.
    fn links(&self, node: u32, layer: usize) -> &[u32];
}

/// What a search walks: links over scored vectors.
struct Walk<'a, L, S> {
    links: &'a L,
    vecs: &'a S,
}

impl<L: Links, S: Scorer> Walk<'_, L, S> {
    /// Greedy descent (beam of 1) from `entry` on `layer`.
    fn greedy(&self, q: &S::Query, mut entry: Scored, layer: usize) -> Scored {
        let (links, vecs) = (self.links, self.vecs);
        loop {
            let mut improved = false;
            for &e in links.links(entry.1, layer) {
                let s = Scored(vecs.score(q, e), e);
                if s > entry {
                    entry = s;
                    improved = true;
                }
            }
            if !improved {
                return entry;
            }
        }
    }

    /// Beam search with `ef` candidates on `layer` from `entry`; the results, best first, in `out`.
    fn beam(
        &self,
        q: &S::Query,
        entry: Scored,
        ef: usize,
        layer: usize,
        s: &mut Scratch,
        out: &mut Vec<Scored>,
    ) {
        let (links, vecs) = (self.links, self.vecs);
        s.next_query();
        s.candidates.clear();
        s.results.clear();
        s.visited[entry.1 as usize] = s.stamp;
        s.candidates.push(entry);
        s.results.push(Worst(entry));
        let mut links_buf = std::mem::take(&mut s.links);
        while let Some(c) = s.candidates.pop() {
            let worst = s.results.peek().expect("results hold the entry").0;
            if s.results.len() >= ef && c < worst {
                break;
            }
            // Unvisited neighbours only, their loads started before any is scored.
            links_buf.clear();
            for &e in links.links(c.1, layer) {
                if s.visited[e as usize] != s.stamp {
                    s.visited[e as usize] = s.stamp;
                    vecs.prefetch(e);
                    links_buf.push(e);
                }
            }
            let mut consider = |cand: Scored| {
                let worst = s.results.peek().expect("non-empty").0;
                if s.results.len() < ef || cand > worst {
                    s.candidates.push(cand);
                    s.results.push(Worst(cand));
                    if s.results.len() > ef {
                        s.results.pop();
                    }
                }
            };
            let mut quads = links_buf.chunks_exact(4);
            for e in &mut quads {
                let e = [e[0], e[1], e[2], e[3]];
                let scores = vecs.score4(q, e);
                for (score, e) in scores.into_iter().zip(e) {
                    consider(Scored(score, e));
                }
            }
            for &e in quads.remainder() {
                consider(Scored(vecs.score(q, e), e));
            }
        }
        s.links = links_buf;
        out.clear();
        out.extend(s.results.drain().map(|w| w.0));
        out.sort_unstable_by(|a, b| b.cmp(a));
    }
}

/// The neighbour-selection heuristic (HNSW paper, Algorithm 4 without extension): walk the
/// candidates best first and keep one only if it is closer to the base node than to every
/// neighbour already kept, up to `max` links. Diversified links keep the graph navigable.
fn select_neighbors(vecs: &Vectors, candidates: &[Scored], max: usize, out: &mut Vec<u32>) {
    out.clear();
    if candidates.len() < max {
        // As faiss: fewer candidates than the budget are all kept.
        out.extend(candidates.iter().map(|c| c.1));
        return;
    }
    let mut row = Vec::new();
    for c in candidates {
        if out.len() >= max {
            break;
        }
        vecs.row_into(c.1, &mut row);
        if out.iter().all(|&r| vecs.score(&row, r) <= c.0) {
            out.push(c.1);
        }
    }
}

/// A frozen HNSW graph: links only (the vectors are the KB's embedding matrix).
pub struct HnswGraph {
    dim: usize,
    n: usize,
    m: usize,
    m0: usize,
    ef_construction: usize,
    entry: u32,
    max_level: usize,
    /// Level of each node.
    levels: Vec<u8>,
    /// Layer-0 links, `n` slots of `1 + m0` words: count, then the links.
    level0: Vec<u32>,
    /// For a node with level >= 1: where its upper slots start in `upper` (slot of layer `l` at
    /// `offset + (l - 1) * (1 + m)`); `u32::MAX` otherwise.
    upper_offsets: Vec<u32>,
    upper: Vec<u32>,
}

impl HnswGraph {
    fn slot(&self, node: u32, layer: usize) -> &[u32] {
        let w = if layer == 0 {
            &self.level0[node as usize * (1 + self.m0)..][..1 + self.m0]
        } else {
            let off = self.upper_offsets[node as usize] as usize + (layer - 1) * (1 + self.m);
            &self.upper[off..off + 1 + self.m]
        };
        &w[1..1 + w[0] as usize]
    }
}

impl Links for HnswGraph {
    #[inline]
    fn links(&self, node: u32, layer: usize) -> &[u32] {
        self.slot(node, layer)
    }
}

/// Links under construction: per node, its lists for layers `0..=level`.
struct Building {
    nodes: Vec<Vec<Vec<u32>>>,
}

impl Links for Building {
    #[inline]
    fn links(&self, node: u32, layer: usize) -> &[u32] {
        self.nodes[node as usize].get(layer).map_or(&[], |l| l)
    }
}

/// Deterministic level draw per node (splitmix64 of the node id): `floor(-ln(U) / ln(M))`.
fn draw_level(node: usize, m: usize) -> usize {
    let mut z = (node as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    ((-u.ln() / (m as f64).ln()) as usize).min(MAX_LEVEL)
}

/// An HNSW index over a knowledge base's embeddings: the graph plus the search settings.
pub struct HnswIndex {
    graph: HnswGraph,
    ef_search: AtomicUsize,
}

impl HnswIndex {
    /// Build over all rows of `matrix` (node id = row), inserting in parallel on the rayon pool.
    pub fn build(matrix: &EmbeddingMatrix, p: &HnswParams) -> Result<Self> {
        ensure!(p.m >= 2, "HNSW M must be at least 2 (got {})", p.m);
        ensure!(
            p.ef_construction >= 1,
            "HNSW ef_construction must be at least 1"
        );
        let n = matrix.rows();
        ensure!(n > 0, "cannot build an HNSW graph over an empty matrix");
        ensure!(
            n < u32::MAX as usize,
            "HNSW supports up to 2^32 - 1 vectors"
        );
        let (m, m0) = (p.m, 2 * p.m);
        let levels: Vec<u8> = (0..n).map(|i| draw_level(i, m) as u8).collect();
        let mut building = Building {
            nodes: levels
                .iter()
                .map(|&l| vec![Vec::new(); l as usize + 1])
                .collect(),
        };
        let vecs = Vectors::new(matrix);
        // As faiss: insert the highest levels first, each level in a shuffled order (no dataset-order
        // bias), so that the entry point is on the top level from the start.
        let order = insertion_order(&levels);
        let (entry, max_level) = (order[0], levels[order[0] as usize] as usize);
        let progress = crate::progress::bar(n as u64 - 1, "HNSW");
        // Batches: the searches of a batch run in parallel on the graph as it was before the batch,
        // each node also scoring the batch's earlier nodes directly (so it sees exactly what a
        // one-at-a-time insertion would), then the links are written in order. The graph does not
        // depend on the thread count.
        for batch in order[1..].chunks(INSERT_BATCH) {
            let rows: Vec<Vec<f32>> = batch
                .iter()
                .map(|&v| {
                    let mut r = Vec::new();
                    vecs.row_into(v, &mut r);
                    r
                })
                .collect();
            let walk = Walk {
                links: &building,
                vecs: &vecs,
            };
            let chosen: Vec<Vec<Vec<u32>>> = (0..batch.len())
                .into_par_iter()
                .map_init(
                    || Scratch::new(n),
                    |scratch, i| {
                        let (node, q) = (batch[i], &rows[i]);
                        let level = levels[node as usize] as usize;
                        let mut cur = Scored(vecs.score(q, entry), entry);
                        for layer in (level + 1..=max_level).rev() {
                            cur = walk.greedy(q, cur, layer);
                        }
                        let mut per_layer = vec![Vec::new(); level + 1];
                        let mut found = Vec::new();
                        for layer in (0..=level).rev() {
                            walk.beam(q, cur, p.ef_construction, layer, scratch, &mut found);
                            cur = found[0];
                            for &other in &batch[..i] {
                                if levels[other as usize] as usize >= layer {
                                    found.push(Scored(vecs.score(q, other), other));
                                }
                            }
                            found.sort_unstable_by(|a, b| b.cmp(a));
                            let max = if layer == 0 { m0 } else { m };
                            select_neighbors(&vecs, &found, max, &mut per_layer[layer]);
                        }
                        per_layer
                    },
                )
                .collect();
            for (&node, per_layer) in batch.iter().zip(chosen) {
                for (layer, links) in per_layer.into_iter().enumerate() {
                    let max = if layer == 0 { m0 } else { m };
                    for &nb in &links {
                        link_back(&mut building, &vecs, nb, node, layer, max);
                    }
                    building.nodes[node as usize][layer] = links;
                }
            }
            progress.inc(batch.len() as u64);
        }
        progress.finish_and_clear();
        Ok(Self {
            graph: freeze(
                building,
                levels,
                matrix.dim(),
                m,
                p.ef_construction,
                entry,
                max_level,
            ),
            ef_search: AtomicUsize::new(p.ef_search.max(1)),
        })
    }

    /// Candidate list size during search (`ef_search`); applies to later searches.
    pub fn set_ef_search(&self, ef: usize) {
        self.ef_search.store(ef.max(1), AtomicOrdering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.graph.n
    }

    pub fn is_empty(&self) -> bool {
        self.graph.n == 0
    }

    /// Bytes held by the links.
    pub fn memory_usage(&self) -> usize {
        let g = &self.graph;
        g.levels.len() + 4 * (g.level0.len() + g.upper_offsets.len() + g.upper.len())
    }

    /// Top-`k` `(row, inner product)` per query, best first; `queries`: `[nq, dim]` row-major.
    /// `matrix` must be the matrix the graph was built over. With `quantized` (a copy of that
    /// matrix), the walk scores the integer codes (half the bytes, twice the products per
    /// instruction) and the `ef` rows it ends with are re-scored in f32, so the returned scores are
    /// exact inner products.
    pub fn search(
        &self,
        matrix: &EmbeddingMatrix,
        quantized: Option<&QuantizedEmbeddings>,
        queries: &[f32],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        let g = &self.graph;
        ensure!(
            matrix.rows() == g.n && matrix.dim() == g.dim,
            "HNSW graph over {} x {} does not match the embeddings ({} x {})",
            g.n,
            g.dim,
            matrix.rows(),
            matrix.dim()
        );
        ensure!(
            quantized.is_none_or(|q| q.rows() == g.n),
            "the quantised copy does not match the HNSW graph"
        );
        ensure!(
            queries.len().is_multiple_of(g.dim),
            "query batch of {} floats is not a multiple of dim {}",
            queries.len(),
            g.dim
        );
        let ef = self.ef_search.load(AtomicOrdering::Relaxed).max(k);
        let vecs = Vectors::new(matrix);
        Ok(queries
            .par_chunks(g.dim)
            .map_init(
                || (Scratch::new(g.n), Vec::new()),
                |(scratch, found), q| {
                    match quantized {
                        Some(codes) => {
                            let qc = codes.quantize_query(q);
                            self.walk(codes, &qc, ef, scratch, found);
                            // Exact scores for the beam's rows, then the best k of those.
                            for s in found.iter_mut() {
                                s.0 = vecs.score(q, s.1);
                            }
                            found.sort_unstable_by(|a, b| b.cmp(a));
                        }
                        None => self.walk(&vecs, q, ef, scratch, found),
                    }
                    found.iter().take(k).map(|s| (s.1, s.0)).collect()
                },
            )
            .collect())
    }

    /// Descend the upper layers greedily, then beam-search layer 0; the best `ef` in `found`.
    fn walk<S: Scorer>(
        &self,
        vecs: &S,
        q: &S::Query,
        ef: usize,
        scratch: &mut Scratch,
        found: &mut Vec<Scored>,
    ) {
        let g = &self.graph;
        let walk = Walk { links: g, vecs };
        let mut cur = Scored(vecs.score(q, g.entry), g.entry);
        for layer in (1..=g.max_level).rev() {
            cur = walk.greedy(q, cur, layer);
        }
        walk.beam(q, cur, ef, 0, scratch, found);
    }

    /// Write the graph (atomically with the KB generation that holds it: the caller's temp dir).
    pub fn save(&self, path: &Path) -> Result<()> {
        let g = &self.graph;
        let mut words: Vec<u32> = vec![
            VERSION,
            g.dim as u32,
            g.n as u32,
            g.m as u32,
            g.m0 as u32,
            g.ef_construction as u32,
            g.entry,
            g.max_level as u32,
        ];
        debug_assert_eq!(words.len(), HEADER_WORDS);
        let mut levels = g.levels.clone();
        levels.resize(g.n.next_multiple_of(4), 0);
        words.extend(
            levels
                .chunks(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        words.extend_from_slice(&g.level0);
        words.extend_from_slice(&g.upper_offsets);
        words.push(g.upper.len() as u32);
        words.extend_from_slice(&g.upper);
        let mut bytes = Vec::with_capacity(8 + 4 * words.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        crate::kb::store::write_synced(path, &bytes)
    }

    /// Load a saved graph for `matrix` and check every link.
    pub fn open(path: &Path, matrix: &EmbeddingMatrix, ef_search: usize) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        Self::from_bytes(&bytes, path, matrix, ef_search)
    }

    /// [`HnswIndex::open`] over the bytes of a graph file already read or mapped (`path` names it
    /// in errors).
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        matrix: &EmbeddingMatrix,
        ef_search: usize,
    ) -> Result<Self> {
        let graph = parse(bytes).with_context(|| format!("{}: bad HNSW graph", path.display()))?;
        ensure!(
            graph.n == matrix.rows() && graph.dim == matrix.dim(),
            "{}: graph over {} x {} vectors, the embeddings are {} x {}",
            path.display(),
            graph.n,
            graph.dim,
            matrix.rows(),
            matrix.dim()
        );
        Ok(Self {
            graph,
            ef_search: AtomicUsize::new(ef_search.max(1)),
        })
    }
}

/// Nodes sorted by level, highest first, shuffled within each level (deterministic seed).
fn insertion_order(levels: &[u8]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..levels.len() as u32).collect();
    let mut state = 0x5EED_u64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    // Fisher-Yates, then a stable sort by level keeps the shuffle inside each level.
    for i in (1..order.len()).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    order.sort_by_key(|&v| std::cmp::Reverse(levels[v as usize]));
    order
}

/// Add `node` to `nb`'s links on `layer`; when they overflow, re-select `nb`'s `max` links among
/// the old ones and `node` with the same heuristic.
fn link_back(
    building: &mut Building,
    vecs: &Vectors,
    nb: u32,
    node: u32,
    layer: usize,
    max: usize,
) {
    let list = &mut building.nodes[nb as usize][layer];
    if list.contains(&node) {
        return;
    }
    if list.len() < max {
        list.push(node);
        return;
    }
    let old = std::mem::take(list);
    *list = reselect(vecs, nb, old.into_iter().chain(std::iter::once(node)), max);
}

/// The best `max` of `links` as `base`'s neighbours, by the selection heuristic.
fn reselect(vecs: &Vectors, base: u32, links: impl Iterator<Item = u32>, max: usize) -> Vec<u32> {
    let mut row = Vec::new();
    vecs.row_into(base, &mut row);
    let mut cands: Vec<Scored> = links.map(|e| Scored(vecs.score(&row, e), e)).collect();
    cands.sort_unstable_by(|a, b| b.cmp(a));
    let mut kept = Vec::with_capacity(max);
    select_neighbors(vecs, &cands, max, &mut kept);
    kept
}

fn freeze(
    building: Building,
    levels: Vec<u8>,
    dim: usize,
    m: usize,
    ef_construction: usize,
    entry: u32,
    max_level: usize,
) -> HnswGraph {
    let n = levels.len();
    let m0 = 2 * m;
    let mut level0 = vec![0u32; n * (1 + m0)];
    let mut upper_offsets = vec![u32::MAX; n];
    let mut upper = Vec::new();
    for (node, lists) in building.nodes.into_iter().enumerate() {
        let slot = &mut level0[node * (1 + m0)..][..1 + m0];
        slot[0] = lists[0].len() as u32;
        slot[1..1 + lists[0].len()].copy_from_slice(&lists[0]);
        if lists.len() > 1 {
            upper_offsets[node] = upper.len() as u32;
            for l in &lists[1..] {
                upper.push(l.len() as u32);
                upper.extend_from_slice(l);
                upper.extend(std::iter::repeat_n(0, m - l.len()));
            }
        }
    }
    HnswGraph {
        dim,
        n,
        m,
        m0,
        ef_construction,
        entry,
        max_level,
        levels,
        level0,
        upper_offsets,
        upper,
    }
}

/// Parse and validate a saved graph: sizes, levels, counts and every link id.
fn parse(bytes: &[u8]) -> Result<HnswGraph> {
    ensure!(
        bytes.len() >= 8 + 4 * HEADER_WORDS && &bytes[..8] == MAGIC,
        "not a rustrag HNSW file"
    );
    ensure!(
        (bytes.len() - 8).is_multiple_of(4),
        "truncated ({} bytes)",
        bytes.len()
    );
    let words: Vec<u32> = bytes[8..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let h = &words[..HEADER_WORDS];
    ensure!(
        h[0] == VERSION,
        "HNSW file version {} (this rustrag reads {VERSION}); rebuild the index",
        h[0]
    );
    let (dim, n, m, m0) = (h[1] as usize, h[2] as usize, h[3] as usize, h[4] as usize);
    let (ef_construction, entry, max_level) = (h[5] as usize, h[6], h[7] as usize);
    ensure!(m >= 2 && m0 == 2 * m, "bad M {m} / M0 {m0}");
    ensure!(
        n > 0 && (entry as usize) < n,
        "entry {entry} outside {n} nodes"
    );
    ensure!(max_level <= MAX_LEVEL, "max level {max_level}");
    let mut at = HEADER_WORDS;
    let mut take = |len: usize, what: &str| -> Result<&[u32]> {
        let s = words
            .get(at..at + len)
            .with_context(|| format!("truncated in {what}"))?;
        at += len;
        Ok(s)
    };
    let levels: Vec<u8> = take(n.div_ceil(4), "levels")?
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .take(n)
        .collect();
    let level0 = take(n * (1 + m0), "layer 0")?.to_vec();
    let upper_offsets = take(n, "upper offsets")?.to_vec();
    let upper_len = take(1, "upper length")?[0] as usize;
    let upper = take(upper_len, "upper layers")?.to_vec();
    ensure!(at == words.len(), "{} trailing words", words.len() - at);
    ensure!(
        levels[entry as usize] as usize == max_level,
        "entry node {entry} is not on the top level {max_level}"
    );
    let check = |slot: &[u32], max: usize, node: usize, layer: usize| -> Result<()> {
        let count = slot[0] as usize;
        if count > max {
            bail!("node {node} layer {layer}: {count} links > {max}");
        }
        if let Some(bad) = slot[1..1 + count].iter().find(|&&e| e as usize >= n) {
            bail!("node {node} layer {layer}: link to {bad} outside {n} nodes");
        }
        Ok(())
    };
    for node in 0..n {
        check(&level0[node * (1 + m0)..][..1 + m0], m0, node, 0)?;
        let level = levels[node] as usize;
        ensure!(
            level <= max_level,
            "node {node}: level {level} > {max_level}"
        );
        let off = upper_offsets[node];
        match (level, off) {
            (0, u32::MAX) => {}
            (0, _) | (_, u32::MAX) => bail!("node {node}: upper offset {off} vs level {level}"),
            (_, off) => {
                let end = off as usize + level * (1 + m);
                ensure!(end <= upper.len(), "node {node}: upper links out of range");
                for l in 1..=level {
                    let s = off as usize + (l - 1) * (1 + m);
                    check(&upper[s..s + 1 + m], m, node, l)?;
                }
            }
        }
    }
    Ok(HnswGraph {
        dim,
        n,
        m,
        m0,
        ef_construction,
        entry,
        max_level,
        levels,
        level0,
        upper_offsets,
        upper,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kb::embeddings::EmbeddingWriter;
    use crate::kb::EmbeddingDtype;

    /// Clustered unit vectors (noisy copies of a few centres), like real embeddings: `[n, dim]`.
    fn clustered(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut gauss = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let v = ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        };
        let centres: Vec<f32> = (0..50 * dim).map(|_| gauss()).collect();
        let mut out = Vec::with_capacity(n * dim);
        for i in 0..n {
            let c = &centres[(i % 50) * dim..][..dim];
            let v: Vec<f32> = c.iter().map(|x| x + 0.7 * gauss()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            out.extend(v.iter().map(|x| x / norm));
        }
        out
    }

    fn matrix(dir: &Path, data: &[f32], dim: usize, dtype: EmbeddingDtype) -> EmbeddingMatrix {
        let mut w = EmbeddingWriter::create(dir, dim, dtype).unwrap();
        w.append(data).unwrap();
        let rows = w.finish().unwrap();
        EmbeddingMatrix::open(dir, rows, dim, dtype).unwrap()
    }

    fn params(ef_search: usize) -> HnswParams {
        HnswParams {
            m: 16,
            ef_construction: 100,
            ef_search,
        }
    }

    #[test]
    fn recall_against_exact_search_f32_and_f16() {
        let (n, dim) = (3000, 48);
        let data = clustered(n, dim, 7);
        let queries = clustered(200, dim, 99);
        for dtype in [EmbeddingDtype::F32, EmbeddingDtype::F16] {
            let dir = tempfile::tempdir().unwrap();
            let m = matrix(dir.path(), &data, dim, dtype);
            let exact = crate::kb::index::exact::exact_search(&m, &queries, 10).unwrap();
            let index = HnswIndex::build(&m, &params(100)).unwrap();
            let codes = QuantizedEmbeddings::build(&m);
            // The walk on f32 rows and on the quantised codes.
            for quantized in [None, Some(&codes)] {
                let got = index.search(&m, quantized, &queries, 10).unwrap();
                let hits: usize = got
                    .iter()
                    .zip(&exact)
                    .map(|(g, e)| g.iter().filter(|h| e.iter().any(|x| x.0 == h.0)).count())
                    .sum();
                let recall = hits as f64 / (10 * 200) as f64;
                let codes = quantized.is_some();
                assert!(
                    recall >= 0.95,
                    "{dtype:?} codes {codes}: recall@10 {recall}"
                );
                // Scores are the inner products, best first.
                for (hits, q) in got.iter().zip(queries.chunks(dim)) {
                    for (row, score) in hits {
                        let want: f32 = q
                            .iter()
                            .zip(&m.row(*row as usize))
                            .map(|(a, b)| a * b)
                            .sum();
                        assert!((score - want).abs() < 1e-4, "score {score} vs {want}");
                    }
                    assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1));
                }
            }
        }
    }

    #[test]
    fn graph_is_the_same_for_any_thread_count_and_round_trips() {
        let (n, dim) = (700, 16);
        let data = clustered(n, dim, 3);
        let dir = tempfile::tempdir().unwrap();
        let m = matrix(dir.path(), &data, dim, EmbeddingDtype::F32);
        let build = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| HnswIndex::build(&m, &params(32)).unwrap())
        };
        let (one, two) = (build(1), build(2));
        let (p1, p2) = (dir.path().join("one.graph"), dir.path().join("two.graph"));
        one.save(&p1).unwrap();
        two.save(&p2).unwrap();
        let bytes = std::fs::read(&p1).unwrap();
        assert_eq!(
            bytes,
            std::fs::read(&p2).unwrap(),
            "graph depends on threads"
        );
        let back = HnswIndex::open(&p1, &m, 32).unwrap();
        let q = &data[..4 * dim];
        assert_eq!(
            back.search(&m, None, q, 5).unwrap(),
            one.search(&m, None, q, 5).unwrap()
        );
        // Each query is a stored vector: it finds itself first.
        for (i, hits) in back.search(&m, None, q, 5).unwrap().iter().enumerate() {
            assert_eq!(hits[0].0 as usize, i);
        }
    }

    #[test]
    fn corrupt_or_mismatched_graph_files_are_refused() {
        let (n, dim) = (300, 8);
        let data = clustered(n, dim, 5);
        let dir = tempfile::tempdir().unwrap();
        let m = matrix(dir.path(), &data, dim, EmbeddingDtype::F32);
        let path = dir.path().join("hnsw.graph");
        HnswIndex::build(&m, &params(16))
            .unwrap()
            .save(&path)
            .unwrap();
        let good = std::fs::read(&path).unwrap();
        let bad = dir.path().join("bad.graph");
        let err = |bytes: &[u8]| {
            std::fs::write(&bad, bytes).unwrap();
            format!(
                "{:#}",
                HnswIndex::open(&bad, &m, 16).err().expect("refused")
            )
        };
        assert!(err(&good[..good.len() - 4]).contains("bad HNSW graph"));
        assert!(err(b"not a graph at all, really").contains("not a rustrag HNSW file"));
        // A link pointing past the last node (first link of node 0 on layer 0).
        let mut corrupt = good.clone();
        let header = 8 + 4 * HEADER_WORDS + n.div_ceil(4) * 4;
        corrupt[header + 4..header + 8].copy_from_slice(&(n as u32 + 5).to_le_bytes());
        assert!(err(&corrupt).contains("outside"), "{}", err(&corrupt));
        // The same graph against a matrix of another size.
        let other_dir = tempfile::tempdir().unwrap();
        let other = matrix(
            other_dir.path(),
            &data[..(n - 1) * dim],
            dim,
            EmbeddingDtype::F32,
        );
        let e = HnswIndex::open(&path, &other, 16).err().expect("refused");
        assert!(format!("{e:#}").contains("graph over 300"), "{e:#}");
    }
}
