//! Request and response types of the server's own API, its JSON errors and the body extractor
//! that names the offending field.

use crate::rag::pipeline::{AnswerOptions, QaResult, RetrieverKind, SequenceDecoding, Source};
use crate::rag::RagMode;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// An optional field whose JSON `null` means absent (the default). Optional request fields are
/// nullable on every route, as OpenAI declares them for chat completions; `/openapi.json` says so.
/// (An `Option` field reads null as `None` by itself; this is for the fields with a plain default.)
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An optional integer field (null = absent) that also takes an integral float such as `7.0`:
/// JSON Schema's `integer` is a mathematical integer, so the document calls `7.0` valid, and
/// clients that hold every number as a double send it that way. Anything else (a fraction, out
/// of range, not a number) is an error naming the field.
pub fn integer<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64> + TryFrom<i64>,
{
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let out_of_range = || D::Error::custom(format!("invalid value: {n}, out of range"));
    if let Some(u) = n.as_u64() {
        return T::try_from(u).map(Some).map_err(|_| out_of_range());
    }
    if let Some(i) = n.as_i64() {
        return T::try_from(i).map(Some).map_err(|_| out_of_range());
    }
    match n.as_f64() {
        // Integral and exactly representable (|x| < 2^53): a float spelling of an integer.
        Some(f) if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 => match f < 0.0 {
            true => T::try_from(f as i64).map(Some).map_err(|_| out_of_range()),
            false => T::try_from(f as u64).map(Some).map_err(|_| out_of_range()),
        },
        _ => Err(D::Error::custom(format!(
            "invalid type: {n}, expected an integer"
        ))),
    }
}

/// An optional field that may be absent but not `null`: `question` / `questions` (exactly one of
/// them is given, which a nullable pair could not state in the document).
pub fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// An error answered as `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape, on
/// every route).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault (`n_docs`, `messages[0].content`, `body`).
    pub param: Option<String>,
    /// Seconds for `Retry-After` (503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 400 naming `param`.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    pub fn internal(e: &anyhow::Error) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            503 | 504 => "unavailable_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// A JSON body read up to the configured size and parsed strictly (unknown fields refused); a
/// parse error names the field (`serde_path_to_error`).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(64 << 10, |l| l.0);
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError {
                param: Some("body".into()),
                ..ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over {limit} bytes (ServeConfig::max_body_bytes)"),
                )
            })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// The body size limit, put in the request's extensions by the router.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Strict JSON → `T`, errors naming the path of the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every request body is an object (serde would read a top-level array as a struct's fields).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::field(
            "body",
            "invalid request: the body must be a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let param = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "body".to_string()
            }
            // A missing field is reported on the object that lacks it.
            _ => match (missing_field(&message), path.as_str()) {
                (Some(f), ".") => f,
                (Some(f), p) => format!("{p}.{f}"),
                (None, ".") => "body".to_string(),
                (None, p) => p.to_string(),
            },
        };
        ApiError::field(&param, format!("invalid request: {message}"))
    })
}

/// `missing field `x`` → `x`.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// The knowledge base a response was computed on.
#[derive(Clone, Debug, Serialize)]
pub struct KbInfo {
    pub path: String,
    /// The `gen-NNNNNNNN` generation (None: a KB written before generations).
    pub generation: Option<String>,
    pub passages: usize,
}

/// `POST /v1/retrieve`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrieveRequest {
    /// One question (or `questions`).
    #[serde(default, deserialize_with = "not_null")]
    pub question: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    pub questions: Option<Vec<String>>,
    /// Passages per question. Default 3.
    #[serde(default, deserialize_with = "integer")]
    pub k: Option<usize>,
    /// Must be the served retriever when given (one retriever is loaded).
    pub retriever: Option<RetrieverKind>,
    /// τ of the doc prior. Default: the KB's.
    pub prior_temperature: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RetrieveResult {
    pub question: String,
    pub sources: Vec<Source>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RetrieveResponse {
    pub retriever: RetrieverKind,
    pub kb: KbInfo,
    pub results: Vec<RetrieveResult>,
}

/// `POST /v1/answer`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerRequest {
    pub question: String,
    /// `token` (default) or `sequence`.
    pub mode: Option<RagMode>,
    #[serde(default, deserialize_with = "integer")]
    pub n_docs: Option<usize>,
    /// 1 = greedy (default).
    #[serde(default, deserialize_with = "integer")]
    pub beams: Option<usize>,
    #[serde(default, deserialize_with = "integer")]
    pub max_new_tokens: Option<usize>,
    #[serde(default, deserialize_with = "integer")]
    pub min_new_tokens: Option<usize>,
    pub prior_temperature: Option<f64>,
    /// RAG-Sequence: `thorough` (default) or `fast`.
    pub sequence_decoding: Option<SequenceDecoding>,
    /// Per-token document posteriors in the answer (default true; streamed answers carry them
    /// in their token events).
    pub provenance: Option<bool>,
    /// Server-sent events: `sources`, one `token` per generated token, then `done`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    /// Sampling temperature in [0, 2]; absent or 0: greedy ([`AnswerOptions::temperature`]).
    pub temperature: Option<f64>,
    /// Nucleus sampling, in [0, 1]; default 1.
    pub top_p: Option<f64>,
    /// Seed of the sampling (same seed and settings: same answer).
    #[serde(default, deserialize_with = "integer")]
    pub seed: Option<u64>,
}

