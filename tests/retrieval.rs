//! Retrieval evaluation and BM25 on real data.
//!
//! Data come from `RUSTRAG_DATA_DIR` (default `<crate root>/../shared/data`); a missing data dir is a
//! test failure, not a skip.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use rustrag::eval::beir::corpus_passages as read_corpus;
use rustrag::eval::beir::{read_qrels, read_queries};
use rustrag::eval::metrics::{evaluate, MetricSpec, Qrels, Run};
use rustrag::retrieve::bm25::{build_index, Bm25Config, Bm25Params, Bm25Retriever, FieldLayout};
use rustrag::retrieve::Retriever;

fn data_dir() -> PathBuf {
    let dir = std::env::var_os("RUSTRAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(
        dir.join("hotpotqa-dev100/corpus.jsonl").is_file(),
        "evaluation data not found in {} (set RUSTRAG_DATA_DIR to the shared data dir)",
        dir.display()
    );
    dir
}

fn qrels(entries: &[(&str, &[(&str, i64)])]) -> Qrels {
    entries
        .iter()
        .map(|(q, j)| {
            (
                q.to_string(),
                j.iter()
                    .map(|(d, g)| (d.to_string(), *g))
                    .collect::<HashMap<_, _>>(),
            )
        })
        .collect()
}

fn run(entries: &[(&str, &[(&str, f64)])]) -> Run {
    entries
        .iter()
        .map(|(q, d)| {
            (
                q.to_string(),
                d.iter().map(|(d, s)| (d.to_string(), *s)).collect(),
            )
        })
        .collect()
}

/// Reference values from trec_eval (pytrec_eval 0.5.x, `ndcg_cut.3,10 recall.1,5,20,100 recip_rank`) on
/// this qrels/run pair: graded judgements, score ties (broken by doc id descending), unjudged docs, a
/// judged query with nothing relevant, a judged query missing from the run, a run query without
/// judgements.
#[test]
fn metrics_match_trec_eval() {
    let q = qrels(&[
        (
            "q1",
            &[("d1", 2), ("d2", 1), ("d3", 0), ("d4", 3), ("d9", 1)],
        ),
        ("q2", &[("a", 1), ("b", 1)]),
        ("q3", &[("x", 0), ("y", 0)]),
        ("q4", &[("m", 1)]),
    ]);
    let r = run(&[
        (
            "q1",
            &[
                ("d3", 5.0),
                ("d1", 4.0),
                ("d7", 4.0),
                ("d2", 4.0),
                ("d8", 3.5),
                ("d4", 1.0),
                ("d5", 0.5),
            ],
        ),
        (
            "q2",
            &[("c", 2.0), ("a", 2.0), ("e", 1.0), ("b", 0.25), ("f", 0.1)],
        ),
        ("q3", &[("x", 1.0), ("z", 0.5)]),
        ("q5", &[("k", 1.0)]),
    ]);
    let spec = MetricSpec {
        ndcg_cut: vec![3, 10],
        ..MetricSpec::default()
    };
    let report = evaluate(&q, &r, &spec).unwrap();
    let expected: BTreeMap<&str, [f64; 7]> = [
        // ndcg_cut_3, ndcg_cut_10, recall_1, recall_5, recall_20, recall_100, recip_rank
        (
            "q1",
            [
                0.10500099787698204,
                0.4679745401767616,
                0.0,
                0.5,
                0.75,
                0.75,
                1.0 / 3.0,
            ],
        ),
        (
            "q2",
            [
                0.38685280723454163,
                0.6509209298071326,
                0.0,
                1.0,
                1.0,
                1.0,
                0.5,
            ],
        ),
        ("q3", [0.0; 7]),
    ]
    .into_iter()
    .collect();
    let names = [
        "ndcg_cut_3",
        "ndcg_cut_10",
        "recall_1",
        "recall_5",
        "recall_20",
        "recall_100",
        "recip_rank_10",
    ];
    assert_eq!(
        report.num_queries, 3,
        "q4 (not retrieved) and q5 (not judged) are skipped"
    );
    let mut checks = 0;
    for (qid, values) in &expected {
        for (name, want) in names.iter().zip(values) {
            let got = report.per_query[*qid][*name];
            assert!(
                (got - want).abs() < 1e-12,
                "{qid} {name}: got {got}, trec_eval {want}"
            );
            checks += 1;
        }
    }
    for (i, name) in names.iter().enumerate() {
        let mean = expected.values().map(|v| v[i]).sum::<f64>() / 3.0;
        assert!((report.mean[*name] - mean).abs() < 1e-12, "mean {name}");
        checks += 1;
    }
    assert_eq!(checks, 28);

    // trec_eval -c: the judged query without results counts as zeros.
    let complete = evaluate(
        &q,
        &r,
        &MetricSpec {
            complete: true,
            ..spec.clone()
        },
    )
    .unwrap();
    assert_eq!(complete.num_queries, 4);
    assert_eq!(complete.per_query["q4"]["recall_100"], 0.0);
    assert!((complete.mean["ndcg_cut_10"] - report.mean["ndcg_cut_10"] * 3.0 / 4.0).abs() < 1e-12);

    // MRR@k only looks at the top k: q1's first relevant doc is at rank 3.
    let cut = evaluate(
        &q,
        &r,
        &MetricSpec {
            recip_rank_cut: vec![2],
            ..spec.clone()
        },
    )
    .unwrap();
    assert_eq!(cut.per_query["q1"]["recip_rank_2"], 0.0);
    assert_eq!(cut.per_query["q2"]["recip_rank_2"], 0.5);

    // A doc retrieved twice is an error, as in trec_eval.
    let dup = run(&[("q2", &[("a", 1.0), ("a", 0.5)])]);
    assert!(evaluate(&q, &dup, &spec)
        .unwrap_err()
        .to_string()
        .contains("twice"));
}

