//! The OpenAPI 3.1 description of the server, kept here and only here. A test checks that its
//! paths are exactly the router's ([`super::handlers::routes`]).
//!
//! It is written for the server that serves it: the limits set at start-up (and the KB size,
//! which a swap changes) are in the schemas as `maximum` / `maxLength` / `maxItems`, the
//! retriever enum names the one loaded, and cross-field rules are `not` clauses, so a request the
//! document calls valid is one the server accepts (schemathesis checks both directions:
//! `bench/serve_fuzz.sh`). Optional request fields are nullable (null = absent), as OpenAI's
//! chat-completions schema declares them; required ones are not.

use super::api::{Limits, MAX_TEMPERATURE};
use super::ServeConfig;
use crate::rag::pipeline::RetrieverKind;
use serde_json::{json, Value};

/// The limits the document states.
#[derive(Clone, Copy, Debug)]
pub struct DocLimits {
    /// Most documents per question (`n_docs`, `k`): min(`ServeConfig::max_n_docs`, KB size).
    pub max_n_docs: usize,
    /// `ServeConfig::max_new_tokens`.
    pub max_new_tokens: usize,
    /// `ServeConfig::max_questions`.
    pub max_questions: usize,
    /// `PipelineConfig::max_question_chars`.
    pub max_question_chars: usize,
    /// The retriever loaded (`retriever` must name it).
    pub retriever: RetrieverKind,
}

impl DocLimits {
    pub fn new(config: &ServeConfig, limits: &Limits, retriever: RetrieverKind) -> Self {
        Self {
            max_n_docs: limits.max_n_docs.min(limits.kb_len),
            max_new_tokens: limits.max_new_tokens,
            max_questions: config.max_questions,
            max_question_chars: limits.max_question_chars,
            retriever,
        }
    }
}

/// `schema` or JSON null (an optional field: null reads as absent).
fn nullable(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        if let Some(Value::String(t)) = o.get("type").cloned() {
            o.insert("type".into(), json!([t, "null"]));
        }
        if let Some(Value::Array(e)) = o.get_mut("enum") {
            e.push(Value::Null);
        }
        if let Some(Value::Array(one_of)) = o.get_mut("oneOf") {
            one_of.push(json!({"type": "null"}));
        }
    }
    schema
}