/// Timings of one answer, milliseconds from the request's arrival.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Waiting for the answer worker.
    pub queue_ms: f64,
    /// To the first generated token (None when none was observed: non-streamed beam search or
    /// RAG-Sequence).
    pub first_token_ms: Option<f64>,
    pub total_ms: f64,
    pub generated_tokens: usize,
    /// Generated tokens per second after the first.
    pub tokens_per_s: Option<f64>,
    /// Questions decoded together with this one.
    pub batch_size: usize,
}

/// One generated token with its provenance.
#[derive(Clone, Debug, Serialize)]
pub struct TokenOut {
    pub position: usize,
    pub id: u32,
    pub text: String,
    /// p(z | x, y_i, y<i) over the sources, in source order.
    pub doc_posterior: Vec<f32>,
}

/// The answer to `POST /v1/answer` (and the `done` event of a stream).
#[derive(Clone, Debug, Serialize)]
pub struct AnswerResponse {
    pub question: String,
    pub answer: String,
    pub mode: RagMode,
    pub prior_temperature: f64,
    pub sources: Vec<Source>,
    /// RAG-Token: the generated tokens with their posteriors (streams: in the token events, empty
    /// here). RAG-Sequence: empty.
    pub tokens: Vec<TokenOut>,
    /// RAG-Sequence: p(z | x, y) of the answer over the sources.
    pub answer_posterior: Option<Vec<f32>>,
    /// Generated ids, from the decoder start token.
    pub ids: Vec<u32>,
    /// `length` when the answer stopped at max_new_tokens, else `stop`.
    pub finish_reason: &'static str,
    pub kb: KbInfo,
    pub timings: Timings,
}

impl AnswerResponse {
    pub fn new(r: QaResult, max_new_tokens: usize, kb: KbInfo, timings: Timings) -> Self {
        let a = r.answers.into_iter().next();
        let (text, ids, posts, tokens) = a
            .map(|a| (a.text, a.ids, a.doc_posteriors, a.tokens))
            .unwrap_or_default();
        let (tokens, answer_posterior) = match r.mode {
            RagMode::Token => (
                tokens
                    .into_iter()
                    .zip(posts)
                    .enumerate()
                    .map(|(i, (text, p))| TokenOut {
                        position: i,
                        id: ids[i + 1],
                        text,
                        doc_posterior: p,
                    })
                    .collect(),
                None,
            ),
            RagMode::Sequence => (Vec::new(), posts.into_iter().next()),
        };
        let generated = ids.len().saturating_sub(1);
        let finish_reason = match generated >= max_new_tokens {
            true => "length",
            false => "stop",
        };
        Self {
            question: r.question,
            answer: text,
            mode: r.mode,
            prior_temperature: r.prior_temperature,
            sources: r.sources,
            tokens,
            answer_posterior,
            ids,
            finish_reason,
            kb,
            timings,
        }
    }
}

/// Answer settings every answering route checks the same way.
#[derive(Clone, Debug, Default)]
pub struct AnswerSettings {
    pub mode: Option<RagMode>,
    pub n_docs: Option<usize>,
    pub beams: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub prior_temperature: Option<f64>,
    pub sequence_decoding: Option<SequenceDecoding>,
    pub provenance: bool,
    pub stream: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
}

/// Largest sampling temperature a request may ask for (OpenAI's limit).
pub const MAX_TEMPERATURE: f64 = 2.0;

/// Limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_n_docs: usize,
    pub max_new_tokens: usize,
    pub max_question_chars: usize,
    pub kb_len: usize,
}

