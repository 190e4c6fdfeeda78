//! Prometheus text-format metrics: requests by route and status, latency histograms, queue depth,
//! tokens generated, batches decoded, knowledge-base swaps.

use crate::kb::IntegrityStatus;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Histogram bucket upper bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Default)]
struct Histogram {
    /// Cumulative counts are computed when rendering; these are per bucket (+Inf last).
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        let i = BUCKETS
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    /// (method, route, status) → requests.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// (method, route) → seconds to the response head.
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    /// Seconds from a question's arrival to its first generated token.
    first_token: Mutex<Histogram>,
    /// Seconds a request waited for the answer worker.
    queue_wait: Mutex<Histogram>,
    pub tokens_generated: AtomicU64,
    pub batches: AtomicU64,
    pub batched_questions: AtomicU64,
    pub rejected_full: AtomicU64,
    pub timeouts: AtomicU64,
    pub cancelled: AtomicU64,
    pub kb_swaps: AtomicU64,
    pub panics: AtomicU64,
}

impl Metrics {
    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let key = (method.to_string(), route.to_string());
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((key.0.clone(), key.1.clone(), status))
            .or_default() += 1;
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .observe(seconds);
    }

    pub fn first_token(&self, seconds: f64) {
        self.first_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(seconds);
    }

    pub fn queue_wait(&self, seconds: f64) {
        self.queue_wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(seconds);
    }

    /// The Prometheus text exposition, with the gauges read by the caller (`integrity`: the
    /// served KB's block checks).
    pub fn render(
        &self,
        queue_depth: usize,
        queue_capacity: usize,
        kb_generation: &str,
        integrity: Option<&IntegrityStatus>,
    ) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP rustrag_http_requests_total HTTP requests by method, route and status.\n# TYPE rustrag_http_requests_total counter"
        );
        for ((m, r, s), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "rustrag_http_requests_total{{method=\"{m}\",route=\"{r}\",status=\"{s}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP rustrag_http_request_duration_seconds Time to the response head (streams: to the first byte of the stream).\n# TYPE rustrag_http_request_duration_seconds histogram"
        );
        for ((m, r), h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h.render(
                &mut out,
                "rustrag_http_request_duration_seconds",
                &format!("method=\"{m}\",route=\"{r}\""),
            );
        }
        let _ = writeln!(
            out,
            "# HELP rustrag_time_to_first_token_seconds From a question's arrival to its first generated token.\n# TYPE rustrag_time_to_first_token_seconds histogram"
        );
        self.first_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .render(&mut out, "rustrag_time_to_first_token_seconds", "");
        let _ = writeln!(
            out,
            "# HELP rustrag_queue_wait_seconds Time a question waited for the answer worker.\n# TYPE rustrag_queue_wait_seconds histogram"
        );
        self.queue_wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .render(&mut out, "rustrag_queue_wait_seconds", "");
        let _ = writeln!(
            out,
            "# HELP rustrag_queue_depth Requests admitted and not finished (waiting or running).\n# TYPE rustrag_queue_depth gauge\nrustrag_queue_depth {queue_depth}"
        );
        let _ = writeln!(
            out,
            "# HELP rustrag_queue_capacity Requests admitted at most.\n# TYPE rustrag_queue_capacity gauge\nrustrag_queue_capacity {queue_capacity}"
        );
        let o = Ordering::Relaxed;
        counter(
            &mut out,
            "rustrag_tokens_generated_total",
            "Tokens generated (end-of-sequence tokens included).",
            self.tokens_generated.load(o),
        );
        counter(
            &mut out,
            "rustrag_batches_total",
            "Batches decoded by the answer worker.",
            self.batches.load(o),
        );
        counter(
            &mut out,
            "rustrag_batched_questions_total",
            "Questions decoded (batches_total divides it into batches).",
            self.batched_questions.load(o),
        );
        counter(
            &mut out,
            "rustrag_rejected_queue_full_total",
            "Requests answered 503 because the queue was full.",
            self.rejected_full.load(o),
        );
        counter(
            &mut out,
            "rustrag_timeouts_total",
            "Requests that ran past the request timeout.",
            self.timeouts.load(o),
        );
        counter(
            &mut out,
            "rustrag_cancelled_total",
            "Decodes stopped because every reader went away.",
            self.cancelled.load(o),
        );
        counter(
            &mut out,
            "rustrag_kb_swaps_total",
            "Knowledge-base generations swapped in without a restart.",
            self.kb_swaps.load(o),
        );
        counter(
            &mut out,
            "rustrag_panics_total",
            "Panics caught (answered 500).",
            self.panics.load(o),
        );
        if let Some(heap) = crate::heap_usage() {
            let _ = writeln!(
                out,
                "# HELP rustrag_heap_in_use_bytes Bytes in live heap allocations (glibc mallinfo2, all arenas).\n# TYPE rustrag_heap_in_use_bytes gauge\nrustrag_heap_in_use_bytes {}\n# HELP rustrag_heap_free_held_bytes Heap bytes freed and kept by the allocator for reuse (part of the resident memory, owned by nothing).\n# TYPE rustrag_heap_free_held_bytes gauge\nrustrag_heap_free_held_bytes {}",
                heap.in_use, heap.free_held
            );
        }
        let _ = writeln!(
            out,
            "# HELP rustrag_kb_info The served knowledge-base generation.\n# TYPE rustrag_kb_info gauge\nrustrag_kb_info{{generation=\"{}\"}} 1",
            kb_generation.replace(['"', '\\', '\n'], "_")
        );
        if let Some(i) = integrity {
            counter(
                &mut out,
                "rustrag_kb_block_checks_total",
                "Full checks of the served KB's block checksums (on open, in the background, re-checks) since it was opened.",
                i.checks,
            );
            let _ = writeln!(
                out,
                "# HELP rustrag_kb_corrupt 1 once a block check of the served KB failed (reads and dense searches fail), else 0.\n# TYPE rustrag_kb_corrupt gauge\nrustrag_kb_corrupt {}",
                u8::from(i.error.is_some())
            );
            if let Some(t) = i.last_check_unix {
                let _ = writeln!(
                    out,
                    "# HELP rustrag_kb_last_block_check_timestamp_seconds When the last full check of the served KB's block checksums finished.\n# TYPE rustrag_kb_last_block_check_timestamp_seconds gauge\nrustrag_kb_last_block_check_timestamp_seconds {t}"
                );
            }
        }
        out
    }
}