/// Every property nullable but the `required` ones and `not_null`.
fn optional_nullable(mut object: Value, not_null: &[&str]) -> Value {
    let required: Vec<String> = object["required"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if let Some(props) = object["properties"].as_object_mut() {
        for (name, schema) in props.iter_mut() {
            if !required.contains(name) && !not_null.contains(&name.as_str()) {
                *schema = nullable(schema.take());
            }
        }
    }
    object
}

/// "Not (all these properties present and matching)": a cross-field rule the server enforces.
fn forbid(props: Value) -> Value {
    let required: Vec<&String> = props
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    json!({"required": required, "properties": props})
}

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn ok_json(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn errors() -> Value {
    let e = json!({"$ref": "#/components/schemas/Error"});
    json!({
        "400": ok_json("Invalid request; `error.param` names the field", e.clone()),
        "413": ok_json("Body over the size limit", e.clone()),
        "500": ok_json("Internal error", e.clone()),
        "503": {"description": "Queue full; retry after `Retry-After` seconds",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": e.clone()}}},
        "504": ok_json("Not answered within the request timeout", e),
    })
}

fn with_errors(mut ok: Value) -> Value {
    if let (Some(o), Some(e)) = (ok.as_object_mut(), errors().as_object()) {
        o.extend(e.clone());
    }
    ok
}

/// The document served at `/openapi.json`, stating `limits`.
pub fn document(limits: &DocLimits) -> Value {
    let int = |min: u64| json!({"type": "integer", "minimum": min});
    let bounded =
        |min: usize, max: usize| json!({"type": "integer", "minimum": min, "maximum": max});
    let l = limits;
    // Non-blank (the server's `is_blank`) and within the question limit.
    let question = json!({"type": "string", "minLength": 1, "maxLength": l.max_question_chars, "pattern": "\\S"});
    let n_docs = bounded(1, l.max_n_docs);
    let max_new = |default: usize| {
        json!({"type": "integer", "minimum": 1, "maximum": l.max_new_tokens,
        "default": default.min(l.max_new_tokens)})
    };
    let temperature = json!({"type": "number", "minimum": 0, "maximum": MAX_TEMPERATURE,
        "description": "0 (or absent): greedy. Above 0: sample the next token from the RAG-Token marginal, scores / temperature, then top_p (mode token, beams 1)"});
    let top_p = json!({"type": "number", "minimum": 0, "maximum": 1, "default": 1,
        "description": "Nucleus sampling (with temperature > 0)"});
    // Sampling and streaming need RAG-Token with one beam.
    let sampling = json!({"type": "number", "exclusiveMinimum": 0});
    let sequence = json!({"type": "string", "const": "sequence"});
    // Chat message content: a string or `{"type": "text", "text"}` parts; a user message's text
    // is a question (non-blank: some part non-blank).
    let part = json!({"type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}});
    let any_content = json!({"oneOf": [{"type": "string"}, {"type": "array", "items": part}]});
    let user_content = json!({"oneOf": [question, {"type": "array", "items": part, "minItems": 1,
        "contains": {"type": "object", "properties": {"text": {"type": "string", "pattern": "\\S"}}}}]});
    let message = |role: Value, content: Value| {
        json!({"type": "object", "additionalProperties": false,
        "required": ["role", "content"], "properties": {
            "role": role, "content": content, "name": {"type": ["string", "null"]}}})
    };
    let source = json!({"type": "object", "properties": {
        "rank": int(1), "doc_id": int(0), "passage_id": {"type": "string"},
        "title": {"type": "string"}, "text": {"type": "string"},
        "retrieval_score": {"type": "number"}, "score": {"type": "number"},
        "prior": {"type": "number", "description": "p(z|x)"}}});
    let kb = json!({"type": "object", "properties": {
        "path": {"type": "string"}, "generation": {"type": ["string", "null"]},
        "passages": int(0)}});
    let integrity = json!({"type": ["object", "null"], "properties": {
        "checks": int(0), "last_check_unix": {"type": ["integer", "null"]},
        "last_check_seconds": {"type": ["number", "null"]}, "scrub_interval_s": {"type": "number"},
        "error": {"type": ["string", "null"], "description": "the corrupt file, block and byte range"}}});
    let health = json!({"type": "object", "properties": {
        "status": {"type": "string", "enum": ["ok", "kb_corrupt"]}, "kb": kb,
        "kb_integrity": integrity, "generator": {"type": "string"}, "retriever": {"type": "string"},
        "queue": {"type": "object", "properties": {"depth": int(0), "capacity": int(1)}}}});
    let token = json!({"type": "object", "properties": {
        "position": int(0), "id": int(0), "text": {"type": "string"},
        "doc_posterior": {"type": "array", "items": {"type": "number"},
            "description": "p(z | x, y_i, y<i) over the sources, in source order"}}});
    let mode = json!({"type": "string", "enum": ["token", "sequence"]});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "rustrag serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Retrieval-augmented generation over a rustrag knowledge base. Errors are {\"error\": {message, type, param, code}}; unknown fields are refused; optional fields may be null (= absent). The limits of this server (ServeConfig: max_n_docs, max_new_tokens, max_questions; the KB size; the question length) are in the schemas; a body over max_body_bytes is a 413.",
        },
        "paths": {
            "/": {"get": {"summary": "The web page: ask, watch the answer stream in with each token shaded by its source",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
            "/healthz": {"get": {"summary": "Liveness, the served KB generation, its block checks and the queue",
                "responses": {"200": ok_json("Healthy", health.clone()),
                    "503": ok_json("The served KB failed a block check (status kb_corrupt): every retrieval fails", health)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4)",
                "responses": {"200": {"description": "Metrics", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                "responses": {"200": ok_json("OpenAPI 3.1", json!({"type": "object"}))}}},
            "/v1/retrieve": {"post": {
                "summary": "Top-k passages with their retrieval scores and doc priors p(z|x)",
                "requestBody": body(optional_nullable(json!({"type": "object", "additionalProperties": false,
                    "oneOf": [{"required": ["question"]}, {"required": ["questions"]}],
                    "properties": {
                    "question": question,
                    "questions": {"type": "array", "items": question, "minItems": 1, "maxItems": l.max_questions},
                    "k": {"type": "integer", "minimum": 1, "maximum": l.max_n_docs, "default": 3usize.min(l.max_n_docs)},
                    "retriever": {"type": "string", "enum": [l.retriever],
                        "description": "the served one (one retriever is loaded, `rustrag serve --retriever`)"},
                    "prior_temperature": {"type": "number", "exclusiveMinimum": 0}}}), &["question", "questions"])),
                "responses": with_errors(json!({"200": ok_json("Passages per question", json!({"type": "object", "properties": {
                    "retriever": {"type": "string"}, "kb": kb,
                    "results": {"type": "array", "items": {"type": "object", "properties": {
                        "question": {"type": "string"}, "sources": {"type": "array", "items": source}}}}}}))}))}},
            "/v1/answer": {"post": {
                "summary": "Answer with sources, priors and per-token provenance; `stream: true` sends server-sent events",
                "description": "Streamed: event `sources` ({sources}), one event `token` per generated token ({position, id, text, doc_posterior}), then `done` (the answer, sources and timings) or `error`. Streaming and sampling (temperature > 0) need mode token and beams 1 (else 400 naming `stream` / `temperature`). min_new_tokens above max_new_tokens means all of them.",
                "requestBody": body(optional_nullable(json!({"type": "object", "additionalProperties": false, "required": ["question"],
                    "allOf": [
                        {"not": forbid(json!({"stream": {"const": true}, "mode": sequence}))},
                        {"not": forbid(json!({"stream": {"const": true}, "beams": {"type": "integer", "minimum": 2}}))},
                        {"not": forbid(json!({"temperature": sampling, "mode": sequence}))},
                        {"not": forbid(json!({"temperature": sampling, "beams": {"type": "integer", "minimum": 2}}))}],
                    "properties": {
                    "question": question,
                    "mode": mode,
                    "n_docs": n_docs,
                    "beams": {"type": "integer", "minimum": 1, "maximum": 8, "default": 1},
                    "max_new_tokens": max_new(32),
                    "min_new_tokens": bounded(0, l.max_new_tokens),
                    "prior_temperature": {"type": "number", "exclusiveMinimum": 0},
                    "sequence_decoding": {"type": "string", "enum": ["thorough", "fast"]},
                    "provenance": {"type": "boolean", "default": true},
                    "stream": {"type": "boolean", "default": false},
                    "temperature": temperature,
                    "top_p": top_p,
                    "seed": {"type": "integer", "minimum": 0, "maximum": u64::MAX,
                        "description": "Sampling seed: same seed, question and settings, same answer"}}}), &[])),
                "responses": with_errors(json!({"200": {"description": "The answer (JSON) or its event stream",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Answer"}},
                        "text/event-stream": {"schema": {"type": "string"}}}}}))}},
            "/v1/chat/completions": {"post": {
                "summary": "OpenAI-compatible chat completion: RAG over the last user message",
                "description": "Greedy unless temperature > 0 (OpenAI's default temperature is 1; here greedy is the default). n absent or 1. max_tokens and max_completion_tokens are both caps (the smaller wins). Every user message's text must be non-blank, at most the question limit (a list of parts: joined). Extra response fields: `sources` (and per streamed chunk `provenance`). Streamed: `chat.completion.chunk` events, then `data: [DONE]`.",
                "requestBody": body(optional_nullable(json!({"type": "object", "additionalProperties": false, "required": ["messages"],
                    "allOf": [
                        {"not": forbid(json!({"stream": {"const": true}, "mode": sequence}))},
                        {"not": forbid(json!({"temperature": sampling, "mode": sequence}))}],
                    "properties": {
                    "model": {"type": "string"},
                    "messages": {"type": "array", "minItems": 1,
                        "contains": {"type": "object", "required": ["role"], "properties": {"role": {"const": "user"}}},
                        "items": {"oneOf": [
                            message(json!({"const": "user"}), user_content),
                            message(json!({"type": "string", "not": {"const": "user"}}), any_content)]}},
                    "max_tokens": max_new(64),
                    "max_completion_tokens": bounded(1, l.max_new_tokens),
                    "temperature": temperature,
                    "top_p": top_p,
                    "n": {"type": "integer", "enum": [1]},
                    "stop": {"oneOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]},
                    "stream": {"type": "boolean", "default": false},
                    "stream_options": {"type": "object", "properties": {"include_usage": {"type": ["boolean", "null"]}}, "additionalProperties": false},
                    "user": {"type": "string"},
                    "seed": {"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX},
                    "n_docs": n_docs,
                    "mode": mode}}), &[])),
                "responses": with_errors(json!({"200": {"description": "chat.completion, or chat.completion.chunk events",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}}}))}},
            "/v1/models": {"get": {"summary": "The served generator as an OpenAI model list",
                "responses": {"200": ok_json("Models", json!({"type": "object"}))}}},
            "/admin/kb": {"post": {
                "summary": "Serve another knowledge base (loopback clients only); requests in flight finish on the old one",
                "requestBody": body(json!({"type": "object", "additionalProperties": false, "required": ["path"],
                    "properties": {"path": {"type": "string", "minLength": 1}}})),
                "responses": {
                    "200": ok_json("Swapped in", json!({"type": "object", "properties": {"kb": kb}})),
                    "400": ok_json("An empty path, or a knowledge base not usable with the served generator", json!({"$ref": "#/components/schemas/Error"})),
                    "404": ok_json("No knowledge base at `path`", json!({"$ref": "#/components/schemas/Error"})),
                    "403": ok_json("Not a loopback client", json!({"$ref": "#/components/schemas/Error"}))}}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}}},
            "Answer": {"type": "object", "properties": {
                "question": {"type": "string"}, "answer": {"type": "string"}, "mode": mode,
                "prior_temperature": {"type": "number"},
                "sources": {"type": "array", "items": source},
                "tokens": {"type": "array", "items": token},
                "answer_posterior": {"type": ["array", "null"], "items": {"type": "number"}},
                "ids": {"type": "array", "items": {"type": "integer"}},
                "finish_reason": {"type": "string", "enum": ["stop", "length"]},
                "kb": kb,
                "timings": {"type": "object", "properties": {
                    "queue_ms": {"type": "number"}, "first_token_ms": {"type": ["number", "null"]},
                    "total_ms": {"type": "number"}, "generated_tokens": int(0),
                    "tokens_per_s": {"type": ["number", "null"]}, "batch_size": int(1)}}}},
        }},
    })
}