/// Whitespace as the document's `"pattern": "\S"` sees it: Unicode White_Space plus the ASCII
/// separators U+001C..U+001F, which Python's `re` (schemathesis, jsonschema) counts as `\s` and
/// Rust's `char::is_whitespace` does not.
pub fn is_blank(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// A question that is non-empty and within the character limit.
pub fn check_question(field: &str, q: &str, limits: &Limits) -> Result<(), ApiError> {
    if is_blank(q) {
        return Err(ApiError::field(field, "the question is empty"));
    }
    let n = q.chars().count();
    if n > limits.max_question_chars {
        return Err(ApiError::field(
            field,
            format!(
                "the question has {n} characters, over the limit of {}",
                limits.max_question_chars
            ),
        ));
    }
    Ok(())
}

/// n_docs / k in 1..=min(limit, KB size).
pub fn check_n_docs(field: &str, n: usize, limits: &Limits) -> Result<(), ApiError> {
    let max = limits.max_n_docs.min(limits.kb_len);
    if n == 0 || n > max {
        return Err(ApiError::field(
            field,
            format!(
                "{field} must be between 1 and {max} (ServeConfig::max_n_docs {}, {} passages in the knowledge base), got {n}",
                limits.max_n_docs, limits.kb_len
            ),
        ));
    }
    Ok(())
}

impl AnswerSettings {
    /// Checked against `limits`; the pipeline options and the effective max_new_tokens.
    /// `names` maps setting names to the request's field names (OpenAI's `max_tokens`).
    pub fn options(
        &self,
        limits: &Limits,
        default_max_new: usize,
        field: impl Fn(&'static str) -> &'static str,
    ) -> Result<(AnswerOptions, usize), ApiError> {
        if let Some(n) = self.n_docs {
            check_n_docs(field("n_docs"), n, limits)?;
        }
        // The route's default, within the server's limit.
        let max_new = self
            .max_new_tokens
            .unwrap_or(default_max_new.min(limits.max_new_tokens));
        if max_new == 0 || max_new > limits.max_new_tokens {
            let f = field("max_new_tokens");
            return Err(ApiError::field(
                f,
                format!(
                    "{f} must be between 1 and {} (ServeConfig::max_new_tokens), got {max_new}",
                    limits.max_new_tokens
                ),
            ));
        }
        // Above max_new_tokens it means "all of them" (HF generates max_length then, with a
        // warning): refusing would make a request valid field by field depend on another field.
        let min_new = match self.min_new_tokens {
            Some(m) if m > limits.max_new_tokens => {
                return Err(ApiError::field(
                    field("min_new_tokens"),
                    format!(
                        "min_new_tokens must be at most {} (ServeConfig::max_new_tokens), got {m}",
                        limits.max_new_tokens
                    ),
                ));
            }
            m => m.map(|m| m.min(max_new)),
        };
        let beams = self.beams.unwrap_or(1);
        if beams == 0 || beams > 8 {
            return Err(ApiError::field(
                field("beams"),
                format!("beams must be between 1 and 8, got {beams}"),
            ));
        }
        if let Some(t) = self.prior_temperature {
            if !(t.is_finite() && t > 0.0) {
                return Err(ApiError::field(
                    field("prior_temperature"),
                    format!("prior_temperature must be positive and finite, got {t}"),
                ));
            }
        }
        if let Some(t) = self.temperature {
            if !(t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t)) {
                return Err(ApiError::field(
                    field("temperature"),
                    format!(
                        "temperature must be between 0 (greedy) and {MAX_TEMPERATURE}, got {t}"
                    ),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::field(
                    field("top_p"),
                    format!("top_p must be between 0 and 1, got {p}"),
                ));
            }
        }
        let mode = self.mode.unwrap_or(RagMode::Token);
        let sampling = self.temperature.is_some_and(|t| t > 0.0);
        if sampling && (mode != RagMode::Token || beams != 1) {
            return Err(ApiError::field(
                field("temperature"),
                format!(
                    "sampling (temperature > 0) draws from RAG-Token's marginal with one beam; got mode `{}` with {beams} beams: use mode token, beams 1, or temperature 0",
                    mode_name(mode)
                ),
            ));
        }
        if self.stream && (mode != RagMode::Token || beams != 1) {
            return Err(ApiError::field(
                field("stream"),
                format!(
                    "streaming needs mode `token` with beams 1 (each token's posterior is final only under greedy or sampled RAG-Token decoding); got mode `{}` with {beams} beams: drop `stream` or use mode token, beams 1",
                    mode_name(mode)
                ),
            ));
        }
        let opts = AnswerOptions {
            n_docs: self.n_docs,
            mode: Some(mode),
            sequence_decoding: self.sequence_decoding.unwrap_or(SequenceDecoding::Thorough),
            beams: Some(beams),
            num_return_sequences: None,
            max_new_tokens: Some(max_new),
            min_new_tokens: min_new,
            prior_temperature: self.prior_temperature,
            // A stream carries each token's posterior from decoding: no extra pass.
            provenance: self.provenance && !self.stream,
            closed_book: false,
            // Greedy requests carry no sampling settings, so they batch together whatever
            // top_p / seed they named (neither changes a greedy answer).
            temperature: self.temperature.filter(|_| sampling),
            top_p: self.top_p.filter(|_| sampling),
            seed: self.seed.filter(|_| sampling),
        };
        Ok((opts, max_new))
    }
}

fn mode_name(mode: RagMode) -> &'static str {
    match mode {
        RagMode::Token => "token",
        RagMode::Sequence => "sequence",
    }
}
