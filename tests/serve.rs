//! `rustrag serve` end to end: the real binary on a free loopback port, a MiniLM knowledge base
//! built by `rustrag index build` from real SQuAD-dev paragraphs, SmolLM2 (GGUF) as the generator,
//! real HTTP (a small client over `TcpStream`, so a test can hang up mid-stream), the official
//! `openai` Python package as a client, and the page driven in headless Chromium.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const QUESTION: &str = "Which NFL team represented the AFC at Super Bowl 50?";

fn models() -> PathBuf {
    std::env::var("RUSTRAG_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"))
}

fn gguf() -> Result<PathBuf> {
    let models = models();
    let gguf = models.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    ensure!(
        models.join("all-MiniLM-L6-v2").is_dir() && gguf.is_file(),
        "real models missing under {} (run scripts/fetch-models.sh or set RUSTRAG_MODELS)",
        models.display()
    );
    Ok(gguf)
}

fn rustrag(args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_rustrag"))
        .args(args)
        .env("RUSTRAG_NO_PROGRESS", "1")
        .output()?;
    ensure!(
        out.status.success(),
        "rustrag {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Paragraphs `skip..skip + take` of the bundled SQuAD-dev corpus as a JSONL file in `dir`.
fn corpus(dir: &Path, name: &str, skip: usize, take: usize) -> Result<PathBuf> {
    let gz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/squad-dev/corpus.jsonl.gz");
    let reader = BufReader::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&gz).with_context(|| gz.display().to_string())?,
    ));
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path)?;
    for line in reader.lines().skip(skip).take(take) {
        writeln!(f, "{}", line?)?;
    }
    Ok(path)
}

/// A MiniLM KB of SQuAD-dev paragraphs `skip..skip + take` (the first 30: Super Bowl 50 and the
/// next article) at `dir/name`.
fn build_kb(dir: &Path, name: &str, skip: usize, take: usize) -> Result<PathBuf> {
    let c = corpus(dir, &format!("{name}.jsonl"), skip, take)?;
    let kb = dir.join(name);
    rustrag(&[
        "index",
        "build",
        "--corpus",
        &c.to_string_lossy(),
        "--encoder",
        &models().join("all-MiniLM-L6-v2").to_string_lossy(),
        "--out",
        &kb.to_string_lossy(),
        "--words-per-passage",
        "0",
    ])?;
    Ok(kb)
}

/// The read-only KB most tests serve (the first 30 paragraphs), built once per test run under
/// the target's tmp dir.
fn shared_kb() -> Result<PathBuf> {
    static KB: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    KB.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-test");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        build_kb(&dir, "kb", 0, 30).map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        match e.file_type()?.is_dir() {
            true => copy_dir(&e.path(), &to.join(e.file_name()))?,
            false => {
                std::fs::copy(e.path(), to.join(e.file_name()))?;
            }
        }
    }
    Ok(())
}

/// `rustrag serve` on a free loopback port; killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(kb: &Path, extra: &[&str]) -> Result<Self> {
        let gguf = gguf()?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_rustrag"))
            .args(["serve", "--kb"])
            .arg(kb)
            .arg("--generator")
            .arg(&gguf)
            .args(["--addr", "127.0.0.1:0", "--kb-poll-ms", "200"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            bail!("rustrag serve did not start: {line:?}");
        };
        Ok(Self {
            addr: addr.to_string(),
            child,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn get(&self, path: &str) -> Result<Response> {
        request(&self.addr, "GET", path, None)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Response> {
        request(&self.addr, "POST", path, Some(body.to_string().as_bytes()))
    }

    /// A metric's value (first sample of that name).
    fn metric(&self, name: &str) -> Result<f64> {
        let m = self.get("/metrics")?;
        let line = m
            .text()
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .with_context(|| format!("no metric {name} in:\n{}", m.text()))?
            .to_string();
        Ok(line.rsplit(' ').next().unwrap_or("").parse()?)
    }

    /// Wait until `cond` holds (polling), or fail after `secs`.
    fn wait_for(
        &self,
        secs: u64,
        what: &str,
        mut cond: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if cond()? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("timed out after {secs} s waiting for {what}")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("status {}: not JSON: {}", self.status, self.text()))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Headers = Vec<(String, String)>;

/// An HTTP/1.1 response's head, and the body as a reader (chunked encoding decoded).
fn open(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Headers, Box<dyn BufRead>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    // A server may answer (413) before reading a large body, and close: ignore the write error.
    let _ = s.write_all(body);
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("bad status line {line:?}"))?
        .parse()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let reader: Box<dyn BufRead> = match chunked {
        true => Box::new(BufReader::new(Chunked {
            inner: r,
            left: 0,
            done: false,
        })),
        false => Box::new(r),
    };
    Ok((status, headers, reader))
}

fn request(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
    let (status, headers, mut r) = open(addr, method, path, body)?;
    let mut body = Vec::new();
    r.read_to_end(&mut body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Chunked transfer decoding.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            if line.trim().is_empty() {
                // The CRLF after the previous chunk.
                line.clear();
                self.inner.read_line(&mut line)?;
            }
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| std::io::Error::other(format!("chunk size {line:?}: {e}")))?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let n = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..n])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        Ok(n)
    }
}