#[test]
fn malformed_input_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qrels.tsv");
    std::fs::write(&path, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\n").unwrap();
    let err = format!("{:#}", read_qrels(&path).unwrap_err());
    assert!(err.contains(&format!("{}:3", path.display())), "{err}");
    assert!(err.contains("3 columns"), "{err}");

    std::fs::write(&path, "q1\td1\t1\nq1\td1\t2\n").unwrap();
    let err = format!("{:#}", read_qrels(&path).unwrap_err());
    assert!(err.contains(":2") && err.contains("judged twice"), "{err}");

    std::fs::write(&path, "q-id\tdoc\tscore\nq1\td1\tyes\n").unwrap();
    let err = format!("{:#}", read_qrels(&path).unwrap_err());
    assert!(
        err.contains(":2") && err.contains("not an integer"),
        "{err}"
    );

    let corpus = dir.path().join("corpus.jsonl");
    std::fs::write(
        &corpus,
        "{\"_id\": \"a\", \"text\": \"x\"}\n{\"_id\": \"b\", \"title\": \"t\"}\n",
    )
    .unwrap();
    let err = format!("{:#}", read_corpus(&corpus).unwrap_err());
    assert!(
        err.contains(&format!("{}:2", corpus.display())) && err.contains("text"),
        "{err}"
    );

    std::fs::write(&corpus, b"{\"_id\": \"a\", \"text\": \"\xff\"}\n").unwrap();
    let err = format!("{:#}", read_corpus(&corpus).unwrap_err());
    assert!(err.contains(":1") && err.contains("UTF-8"), "{err}");

    let queries = dir.path().join("queries.jsonl");
    std::fs::write(
        &queries,
        "{\"_id\": \"1\", \"text\": \"a\"}\n{\"_id\": \"1\", \"text\": \"b\"}\n",
    )
    .unwrap();
    let err = format!("{:#}", read_queries(&queries).unwrap_err());
    assert!(err.contains(":2") && err.contains("duplicate"), "{err}");
}

/// BM25 over the real HotpotQA dev-100 paragraphs finds the supporting passages of real questions.
#[test]
fn bm25_finds_gold_passages_on_hotpotqa() {
    let data = data_dir().join("hotpotqa-dev100");
    let corpus = read_corpus(&data.join("corpus.jsonl")).unwrap();
    let queries = read_queries(&data.join("queries.jsonl")).unwrap();
    let qrels = read_qrels(&data.join("qrels.tsv")).unwrap();
    assert_eq!(corpus.len(), 991);
    assert_eq!(queries.len(), 100);

    let dir = tempfile::tempdir().unwrap();
    for layout in [FieldLayout::Flat, FieldLayout::Multifield] {
        let root = dir.path().join(format!("{layout:?}"));
        build_index(
            &root,
            &corpus,
            &Bm25Config {
                layout,
                ..Default::default()
            },
        )
        .unwrap();
        let bm25 = Bm25Retriever::open(&root, Bm25Params::default()).unwrap();
        assert_eq!(bm25.len(), 991);

        // "Were Scott Derrickson and Ed Wood of the same nationality?": both people's pages in the top 10.
        let hits = bm25
            .retrieve(&[queries[0].text.as_str()], None, 10)
            .unwrap()
            .remove(0);
        let ids: Vec<&str> = hits.passages.iter().map(|p| p.id.as_str()).collect();
        assert!(
            ids.contains(&"Scott Derrickson") && ids.contains(&"Ed Wood"),
            "{layout:?}: {ids:?}"
        );
        // Scores are sorted and rows point at the right passages.
        assert!(hits.scores.windows(2).all(|w| w[0] >= w[1]));
        for (row, p) in hits.doc_ids.iter().zip(&hits.passages) {
            assert_eq!(&corpus[*row as usize], p);
        }

        // Over the first 20 questions, most gold passages are in the top 10.
        let texts: Vec<&str> = queries[..20].iter().map(|q| q.text.as_str()).collect();
        let all = bm25.retrieve(&texts, None, 10).unwrap();
        let (mut found, mut gold) = (0, 0);
        for (q, h) in queries[..20].iter().zip(&all) {
            for d in qrels[&q.id].keys() {
                gold += 1;
                found += usize::from(h.passages.iter().any(|p| &p.id == d));
            }
        }
        assert!(
            found * 10 >= gold * 6,
            "{layout:?}: only {found}/{gold} gold passages in the top 10"
        );
    }
}

