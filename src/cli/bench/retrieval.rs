//! `rustrag bench retrieval`: exact and HNSW inner-product search against faiss-cpu (IndexFlatIP,
//! IndexHNSWFlat), in the same run, on the same vectors: the embeddings of real knowledge bases, and
//! a larger set made by perturbing them. Queries are real questions embedded by the KB's encoder.

use super::Peer;
use anyhow::{ensure, Context, Result};
use rustrag::kb::{EmbeddingMatrix, HnswParams, KnowledgeBase};
use rustrag::retrieve::dense::exact_search;
use rustrag::retrieve::hnsw::HnswIndex;
use rustrag::retrieve::quantized::QuantizedEmbeddings;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct RetrievalArgs {
    /// Knowledge bases whose embeddings form the base set (must share dim and encoder).
    #[arg(long, required = true, num_args = 1..)]
    pub kb: Vec<PathBuf>,
    /// BEIR queries.jsonl[.gz] files; questions are embedded with the KB encoder.
    #[arg(long, required = true, num_args = 1..)]
    pub queries: Vec<PathBuf>,
    /// Questions used (split evenly over the query files).
    #[arg(long, default_value_t = 1000)]
    pub max_queries: usize,
    /// Size of the perturbed set (real vectors + noisy copies; 0 = skip).
    #[arg(long, default_value_t = 100_000)]
    pub synthetic: usize,
    /// Noise norm relative to the copied vector's norm.
    #[arg(long, default_value_t = 0.5)]
    pub noise: f32,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    #[arg(long, default_value_t = 32)]
    pub m: usize,
    #[arg(long, default_value_t = 128)]
    pub ef_construction: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10,12,16,24,32,48,64,96,128,256"
    )]
    pub ef_search: Vec<usize>,
    /// Timed repetitions (best is kept), both sides: many, because the runs are short and the
    /// best of a few is still at the mercy of a noisy machine.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Rounds of (rustrag, faiss) measurements; each point keeps its best over the rounds, so a
    /// slow spell of the machine does not land on one side only.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Keep the vector files here (default: a temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Point {
    ef_search: usize,
    seconds: f64,
    qps: f64,
    recall: f64,
}

#[derive(serde::Serialize)]
struct SetResult {
    name: String,
    n: usize,
    nq: usize,
    dim: usize,
    exact_seconds: f64,
    exact_qps: f64,
    /// Building the quantised copy (once per knowledge base).
    exact_quantize_seconds: f64,
    /// Queries whose quantised-pass hits (rows, order, scores) differ from the f32 scan's.
    exact_differing_queries: usize,
    /// The plain f32 scan (blocked GEMM + top-k).
    scan_qps: f64,
    /// Queries whose faiss IndexFlatIP hits are ours (as sets); the exact ratios are reported
    /// only when that is every query.
    faiss_flat_same_hits: usize,
    scan_speedup_vs_faiss: Option<f64>,
    hnsw_build_seconds: f64,
    /// The walk on the quantised codes (as the retriever searches), f32 re-scored at the end.
    hnsw_curve: Vec<Point>,
    /// The walk on f32 rows.
    hnsw_f32_curve: Vec<Point>,
    faiss: serde_json::Value,
    exact_speedup_vs_faiss: Option<f64>,
    /// Best QPS at recall@k >= 0.95 (ours, faiss) and their ratio.
    hnsw_qps_at_095: Option<f64>,
    faiss_hnsw_qps_at_095: Option<f64>,
    hnsw_speedup_vs_faiss_at_095: Option<f64>,
    hnsw_build_speedup_vs_faiss: f64,
}

fn best_of<T>(repeats: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let r = f()?;
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    Ok((best, out.expect("at least one run")))
}

fn write_f32(path: &Path, v: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

/// Deterministic Gaussian noise (splitmix64 + Box-Muller); no RNG dependency needed.
struct Noise(u64);

impl Noise {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// `real` plus noisy copies of random real rows up to `total` rows; copies keep their source's norm.
fn perturb(real: &[f32], dim: usize, total: usize, noise: f32) -> Vec<f32> {
    let n = real.len() / dim;
    let mut out = real.to_vec();
    let mut rng = Noise(42);
    let mut v = vec![0f32; dim];
    while out.len() < total * dim {
        let src = &real[(rng.next_u64() % n as u64) as usize * dim..][..dim];
        let norm = src.iter().map(|x| x * x).sum::<f32>().sqrt();
        let scale = noise * norm / (dim as f32).sqrt();
        for (o, s) in v.iter_mut().zip(src) {
            *o = s + scale * rng.gauss();
        }
        let vn = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        out.extend(v.iter().map(|x| x * norm / vn));
    }
    out
}

fn read_questions(files: &[PathBuf], max: usize) -> Result<Vec<String>> {
    let per = max.div_ceil(files.len().max(1));
    let mut out = Vec::new();
    for f in files {
        let file = std::fs::File::open(f).with_context(|| format!("open {}", f.display()))?;
        let r: Box<dyn BufRead> = if f.extension().is_some_and(|e| e == "gz") {
            Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
                file,
            )))
        } else {
            Box::new(std::io::BufReader::new(file))
        };
        for (i, line) in r.lines().enumerate().take(per) {
            let line = line.with_context(|| format!("{}:{}", f.display(), i + 1))?;
            let v: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not JSON", f.display(), i + 1))?;
            let text = v["text"]
                .as_str()
                .or(v["question"].as_str())
                .with_context(|| format!("{}:{}: no `text` or `question`", f.display(), i + 1))?;
            out.push(text.to_string());
        }
    }
    ensure!(!out.is_empty(), "no questions in the query files");
    Ok(out)
}