/// Server-sent events: `(event name, data)`.
struct Events {
    reader: Box<dyn BufRead>,
}

impl Events {
    fn open(server: &Server, path: &str, body: &Value) -> Result<Self> {
        let (status, headers, reader) = open(
            &server.addr,
            "POST",
            path,
            Some(body.to_string().as_bytes()),
        )?;
        ensure!(status == 200, "status {status}");
        ensure!(
            headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("content-type")
                    && v.starts_with("text/event-stream")),
            "not an event stream: {headers:?}"
        );
        Ok(Self { reader })
    }

    fn next(&mut self) -> Result<Option<(String, String)>> {
        let (mut name, mut data) = (String::from("message"), String::new());
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if data.is_empty() {
                    continue; // keep-alive comment block
                }
                return Ok(Some((name, data)));
            }
            if let Some(v) = l.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = l.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
    }
}

/// The answer routes, their streaming and the API document, on one server.
#[test]
fn retrieve_answer_and_stream_agree_with_each_other() -> Result<()> {
    let kb = shared_kb()?;
    let server = Server::start(&kb, &[])?;

    let h = server.get("/healthz")?;
    assert_eq!(h.status, 200, "{}", h.text());
    assert_eq!(h.json()?["kb"]["passages"], 30);

    let r = server.post("/v1/retrieve", &json!({"question": QUESTION, "k": 3}))?;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json()?;
    let sources = r["results"][0]["sources"].as_array().context("sources")?;
    assert_eq!(sources.len(), 3);
    assert_eq!(sources[0]["passage_id"], "0-0", "gold paragraph first: {r}");
    let prior_sum: f64 = sources
        .iter()
        .map(|s| s["prior"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(
        (prior_sum - 1.0).abs() < 1e-4,
        "priors sum to 1: {prior_sum}"
    );

    let request = json!({"question": QUESTION, "n_docs": 3, "max_new_tokens": 24});
    let a = server.post("/v1/answer", &request)?;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = a.json()?;
    let tokens = a["tokens"].as_array().context("tokens")?.clone();
    assert!(!tokens.is_empty(), "{a}");
    assert!(!a["answer"].as_str().unwrap_or("").is_empty(), "{a}");
    assert_eq!(a["sources"][0]["passage_id"], "0-0");

    // The same request streamed: sources first, one event per token, then done.
    let mut stream_req = request.clone();
    stream_req["stream"] = json!(true);
    let mut events = Events::open(&server, "/v1/answer", &stream_req)?;
    let (name, data) = events.next()?.context("no event")?;
    assert_eq!(name, "sources", "{data}");
    let streamed_sources: Value = serde_json::from_str(&data)?;
    assert_eq!(streamed_sources["sources"], a["sources"]);
    let mut streamed = Vec::new();
    let done = loop {
        let (name, data) = events.next()?.context("stream ended without `done`")?;
        let v: Value = serde_json::from_str(&data)?;
        match name.as_str() {
            "token" => streamed.push(v),
            "done" => break v,
            other => bail!("unexpected event {other}: {data}"),
        }
    };
    assert!(events.next()?.is_none(), "nothing after done");
    assert_eq!(
        streamed.len(),
        tokens.len(),
        "as many token events as tokens"
    );
    // Posteriors: from the decoding steps (streamed) and from a teacher-forced pass (not
    // streamed); the same quantity, equal to float rounding.
    let mut worst = 0f64;
    for (s, t) in streamed.iter().zip(&tokens) {
        assert_eq!(s["id"], t["id"]);
        assert_eq!(s["text"], t["text"]);
        assert_eq!(s["position"], t["position"]);
        let (ps, pt) = (
            s["doc_posterior"].as_array().context("p")?,
            t["doc_posterior"].as_array().context("p")?,
        );
        assert_eq!(ps.len(), 3);
        let sum: f64 = ps.iter().map(|p| p.as_f64().unwrap_or(0.0)).sum();
        assert!((sum - 1.0).abs() < 1e-4, "posterior sums to 1: {sum}");
        for (x, y) in ps.iter().zip(pt) {
            worst = worst.max((x.as_f64().unwrap_or(9.0) - y.as_f64().unwrap_or(0.0)).abs());
        }
    }
    assert!(
        worst < 2e-3,
        "streamed and non-streamed posteriors differ by {worst}"
    );
    assert_eq!(done["answer"], a["answer"]);
    assert_eq!(done["ids"], a["ids"]);
    assert!(
        done["timings"]["first_token_ms"].as_f64().is_some(),
        "{done}"
    );
    assert!(done["timings"]["total_ms"].as_f64().unwrap_or(0.0) > 0.0);

    // RAG-Sequence, not streamed: one posterior per answer.
    let s = server.post(
        "/v1/answer",
        &json!({"question": QUESTION, "mode": "sequence", "max_new_tokens": 16}),
    )?;
    assert_eq!(s.status, 200, "{}", s.text());
    assert_eq!(
        s.json()?["answer_posterior"].as_array().map(Vec::len),
        Some(3)
    );

    // Streaming beam search is refused, naming the field.
    let b = server.post(
        "/v1/answer",
        &json!({"question": QUESTION, "beams": 2, "stream": true}),
    )?;
    assert_eq!(b.status, 400, "{}", b.text());
    assert_eq!(b.json()?["error"]["param"], "stream");

    let m = server.get("/metrics")?;
    assert_eq!(m.status, 200);
    let text = m.text();
    for name in [
        "rustrag_http_requests_total{method=\"POST\",route=\"/v1/answer\",status=\"200\"}",
        "rustrag_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/retrieve\",le=\"+Inf\"}",
        "rustrag_queue_depth 0",
        "rustrag_time_to_first_token_seconds_count",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(server.metric("rustrag_tokens_generated_total")? >= 2.0 * tokens.len() as f64);
    // The heap gauges (glibc): the models alone are hundreds of MB of live allocations.
    assert!(server.metric("rustrag_heap_in_use_bytes")? > 1e8);
    assert!(server.metric("rustrag_heap_free_held_bytes")? >= 0.0);

    // /openapi.json is the library's document, and names exactly the router's routes.
    let doc = server.get("/openapi.json")?.json()?;
    // It states this server's limits (defaults, and the KB's 30 passages).
    let limits = rustrag::serve::openapi::DocLimits {
        max_n_docs: 20,
        max_new_tokens: 256,
        max_questions: 64,
        max_question_chars: 4096,
        retriever: rustrag::rag::pipeline::RetrieverKind::Hybrid,
    };
    assert_eq!(doc, rustrag::serve::openapi::document(&limits));
    let answer_props = &doc["paths"]["/v1/answer"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"]["properties"];
    assert_eq!(answer_props["n_docs"]["maximum"], 20);
    assert_eq!(answer_props["max_new_tokens"]["maximum"], 256);
    assert_eq!(answer_props["n_docs"]["type"], json!(["integer", "null"]));
    let mut documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .context("paths")?
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .map(move |m| (m.clone(), p.clone()))
        })
        .collect();
    let mut routed = rustrag::serve::handlers::route_list();
    documented.sort();
    routed.sort();
    assert_eq!(documented, routed, "openapi.json paths vs the router");

    let page = server.get("/")?;
    assert_eq!(page.status, 200);
    assert!(
        page.text().contains("/v1/answer")
            && !page.text().contains("http://")
            && !page.text().contains("https://"),
        "the page is self-contained (no CDN)"
    );
    Ok(())
}

/// Bad requests: a 4xx with a JSON error naming the field; the server stays up and leaks no slot.
#[test]
fn bad_input_is_a_4xx_naming_the_field() -> Result<()> {
    let kb = shared_kb()?;
    let server = Server::start(&kb, &["--max-body-bytes", "4096"])?;
    let raw = |path: &str, body: &str| request(&server.addr, "POST", path, Some(body.as_bytes()));
    let big = format!("{{\"question\": \"{}\"}}", "a".repeat(10_000));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/answer", "{not json".into(), 400, "body"),
        ("/v1/answer", "".into(), 400, "body"),
        ("/v1/answer", "[1, 2]".into(), 400, "body"),
        ("/v1/answer", r#"{"question": 3}"#.into(), 400, "question"),
        (
            "/v1/answer",
            r#"{"question": "q", "n_docs": "3"}"#.into(),
            400,
            "n_docs",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "n_docs": -1}"#.into(),
            400,
            "n_docs",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "colour": "red"}"#.into(),
            400,
            "colour",
        ),
        ("/v1/answer", r#"{"n_docs": 2}"#.into(), 400, "question"),
        (
            "/v1/answer",
            r#"{"question": "  "}"#.into(),
            400,
            "question",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "n_docs": 0}"#.into(),
            400,
            "n_docs",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "n_docs": 21}"#.into(),
            400,
            "n_docs",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "max_new_tokens": 0}"#.into(),
            400,
            "max_new_tokens",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "max_new_tokens": 100000}"#.into(),
            400,
            "max_new_tokens",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "mode": "both"}"#.into(),
            400,
            "mode",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "prior_temperature": 0}"#.into(),
            400,
            "prior_temperature",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "beams": 0}"#.into(),
            400,
            "beams",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "mode": "sequence", "stream": true}"#.into(),
            400,
            "stream",
        ),
        ("/v1/answer", big.clone(), 413, "body"),
        (
            "/v1/retrieve",
            r#"{"question": "q", "k": 0}"#.into(),
            400,
            "k",
        ),
        (
            "/v1/retrieve",
            r#"{"question": "q", "k": 31}"#.into(),
            400,
            "k",
        ),
        ("/v1/retrieve", r#"{}"#.into(), 400, "question"),
        (
            "/v1/retrieve",
            r#"{"questions": []}"#.into(),
            400,
            "questions",
        ),
        (
            "/v1/retrieve",
            r#"{"questions": ["ok", ""]}"#.into(),
            400,
            "questions[1]",
        ),
        (
            "/v1/retrieve",
            r#"{"question": "q", "retriever": "bm25"}"#.into(),
            400,
            "retriever",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "q"}], "temperature": 2.5}"#.into(),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "q"}], "top_p": 1.5}"#.into(),
            400,
            "top_p",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "q"}], "temperature": 0.5, "mode": "sequence"}"#.into(),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": " "}]}"#.into(),
            400,
            "messages[1].content",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "system", "content": 5}, {"role": "user", "content": "q"}]}"#.into(),
            400,
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "q"}], "stream_options": {"include_usage": "yes"}}"#.into(),
            400,
            "stream_options.include_usage",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "temperature": -1}"#.into(),
            400,
            "temperature",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "temperature": 0.7, "top_p": 2}"#.into(),
            400,
            "top_p",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "temperature": 0.7, "beams": 2}"#.into(),
            400,
            "temperature",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "seed": -1}"#.into(),
            400,
            "seed",
        ),
        (
            "/v1/answer",
            r#"{"question": "q", "seed": "7"}"#.into(),
            400,
            "seed",
        ),
        ("/v1/answer", r#"{"question": null}"#.into(), 400, "question"),
        (
            "/v1/answer",
            r#"{"question": "q", "n_docs": 2.5}"#.into(),
            400,
            "n_docs",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "q"}], "max_tokens": 100000, "max_completion_tokens": 4}"#.into(),
            400,
            "max_tokens",
        ),
        (
            "/v1/retrieve",
            r#"{"question": null, "questions": ["q"]}"#.into(),
            400,
            "question",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "q"}], "n": 2}"#.into(),
            400,
            "n",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "q"}], "logit_bias": {}}"#.into(),
            400,
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "q"}], "max_tokens": 0}"#.into(),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "system", "content": "q"}]}"#.into(),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": 5}]}"#.into(),
            400,
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": "hi"}"#.into(),
            400,
            "messages",
        ),
        (
            "/admin/kb",
            r#"{"path": "/nonexistent/kb"}"#.into(),
            404,
            "path",
        ),
        ("/admin/kb", r#"{"path": ""}"#.into(), 400, "path"),
    ];
    for (path, body, status, param) in &cases {
        let r = raw(path, body)?;
        let shown: String = body.chars().take(80).collect();
        assert_eq!(r.status, *status, "{path} {shown}: {}", r.text());
        let e = r.json()?;
        assert_eq!(e["error"]["param"], *param, "{path} {shown}: {e}");
        assert!(!e["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    // An integer written as a float is an integer (JSON Schema's `integer`); null is absent.
    let r = raw(
        "/v1/retrieve",
        r#"{"question": "q", "k": 2.0, "retriever": null, "prior_temperature": null}"#,
    )?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()?["results"][0]["sources"].as_array().map(Vec::len),
        Some(2)
    );
    let nf = server.get("/v2/nothing")?;
    assert_eq!(nf.status, 404);
    assert!(nf.json()?["error"]["message"].is_string());
    // Still up, nothing left admitted, no panic.
    assert_eq!(server.get("/healthz")?.status, 200);
    assert_eq!(server.metric("rustrag_queue_depth")?, 0.0);
    assert_eq!(server.metric("rustrag_panics_total")?, 0.0);
    Ok(())
}

/// Seeded sampling on `/v1/answer`: the same seed gives the same answer (streamed or not, with
/// each streamed token's posterior over the sources); temperature towards 0 and a tiny top_p give
/// the greedy answer; null optional fields read as absent.
#[test]
fn sampling_is_seeded_and_streams_provenance() -> Result<()> {
    let kb = shared_kb()?;
    let server = Server::start(&kb, &[])?;
    let ask = |extra: Value| -> Result<Value> {
        let mut req = json!({"question": QUESTION, "n_docs": 3, "max_new_tokens": 12});
        if let (Some(r), Some(e)) = (req.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        let a = server.post("/v1/answer", &req)?;
        ensure!(a.status == 200, "{req}: {}", a.text());
        a.json()
    };
    let greedy = ask(json!({"temperature": null, "top_p": null, "seed": null, "stream": null}))?;
    let hot = json!({"temperature": 1.5, "seed": 7});
    let (a, b) = (ask(hot.clone())?, ask(hot.clone())?);
    assert_eq!(a["ids"], b["ids"], "same seed, same answer");
    // Near-zero temperature concentrates on the argmax; a tiny nucleus keeps only it.
    let cold = ask(json!({"temperature": 1e-4, "seed": 3}))?;
    assert_eq!(cold["ids"], greedy["ids"], "temperature -> 0 is greedy");
    let narrow = ask(json!({"temperature": 1.0, "top_p": 1e-9, "seed": 5}))?;
    assert_eq!(narrow["ids"], greedy["ids"], "top_p -> 0 is greedy");
    // Other seeds draw other answers (at temperature 1.5 a 135M model rarely repeats itself).
    let others: Vec<Value> = (8..11)
        .map(|seed| ask(json!({"temperature": 1.5, "seed": seed})).map(|v| v["ids"].clone()))
        .collect::<Result<_>>()?;
    assert!(
        others.iter().any(|ids| *ids != a["ids"]),
        "seeds 7..11 all gave {}",
        a["ids"]
    );

    // Streamed with the same seed: the same tokens, each with a posterior over the 3 sources that
    // matches the non-streamed answer's teacher-forced one.
    let mut req = json!({"question": QUESTION, "n_docs": 3, "max_new_tokens": 12, "stream": true});
    req["temperature"] = hot["temperature"].clone();
    req["seed"] = hot["seed"].clone();
    let mut events = Events::open(&server, "/v1/answer", &req)?;
    let mut streamed = Vec::new();
    let done = loop {
        let (name, data) = events.next()?.context("stream ended without `done`")?;
        let v: Value = serde_json::from_str(&data)?;
        match name.as_str() {
            "sources" => {}
            "token" => streamed.push(v),
            "done" => break v,
            other => bail!("unexpected event {other}: {data}"),
        }
    };
    assert_eq!(
        done["ids"], a["ids"],
        "streamed sample = non-streamed sample"
    );
    let tokens = a["tokens"].as_array().context("tokens")?;
    assert_eq!(streamed.len(), tokens.len());
    for (s, t) in streamed.iter().zip(tokens) {
        assert_eq!(s["id"], t["id"]);
        let (ps, pt) = (
            s["doc_posterior"].as_array().context("p")?,
            t["doc_posterior"].as_array().context("p")?,
        );
        assert_eq!(ps.len(), 3);
        for (x, y) in ps.iter().zip(pt) {
            let d = (x.as_f64().unwrap_or(9.0) - y.as_f64().unwrap_or(0.0)).abs();
            assert!(d < 2e-3, "posterior {s} vs {t}");
        }
    }
    assert_eq!(server.metric("rustrag_queue_depth")?, 0.0);
    Ok(())
}

/// A long streamed answer (min = max new tokens) whose first token has arrived.
fn long_stream(server: &Server, tokens: usize) -> Result<Events> {
    let mut ev = Events::open(
        server,
        "/v1/answer",
        &json!({"question": QUESTION, "stream": true, "max_new_tokens": tokens, "min_new_tokens": tokens}),
    )?;
    loop {
        let (name, data) = ev.next()?.context("stream ended early")?;
        match name.as_str() {
            "sources" => continue,
            "token" => return Ok(ev),
            other => bail!("unexpected {other}: {data}"),
        }
    }
}

/// Queue limit: a request over capacity gets 503 with Retry-After; a client that hangs up
/// mid-stream frees its slot at once and the next request is served.
#[test]
fn full_queue_503_and_a_disconnect_frees_the_slot() -> Result<()> {
    let kb = shared_kb()?;
    let server = Server::start(&kb, &["--queue-capacity", "1"])?;
    let stream = long_stream(&server, 250)?;
    assert_eq!(server.metric("rustrag_queue_depth")?, 1.0);
    let full = server.post("/v1/retrieve", &json!({"question": QUESTION}))?;
    assert_eq!(full.status, 503, "{}", full.text());
    assert_eq!(full.header("retry-after"), Some("1"));
    assert!(full.json()?["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("capacity"));
    // Hang up mid-stream.
    drop(stream);
    let t = Instant::now();
    server.wait_for(10, "queue depth 0 after the disconnect", || {
        Ok(server.metric("rustrag_queue_depth")? == 0.0)
    })?;
    eprintln!("slot freed {:?} after the disconnect", t.elapsed());
    assert_eq!(server.metric("rustrag_cancelled_total")?, 1.0);
    // Far fewer than 250 tokens were generated: the decode stopped.
    assert!(server.metric("rustrag_tokens_generated_total")? < 200.0);
    let next = server.post(
        "/v1/answer",
        &json!({"question": QUESTION, "max_new_tokens": 8}),
    )?;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(server.metric("rustrag_queue_depth")?, 0.0);
    Ok(())
}

/// Hot swap: `rustrag index add` on the served KB is picked up without a restart; a KB posted to
/// `/admin/kb` is swapped in while a stream is in flight, which finishes on the old one.
#[test]
fn knowledge_base_hot_swap() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let kb = tmp.path().join("kb");
    copy_dir(&shared_kb()?, &kb)?;
    let other = build_kb(tmp.path(), "other", 0, 10)?;
    let server = Server::start(&kb, &[])?;
    let health = server.get("/healthz")?.json()?;
    let gen0 = health["kb"]["generation"].clone();
    assert!(gen0.is_string(), "{health}");

    // A new document, added with `rustrag index add` while serving.
    let added = tmp.path().join("added.jsonl");
    std::fs::write(
        &added,
        json!({"id": "zebra-1", "title": "Zebra crossings of Quuxville",
               "text": "The Quuxville city council painted 417 purple zebra crossings in 2031, more than any other town."})
            .to_string() + "\n",
    )?;
    rustrag(&[
        "index",
        "add",
        "--kb",
        &kb.to_string_lossy(),
        "--corpus",
        &added.to_string_lossy(),
    ])?;
    server.wait_for(20, "the new generation to be served", || {
        Ok(server.get("/healthz")?.json()?["kb"]["generation"] != gen0)
    })?;
    let r = server
        .post(
            "/v1/retrieve",
            &json!({"question": "How many purple zebra crossings did Quuxville paint?", "k": 1}),
        )?
        .json()?;
    assert_eq!(r["kb"]["passages"], 31, "{r}");
    assert!(
        r["results"][0]["sources"][0]["passage_id"]
            .as_str()
            .unwrap_or("")
            .starts_with("zebra-1"),
        "{r}"
    );
    assert_eq!(server.metric("rustrag_kb_swaps_total")?, 1.0);

    // Another KB through the admin endpoint while a stream is in flight.
    let mut stream = long_stream(&server, 40)?;
    let swap = server.post("/admin/kb", &json!({"path": other}))?;
    assert_eq!(swap.status, 200, "{}", swap.text());
    assert_eq!(swap.json()?["kb"]["passages"], 10);
    let done = loop {
        let (name, data) = stream.next()?.context("stream ended without done")?;
        match name.as_str() {
            "token" => {}
            "done" => break serde_json::from_str::<Value>(&data)?,
            other => bail!("unexpected {other}: {data}"),
        }
    };
    assert_eq!(
        done["kb"]["passages"], 31,
        "the stream finished on the KB it started with: {}",
        done["kb"]
    );
    assert_eq!(done["timings"]["generated_tokens"], 40);
    let after = server
        .post("/v1/retrieve", &json!({"question": QUESTION}))?
        .json()?;
    assert_eq!(after["kb"]["passages"], 10, "{after}");
    assert_eq!(server.metric("rustrag_kb_swaps_total")?, 2.0);
    Ok(())
}

/// A passage corrupted in place in the served `passages.bin` (same file: the server's mapping
/// sees the bytes) fails the retrieval that reads it at once, with no re-check, naming the file
/// and block and not the text; BM25 hits come from the KB's checked store too. A failed read does
/// not fail the KB: `/healthz` stays 200, and the restored bytes are served again.
#[test]
fn served_passages_are_checked_on_every_read() -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let tmp = tempfile::tempdir()?;
    let kb = tmp.path().join("kb");
    copy_dir(&shared_kb()?, &kb)?;
    let server = Server::start(&kb, &["--retriever", "bm25", "--kb-scrub-interval-s", "0"])?;
    let ask = || server.post("/v1/retrieve", &json!({"question": QUESTION, "k": 3}));
    let r = ask()?;
    assert_eq!(r.status, 200, "{}", r.text());
    let top = r.json()?["results"][0]["sources"][0].clone();
    let row = top["doc_id"].as_u64().context("doc_id")?;

    // A byte in the middle of the top hit's record.
    let h = server.get("/healthz")?.json()?;
    let generation = h["kb"]["generation"].as_str().context("generation")?;
    let offsets = std::fs::read(kb.join(generation).join("passages.idx"))?;
    let offset = |r: u64| {
        let at = r as usize * 8;
        u64::from_le_bytes(offsets[at..at + 8].try_into().expect("8 bytes"))
    };
    let at = (offset(row) + offset(row + 1)) / 2;
    let records = kb.join(generation).join("passages.bin");
    let (block, len) = (at / 16384, std::fs::metadata(&records)?.len());
    let block = format!(
        "block {block} (bytes {}..{})",
        block * 16384,
        ((block + 1) * 16384).min(len)
    );
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&records)?;
    let mut original = [0u8; 8];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut original)?;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(b"CORRUPT!")?;
    f.sync_all()?;
    let r = ask()?;
    assert_eq!(r.status, 500, "{}", r.text());
    let message = r.json()?["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        message.contains(&records.display().to_string())
            && message.contains(&block)
            && message.contains("CRC32"),
        "{message}"
    );
    assert!(!message.contains("CORRUPT!"), "{message}");
    let h = server.get("/healthz")?;
    assert_eq!(h.status, 200, "{}", h.text());

    f.seek(SeekFrom::Start(at))?;
    f.write_all(&original)?;
    f.sync_all()?;
    let r = ask()?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()?["results"][0]["sources"][0], top);
    Ok(())
}