/// The index persists, a rebuild switches generations atomically, and bad index dirs are refused.
#[test]
fn bm25_index_lifecycle() {
    let data = data_dir().join("hotpotqa-dev100");
    let corpus = read_corpus(&data.join("corpus.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bm25");

    let err = Bm25Retriever::open(&root, Bm25Params::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no BM25 index"), "{err}");
    assert!(build_index(&root, &[], &Bm25Config::default()).is_err());

    let first = build_index(&root, &corpus[..100], &Bm25Config::default()).unwrap();
    let old = Bm25Retriever::open(&root, Bm25Params::default()).unwrap();
    assert_eq!(old.len(), 100);
    let second = build_index(&root, &corpus, &Bm25Config::default()).unwrap();
    assert_ne!(first.generation, second.generation);
    assert!(
        !first.generation.exists(),
        "the old generation is removed after the switch"
    );
    let new = Bm25Retriever::open(&root, Bm25Params::default()).unwrap();
    assert_eq!(new.len(), 991);

    // Invalid parameters and a foreign/newer manifest are clear errors.
    assert!(Bm25Retriever::open(
        &root,
        Bm25Params {
            b: 1.5,
            ..Default::default()
        }
    )
    .is_err());
    let manifest = second.generation.join("bm25.json");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("\"version\": 1", "\"version\": 99");
    std::fs::write(&manifest, text).unwrap();
    let err = Bm25Retriever::open(&root, Bm25Params::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("v99") && err.contains("rebuild"), "{err}");
}

fn minilm_dir() -> PathBuf {
    let root = std::env::var_os("RUSTRAG_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let dir = root.join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "real model missing: {} (run scripts/fetch-models.sh or set RUSTRAG_MODELS)",
        dir.display()
    );
    dir
}

/// Dense (real MiniLM KB) + BM25 over the same rows, fused with RRF and weighted fusion, on a slice of
/// the HotpotQA paragraphs: fused scores follow the formulas from the two real lists, and the fusion
/// keeps both supporting passages of the first question.
#[test]
fn hybrid_fuses_dense_and_bm25_over_one_kb() {
    use rustrag::encoders::{load_encoder, LoadOptions, TextEncoder};
    use rustrag::kb::{build, BuildOptions, KnowledgeBase};
    use rustrag::retrieve::dense::DenseRetriever;
    use rustrag::retrieve::hybrid::{Fusion, HybridRetriever, ScoreNorm};
    use std::sync::Arc;

    let data = data_dir().join("hotpotqa-dev100");
    let dir = tempfile::tempdir().unwrap();
    // The first 40 paragraphs (the first questions' gold and distractor paragraphs).
    let lines: Vec<String> = std::fs::read_to_string(data.join("corpus.jsonl"))
        .unwrap()
        .lines()
        .take(40)
        .map(str::to_string)
        .collect();
    let slice = dir.path().join("corpus.jsonl");
    std::fs::write(&slice, lines.join("\n") + "\n").unwrap();

    let encoder: Arc<dyn TextEncoder> =
        Arc::from(load_encoder(&minilm_dir().to_string_lossy(), &LoadOptions::default()).unwrap());
    let kb_dir = dir.path().join("kb");
    let opts = BuildOptions {
        words_per_passage: 0,
        ..Default::default()
    };
    build(&kb_dir, &[slice], encoder.as_ref(), &opts, &mut |_, _| {}).unwrap();
    let kb = Arc::new(KnowledgeBase::open(&kb_dir).unwrap());
    let bm25_dir = kb_dir.join("bm25");
    build_index(
        &bm25_dir,
        &kb.passages().all().unwrap(),
        &Bm25Config::default(),
    )
    .unwrap();

    let dense = || -> Box<dyn Retriever> {
        Box::new(DenseRetriever::new(kb.clone(), Some(encoder.clone()), None).unwrap())
    };
    let sparse = || -> Box<dyn Retriever> {
        Box::new(Bm25Retriever::open(&bm25_dir, Bm25Params::default()).unwrap())
    };
    let q = "Were Scott Derrickson and Ed Wood of the same nationality?";
    let d = dense().retrieve(&[q], None, 40).unwrap().remove(0);
    let s = sparse().retrieve(&[q], None, 40).unwrap().remove(0);

    let rrf = HybridRetriever::new(dense(), sparse(), Fusion::Rrf { k: 60.0 }, 40).unwrap();
    let fused = rrf.retrieve(&[q], None, 10).unwrap().remove(0);
    let rank = |h: &rustrag::retrieve::Hits, row: u64| h.doc_ids.iter().position(|&r| r == row);
    for (row, score) in fused.doc_ids.iter().zip(&fused.scores) {
        let want: f32 = [rank(&d, *row), rank(&s, *row)]
            .iter()
            .flatten()
            .map(|r| 1.0 / (60.0 + *r as f32 + 1.0))
            .sum();
        assert!(
            (score - want).abs() < 1e-6,
            "row {row}: fused {score}, expected {want}"
        );
    }
    let ids: Vec<&str> = fused.passages.iter().map(|p| p.id.as_str()).collect();
    assert!(
        ids.contains(&"Scott Derrickson") && ids.contains(&"Ed Wood"),
        "{ids:?}"
    );
    // Dense hits carry embeddings for RAG; the fused list keeps them when all fused rows had one.
    assert!(fused.embeddings.is_some());

    let weighted = HybridRetriever::new(
        dense(),
        sparse(),
        Fusion::Weighted {
            dense_weight: 0.3,
            norm: ScoreNorm::MinMax,
        },
        40,
    )
    .unwrap();
    let w = weighted.retrieve(&[q], None, 5).unwrap().remove(0);
    let minmax = |h: &rustrag::retrieve::Hits, row: u64| {
        let (lo, hi) = (h.scores[h.scores.len() - 1], h.scores[0]);
        rank(h, row).map_or(0.0, |i| (h.scores[i] - lo) / (hi - lo))
    };
    for (row, score) in w.doc_ids.iter().zip(&w.scores) {
        let want = 0.3 * minmax(&d, *row) + 0.7 * minmax(&s, *row);
        assert!(
            (score - want).abs() < 1e-5,
            "row {row}: fused {score}, expected {want}"
        );
    }
    assert!(w.scores.windows(2).all(|p| p[0] >= p[1]));
}

/// SciFact (BEIR test split, 300 judged queries, 5,183 abstracts) with BM25 over one flat field and
/// Anserini's defaults (k1 0.9, b 0.4, Porter stemming, Lucene stopwords): nDCG@10 and recall@100
/// equal Anserini's BEIR regression (`bm25-flat`: 0.6789, 0.9253) to its four printed decimals. This is
/// the README's figure; `rustrag eval retrieval --corpus scifact/corpus.jsonl.gz --queries
/// scifact/queries.jsonl.gz --qrels scifact/qrels/test.tsv` prints the same. Missing data fails.
#[test]
fn scifact_bm25_flat_equals_anserini() {
    let data = data_dir().join("scifact");
    let corpus = read_corpus(&data.join("corpus.jsonl.gz")).unwrap();
    let qrels = read_qrels(&data.join("qrels/test.tsv")).unwrap();
    let judged: Vec<_> = read_queries(&data.join("queries.jsonl.gz"))
        .unwrap()
        .into_iter()
        .filter(|q| qrels.contains_key(&q.id))
        .collect();
    assert_eq!((corpus.len(), judged.len()), (5183, 300));
    let dir = tempfile::tempdir().unwrap();
    build_index(
        dir.path(),
        &corpus,
        &Bm25Config {
            layout: FieldLayout::Flat,
            ..Default::default()
        },
    )
    .unwrap();
    let bm25 = Bm25Retriever::open(dir.path(), Bm25Params::default()).unwrap();
    let run = rustrag::eval::run_queries(&bm25, &judged, 100, 32)
        .unwrap()
        .run;
    let report = evaluate(&qrels, &run, &MetricSpec::default()).unwrap();
    assert_eq!(report.num_queries, 300);
    let at4 = |m: &str| (report.mean[m] * 1e4).round() / 1e4;
    assert_eq!(at4("ndcg_cut_10"), 0.6789, "{:?}", report.mean);
    assert_eq!(at4("recall_100"), 0.9253, "{:?}", report.mean);
}
