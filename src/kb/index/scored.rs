//! Search hits ordered for heaps: best-first `Scored`, `Worst` for keeping the best `k`,
//! `TopK`, the best `k` seen so far, and `Contenders`, every row that may still be in the top `k`
//! under a score known only to within a margin.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// `(score, row)` ordered by score, then by the lower row (deterministic ties).
#[derive(Clone, Copy, PartialEq)]
pub(crate) struct Scored(pub f32, pub u32);

impl Eq for Scored {}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Min-heap adapter: the worst kept result on top.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Worst(pub Scored);

impl Ord for Worst {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.cmp(&self.0)
    }
}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// The best `k` (score, row) pairs seen so far.
#[derive(Clone)]
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, score: f32, row: u32) {
        if self.heap.len() < self.k {
            self.heap.push(Worst(Scored(score, row)));
        } else if let Some(worst) = self.heap.peek() {
            if Worst(Scored(score, row)) < *worst {
                self.heap.pop();
                self.heap.push(Worst(Scored(score, row)));
            }
        }
    }

    /// The score a hit must reach to enter (`-inf` until `k` hits are kept).
    #[inline]
    pub(crate) fn threshold(&self) -> f32 {
        match self.heap.peek() {
            Some(w) if self.heap.len() == self.k => w.0 .0,
            _ => f32::NEG_INFINITY,
        }
    }

    pub(crate) fn merge(mut self, other: TopK) -> Self {
        for Worst(Scored(score, row)) in other.heap {
            self.push(score, row);
        }
        self
    }
}

/// The best `k` approximate scores seen so far and every row whose approximate score came within
/// `margin` of the running k-th best. When each approximate score is within `margin / 2` of the
/// final one, the rows kept are a superset of the final top `k`.
#[derive(Clone)]
pub(crate) struct Contenders {
    k: usize,
    pub(crate) best: TopK,
    /// `(approximate score, row)`; may also hold rows the risen floor has since excluded.
    pub(crate) rows: Vec<(f32, u32)>,
    prune_at: usize,
}

impl Contenders {
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            best: TopK::new(k),
            rows: Vec::new(),
            prune_at: 64 + 8 * k,
        }
    }

    /// Approximate scores below this cannot reach the top k (`-inf` until k rows were seen).
    #[inline]
    pub(crate) fn floor(&self, margin: f32) -> f32 {
        self.best.threshold() - margin
    }

    /// Offer one row's approximate score.
    #[inline]
    pub(crate) fn offer(&mut self, score: f32, row: u32, margin: f32) {
        if score >= self.floor(margin) {
            self.rows.push((score, row));
            self.best.push(score, row);
            // Early rows all enter; drop those the risen floor has excluded since (amortised:
            // the next prune waits until the list has doubled).
            if self.rows.len() >= self.prune_at {
                let floor = self.floor(margin);
                self.rows.retain(|c| c.0 >= floor);
                self.prune_at = (2 * self.rows.len()).max(64 + 8 * self.k);
            }
        }
    }

    /// Offer `scores[j]` for rows `first + j`. Chunks with no score at the floor are skipped with
    /// one vectorised comparison, so the lists are touched only for contenders.
    pub(crate) fn offer_row(&mut self, scores: &[f32], first: usize, margin: f32) {
        const CHUNK: usize = 16;
        let mut floor = self.floor(margin);
        for (c, chunk) in scores.chunks(CHUNK).enumerate() {
            // No short circuit, so the comparison vectorises.
            if !chunk.iter().fold(false, |any, &s| any | (s >= floor)) {
                continue;
            }
            for (j, &s) in chunk.iter().enumerate() {
                if s >= floor {
                    self.offer(s, (first + c * CHUNK + j) as u32, margin);
                    floor = self.floor(margin);
                }
            }
        }
    }
}

/// The final top `k` from per-share contenders (`parts`, one per share of the rows): the rows whose
/// approximate score is within `margin` of the merged k-th best, scored by `score(row)` and ranked
/// by score descending, then row ascending.
pub(crate) fn top_k_of<'a>(
    parts: impl Iterator<Item = &'a Contenders> + Clone,
    k: usize,
    margin: f32,
    mut score: impl FnMut(u32) -> f32,
) -> Vec<(u32, f32)> {
    let threshold = parts
        .clone()
        .map(|p| p.best.clone())
        .reduce(TopK::merge)
        .map_or(f32::NEG_INFINITY, |b| b.threshold());
    let floor = threshold - margin;
    let mut found: Vec<Scored> = parts
        .flat_map(|p| p.rows.iter())
        .filter(|c| c.0 >= floor)
        .map(|&(_, row)| Scored(score(row), row))
        .collect();
    found.sort_unstable_by(|a, b| b.cmp(a));
    found.truncate(k);
    found.into_iter().map(|s| (s.1, s.0)).collect()
}