/// The served KB's block checksums are re-checked every `--kb-scrub-interval-s`: embeddings
/// corrupted in place while they are served (same file, so the server's mapping sees the bytes)
/// turn `/healthz` into a 503 naming the file and block, every retrieval into a 500 with that
/// error, and `rustrag_kb_corrupt` into 1.
#[test]
fn served_kb_corrupted_in_place_is_caught_by_the_scrub() -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let tmp = tempfile::tempdir()?;
    let kb = tmp.path().join("kb");
    copy_dir(&shared_kb()?, &kb)?;
    let server = Server::start(&kb, &["--kb-scrub-interval-s", "1"])?;
    let h = server.get("/healthz")?;
    assert_eq!(h.status, 200, "{}", h.text());
    let h = h.json()?;
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["kb_integrity"]["scrub_interval_s"], 1.0, "{h}");
    assert_eq!(h["kb_integrity"]["error"], Value::Null, "{h}");
    server.wait_for(20, "a re-check of the intact KB", || {
        Ok(server.get("/healthz")?.json()?["kb_integrity"]["checks"].as_u64() >= Some(2))
    })?;
    assert_eq!(server.metric("rustrag_kb_corrupt")?, 0.0);
    let r = server.post("/v1/retrieve", &json!({"question": QUESTION}))?;
    assert_eq!(r.status, 200, "{}", r.text());

    let generation = h["kb"]["generation"].as_str().context("generation")?;
    let emb = kb.join(generation).join("embeddings.f32");
    let block = format!("block 0 (bytes 0..{})", std::fs::metadata(&emb)?.len());
    let mut f = std::fs::OpenOptions::new().write(true).open(&emb)?;
    f.seek(SeekFrom::Start(1000))?;
    f.write_all(&1.5f32.to_le_bytes())?;
    f.sync_all()?;
    server.wait_for(20, "the re-check to find the corrupt block", || {
        Ok(server.get("/healthz")?.status == 503)
    })?;
    let h = server.get("/healthz")?.json()?;
    assert_eq!(h["status"], "kb_corrupt", "{h}");
    let e = h["kb_integrity"]["error"].as_str().unwrap_or("");
    assert!(
        e.contains(&emb.display().to_string()) && e.contains(&block),
        "{h}"
    );
    let r = server.post("/v1/retrieve", &json!({"question": QUESTION}))?;
    assert_eq!(r.status, 500, "{}", r.text());
    let message = r.json()?["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        message.contains("embeddings.f32") && message.contains(&block) && message.contains("CRC32"),
        "{message}"
    );
    assert_eq!(server.metric("rustrag_kb_corrupt")?, 1.0);
    Ok(())
}

