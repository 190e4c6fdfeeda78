//! Search hits ordered for heaps: best-first `Scored`, `Worst` for keeping the best `k`, and
//! `TopK`, the best `k` seen so far.

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

    /// Offer `scores[j]` for rows `first + j`. Chunks with no score at the threshold are
    /// skipped with one vectorised comparison, so the heap is touched only for contenders.
    pub(crate) fn push_row(&mut self, scores: &[f32], first: usize) {
        const CHUNK: usize = 16;
        let mut threshold = self.threshold();
        for (c, chunk) in scores.chunks(CHUNK).enumerate() {
            // No short circuit, so the comparison vectorises.
            if !chunk.iter().fold(false, |any, &s| any | (s >= threshold)) {
                continue;
            }
            for (j, &s) in chunk.iter().enumerate() {
                if s >= threshold {
                    self.push(s, (first + c * CHUNK + j) as u32);
                    threshold = self.threshold();
                }
            }
        }
    }

    pub(crate) fn merge(mut self, other: TopK) -> Self {
        for Worst(Scored(score, row)) in other.heap {
            self.push(score, row);
        }
        self
    }

    /// Best first.
    pub(crate) fn into_sorted(self) -> Vec<(u32, f32)> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Worst(Scored(score, row))| (row, score))
            .collect()
    }
}