/// One round of rustrag measurements.
struct Round {
    exact_s: f64,
    scan_s: f64,
    differing: usize,
    curve: Vec<Point>,
    f32_curve: Vec<Point>,
}

impl Round {
    /// Per measurement, the faster of two rounds (the searches and hits are the same).
    fn best(self, o: Round) -> Round {
        let faster = |a: Vec<Point>, b: Vec<Point>| {
            a.into_iter()
                .zip(b)
                .map(|(p, q)| if q.seconds < p.seconds { q } else { p })
                .collect()
        };
        Round {
            exact_s: self.exact_s.min(o.exact_s),
            scan_s: self.scan_s.min(o.scan_s),
            differing: self.differing.max(o.differing),
            curve: faster(self.curve, o.curve),
            f32_curve: faster(self.f32_curve, o.f32_curve),
        }
    }
}

/// Per measurement, the faster of two faiss rounds; the build time of the round that built.
fn best_faiss(mut a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    let secs = |v: &serde_json::Value| v["seconds"].as_f64().unwrap_or(f64::INFINITY);
    if secs(&b["flat"]) < secs(&a["flat"]) {
        a["flat"] = b["flat"].clone();
    }
    if let (Some(ca), Some(cb)) = (
        a["hnsw"]["curve"].as_array_mut(),
        b["hnsw"]["curve"].as_array(),
    ) {
        for (pa, pb) in ca.iter_mut().zip(cb) {
            if secs(pb) < secs(pa) {
                *pa = pb.clone();
            }
        }
    }
    a
}

fn hnsw_at_095(curve: &[(f64, f64)]) -> Option<f64> {
    curve
        .iter()
        .filter(|(r, _)| *r >= 0.95)
        .map(|(_, q)| *q)
        .fold(None, |a, q| Some(a.map_or(q, |a: f64| a.max(q))))
}