/// `python` with the `openai` package: $RUSTRAG_TEST_PYTHON, else the CI venv, else python3.
fn python_with_openai() -> Result<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates: Vec<PathBuf> = std::env::var_os("RUSTRAG_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            root.join("target/ci-venv/bin/python"),
            PathBuf::from("python3"),
        ])
        .collect();
    for py in &candidates {
        let ok = Command::new(py)
            .args(["-c", "import openai"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(py.clone());
        }
    }
    bail!(
        "no Python with the `openai` package (tried {candidates:?}): run `python3 -m venv target/ci-venv && target/ci-venv/bin/pip install openai` (as .ci/install-serve-deps.sh does), or set RUSTRAG_TEST_PYTHON"
    )
}

/// The official `openai` Python client against `/v1/chat/completions`, streaming and not.
#[test]
fn openai_python_client_streaming_and_not() -> Result<()> {
    let py = python_with_openai()?;
    let kb = shared_kb()?;
    let server = Server::start(&kb, &[])?;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/serve_clients/openai_client.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(format!("{}/v1", server.url()))
        .arg(QUESTION)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{} failed:\n{stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .with_context(|| format!("last line of {stdout}"))?;
    assert!(!v["content"].as_str().unwrap_or("").is_empty(), "{v}");
    assert_eq!(v["content"], v["streamed_content"], "{v}");
    assert_eq!(v["sources"][0]["passage_id"], "0-0", "{v}");
    Ok(())
}

/// The page at `/` in headless Chromium (playwright-core): ask, the answer streams in with each
/// token shaded by its source, the sources are listed with their priors; a screenshot is saved.
#[test]
fn web_page_in_headless_chromium() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let modules = std::env::var_os("RUSTRAG_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".ci/node_modules"));
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ensure!(
        node_ok && modules.join("playwright-core").is_dir() && chromium.is_file(),
        "the browser test needs node, playwright-core in {} and Chromium at {}: run .ci/install-serve-deps.sh (apt-get install -y chromium nodejs npm; npm install --prefix .ci)",
        modules.display(),
        chromium.display()
    );
    let kb = shared_kb()?;
    let server = Server::start(&kb, &[])?;
    let shot = root.join("target/serve-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("node")
        .arg(root.join("tests/serve_clients/page.cjs"))
        .arg(server.url())
        .arg(&shot)
        .env("NODE_PATH", &modules)
        .env("CHROMIUM", &chromium)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "page.cjs failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .with_context(|| format!("last line of {stdout}"))?;
    assert!(v["tokens"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["sources"], 3, "{v}");
    assert_eq!(v["shaded"], v["tokens"], "every token shaded: {v}");
    assert!(v["answer"].as_str().unwrap_or("").len() > 1, "{v}");
    let png = std::fs::read(&shot).with_context(|| shot.display().to_string())?;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot {}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
    Ok(())
}
