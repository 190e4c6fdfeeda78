//! Search hits ordered for heaps: best-first `Scored`, and `Worst` for keeping the best `k`.

use std::cmp::Ordering;

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