fn bench_set(
    a: &RetrievalArgs,
    peer: &Peer,
    name: &str,
    base: &[f32],
    queries: &[f32],
    dim: usize,
    work: &Path,
) -> Result<SetResult> {
    let n = base.len() / dim;
    let nq = queries.len() / dim;
    let dir = tempfile::tempdir_in(work)?;
    // Reuse the KB writer so the searched matrix is a real memory-mapped embeddings file.
    rustrag::kb::store::write_synced(
        &dir.path().join(rustrag::kb::embeddings::file_name(
            rustrag::kb::EmbeddingDtype::F32,
        )),
        &base
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>(),
    )?;
    let matrix =
        EmbeddingMatrix::open(dir.path(), n as u64, dim, rustrag::kb::EmbeddingDtype::F32)?;
    // Exact search as the retriever runs it (quantised pass, f32 survivors), and the plain f32
    // scan, which is also the ground truth for recall.
    let t = Instant::now();
    let quantized = QuantizedEmbeddings::build(&matrix);
    let quantize_s = t.elapsed().as_secs_f64();
    let warm = &queries[..dim * nq.min(16)];
    let gt = exact_search(&matrix, queries, a.k)?;
    let params = HnswParams {
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search: a.ef_search[0],
    };
    let t = Instant::now();
    let hnsw = HnswIndex::build(&matrix, &params)?;
    let build_s = t.elapsed().as_secs_f64();
    let measure = || -> Result<Round> {
        quantized.search(&matrix, warm, a.k)?;
        let (exact_s, exact) = best_of(a.repeats, || quantized.search(&matrix, queries, a.k))?;
        exact_search(&matrix, warm, a.k)?;
        let (scan_s, _) = best_of(a.repeats, || exact_search(&matrix, queries, a.k))?;
        // Rows, order and scores, to the bit.
        let differing = exact.iter().zip(&gt).filter(|(a, b)| a != b).count();
        let (mut curve, mut f32_curve) = (Vec::new(), Vec::new());
        for &ef in &a.ef_search {
            hnsw.set_ef_search(ef.max(a.k));
            // As the retriever searches (walk on the quantised codes), and the walk on f32 rows.
            let run = |codes: Option<&QuantizedEmbeddings>| -> Result<Point> {
                hnsw.search(&matrix, codes, warm, a.k)?;
                let (s, res) = best_of(a.repeats, || hnsw.search(&matrix, codes, queries, a.k))?;
                let hit: usize = res
                    .iter()
                    .zip(&gt)
                    .map(|(r, g)| {
                        r.iter()
                            .filter(|(row, _)| g.iter().any(|(gr, _)| gr == row))
                            .count()
                    })
                    .sum();
                Ok(Point {
                    ef_search: ef,
                    seconds: s,
                    qps: nq as f64 / s,
                    recall: hit as f64 / (nq * a.k) as f64,
                })
            };
            curve.push(run(Some(&quantized))?);
            f32_curve.push(run(None)?);
        }
        Ok(Round {
            exact_s,
            scan_s,
            differing,
            curve,
            f32_curve,
        })
    };
    // Files for the peer.
    let base_f = dir.path().join("base.f32");
    let q_f = dir.path().join("queries.f32");
    let gt_f = dir.path().join("gt.u32");
    write_f32(&base_f, base)?;
    write_f32(&q_f, queries)?;
    let gt_bytes: Vec<u8> = gt
        .iter()
        .flat_map(|r| r.iter().flat_map(|(row, _)| row.to_le_bytes()))
        .collect();
    std::fs::write(&gt_f, gt_bytes)?;
    let efs: Vec<String> = a.ef_search.iter().map(|e| e.to_string()).collect();
    let args: Vec<String> = [
        "--base",
        &base_f.display().to_string(),
        "--queries",
        &q_f.display().to_string(),
        "--gt",
        &gt_f.display().to_string(),
        "--dim",
        &dim.to_string(),
        "--k",
        &a.k.to_string(),
        "--m",
        &a.m.to_string(),
        "--ef-construction",
        &a.ef_construction.to_string(),
        "--ef-search",
        &efs.join(","),
        "--repeats",
        &a.repeats.to_string(),
        "--hnsw-cache",
        &dir.path().join("faiss.hnsw").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut ours = measure()?;
    let mut faiss = peer.run("faiss_bench.py", &args)?;
    for round in 1..a.rounds.max(1) {
        tracing::info!("{name}: round {}", round + 1);
        ours = ours.best(measure()?);
        faiss = best_faiss(faiss, peer.run("faiss_bench.py", &args)?);
    }
    let Round {
        exact_s,
        scan_s,
        differing: exact_differing_queries,
        curve,
        f32_curve,
    } = ours;
    tracing::info!(
        "{name}: exact {n} x {dim}, {nq} queries: {exact_s:.3}s (f32 scan {scan_s:.3}s)"
    );
    let f_exact_qps = faiss["flat"]["qps"].as_f64().unwrap_or(f64::NAN);
    let f_curve: Vec<(f64, f64)> = faiss["hnsw"]["curve"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|p| {
                    (
                        p["recall"].as_f64().unwrap_or(0.0),
                        p["qps"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let ours: Vec<(f64, f64)> = curve.iter().map(|p| (p.recall, p.qps)).collect();
    let (o95, f95) = (hnsw_at_095(&ours), hnsw_at_095(&f_curve));
    let exact_qps = nq as f64 / exact_s;
    let same_hits = faiss["flat"]["same_hits"].as_u64().unwrap_or(0) as usize;
    let if_same = |r: f64| (same_hits == nq && exact_differing_queries == 0).then_some(r);
    Ok(SetResult {
        name: name.into(),
        n,
        nq,
        dim,
        exact_seconds: exact_s,
        exact_qps,
        exact_quantize_seconds: quantize_s,
        exact_differing_queries,
        scan_qps: nq as f64 / scan_s,
        faiss_flat_same_hits: same_hits,
        scan_speedup_vs_faiss: if_same(nq as f64 / scan_s / f_exact_qps),
        hnsw_build_seconds: build_s,
        hnsw_curve: curve,
        hnsw_f32_curve: f32_curve,
        exact_speedup_vs_faiss: if_same(exact_qps / f_exact_qps),
        hnsw_qps_at_095: o95,
        faiss_hnsw_qps_at_095: f95,
        hnsw_speedup_vs_faiss_at_095: o95.zip(f95).map(|(o, f)| o / f),
        hnsw_build_speedup_vs_faiss: faiss["hnsw"]["build_seconds"].as_f64().unwrap_or(f64::NAN)
            / build_s,
        faiss,
    })
}

/// Run the retrieval benchmark and print a table (or JSON).
pub fn run(a: RetrievalArgs, peer: &Peer, json: bool) -> Result<()> {
    ensure!(
        !a.ef_search.is_empty(),
        "--ef-search needs at least one value"
    );
    let mut base = Vec::new();
    let mut dim = 0;
    let mut encoder_src = String::new();
    for dir in &a.kb {
        let kb = KnowledgeBase::open(dir)?;
        if dim == 0 {
            dim = kb.dim();
            encoder_src = kb.manifest().encoder.source.clone();
        }
        ensure!(
            kb.dim() == dim,
            "{}: dim {} differs from {dim}",
            dir.display(),
            kb.dim()
        );
        let mut buf = Vec::new();
        kb.embeddings().rows_f32_into(0, kb.len(), &mut buf);
        base.extend(buf);
    }
    let questions = read_questions(&a.queries, a.max_queries)?;
    let encoder = super::super::index::load_encoder(&encoder_src, 64, None, false, None)?;
    let refs: Vec<&str> = questions.iter().map(|s| s.as_str()).collect();
    let t = Instant::now();
    let q = encoder
        .encode_texts(&refs)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    tracing::info!(
        "embedded {} questions in {:.1}s",
        questions.len(),
        t.elapsed().as_secs_f64()
    );
    let work = a.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&work)?;
    let mut results = vec![bench_set(&a, peer, "real", &base, &q, dim, &work)?];
    if a.synthetic > base.len() / dim {
        let big = perturb(&base, dim, a.synthetic, a.noise);
        results.push(bench_set(
            &a,
            peer,
            &format!("perturbed-{}", a.synthetic),
            &big,
            &q,
            dim,
            &work,
        )?);
    }
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"benchmark": "retrieval", "k": a.k, "m": a.m,
            "ef_construction": a.ef_construction, "threads": rayon::current_num_threads(), "sets": results})
            )?
        );
        return Ok(());
    }
    let r2 = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
    let ratio = |x: Option<f64>| x.map_or("- (hits differ)".to_string(), |v| format!("{v:.2}x"));
    for r in &results {
        outln!(
            "== {} : {} vectors x {}, {} queries, k={} (threads: ours {}, faiss {}; faiss build: {})",
            r.name,
            r.n,
            r.dim,
            r.nq,
            a.k,
            rayon::current_num_threads(),
            r.faiss["threads"],
            r.faiss["compile_options"]
        );
        outln!(
            "exact    rustrag {:>9.0} QPS   faiss IndexFlatIP {:>9.0} QPS   ratio {}   \
             (same hits as the f32 scan: {}/{} queries; faiss's the same: {}/{}; quantised copy built in {:.3}s)",
            r.exact_qps,
            r.faiss["flat"]["qps"].as_f64().unwrap_or(f64::NAN),
            ratio(r.exact_speedup_vs_faiss),
            r.nq - r.exact_differing_queries,
            r.nq,
            r.faiss_flat_same_hits,
            r.nq,
            r.exact_quantize_seconds
        );
        outln!(
            "f32 scan rustrag {:>9.0} QPS   ratio {}",
            r.scan_qps,
            ratio(r.scan_speedup_vs_faiss)
        );
        outln!(
            "hnsw build (M={}, efC={}): rustrag {:.2}s   faiss {:.2}s",
            a.m,
            a.ef_construction,
            r.hnsw_build_seconds,
            r.faiss["hnsw"]["build_seconds"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
        outln!(
            "  ef   rustrag QPS  recall@{k}   faiss QPS  recall@{k}   (rustrag f32 walk: QPS  recall@{k})",
            k = a.k
        );
        for (i, (p, p32)) in r.hnsw_curve.iter().zip(&r.hnsw_f32_curve).enumerate() {
            let f = &r.faiss["hnsw"]["curve"][i];
            outln!(
                "  {:>4} {:>11.0}  {:>9.4}  {:>10.0}  {:>9.4}   {:>22.0}  {:>9.4}",
                p.ef_search,
                p.qps,
                p.recall,
                f["qps"].as_f64().unwrap_or(f64::NAN),
                f["recall"].as_f64().unwrap_or(f64::NAN),
                p32.qps,
                p32.recall
            );
        }
        outln!(
            "  best QPS at recall >= 0.95: rustrag {}  faiss {}  ratio {}",
            r2(r.hnsw_qps_at_095),
            r2(r.faiss_hnsw_qps_at_095),
            r.hnsw_speedup_vs_faiss_at_095
                .map_or("-".into(), |v| format!("{v:.2}x"))
        );
    }
    Ok(())
}
