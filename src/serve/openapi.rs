//! The OpenAPI 3.1 description of the server, kept here and only here. A test checks that its
//! paths are exactly the router's ([`super::handlers::routes`]).

use serde_json::{json, Value};

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

/// The document served at `/openapi.json`.
pub fn document() -> Value {
    let int = |min: u64| json!({"type": "integer", "minimum": min});
    let source = json!({"type": "object", "properties": {
        "rank": int(1), "doc_id": int(0), "passage_id": {"type": "string"},
        "title": {"type": "string"}, "text": {"type": "string"},
        "retrieval_score": {"type": "number"}, "score": {"type": "number"},
        "prior": {"type": "number", "description": "p(z|x)"}}});
    let kb = json!({"type": "object", "properties": {
        "path": {"type": "string"}, "generation": {"type": ["string", "null"]},
        "passages": int(0)}});
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
            "description": "Retrieval-augmented generation over a rustrag knowledge base. Errors are {\"error\": {message, type, param, code}}; unknown fields are refused. Limits set when the server starts (ServeConfig: max_n_docs, max_new_tokens, max_questions, max_body_bytes, the KB size) are checked per request and answered 400 naming the field.",
        },
        "paths": {
            "/": {"get": {"summary": "The web page: ask, watch the answer stream in with each token shaded by its source",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
            "/healthz": {"get": {"summary": "Liveness, the served KB generation and the queue",
                "responses": {"200": ok_json("Healthy", json!({"type": "object", "properties": {
                    "status": {"type": "string"}, "kb": kb, "generator": {"type": "string"},
                    "retriever": {"type": "string"},
                    "queue": {"type": "object", "properties": {"depth": int(0), "capacity": int(1)}}}}))}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4)",
                "responses": {"200": {"description": "Metrics", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                "responses": {"200": ok_json("OpenAPI 3.1", json!({"type": "object"}))}}},
            "/v1/retrieve": {"post": {
                "summary": "Top-k passages with their retrieval scores and doc priors p(z|x)",
                "requestBody": body(json!({"type": "object", "additionalProperties": false,
                    "oneOf": [{"required": ["question"]}, {"required": ["questions"]}],
                    "properties": {
                    "question": {"type": "string", "minLength": 1},
                    "questions": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                    "k": {"type": "integer", "minimum": 1, "default": 3},
                    "retriever": {"type": "string", "enum": ["dense", "bm25", "hybrid"],
                        "description": "must be the served one"},
                    "prior_temperature": {"type": "number", "exclusiveMinimum": 0}}})),
                "responses": with_errors(json!({"200": ok_json("Passages per question", json!({"type": "object", "properties": {
                    "retriever": {"type": "string"}, "kb": kb,
                    "results": {"type": "array", "items": {"type": "object", "properties": {
                        "question": {"type": "string"}, "sources": {"type": "array", "items": source}}}}}}))}))}},
            "/v1/answer": {"post": {
                "summary": "Answer with sources, priors and per-token provenance; `stream: true` sends server-sent events",
                "description": "Streamed: event `sources` ({sources}), one event `token` per generated token ({position, id, text, doc_posterior}), then `done` (the answer, sources and timings) or `error`. Streaming needs mode token and beams 1 (else 400 naming `stream`).",
                "requestBody": body(json!({"type": "object", "additionalProperties": false, "required": ["question"], "properties": {
                    "question": {"type": "string", "minLength": 1},
                    "mode": mode,
                    "n_docs": {"type": "integer", "minimum": 1},
                    "beams": {"type": "integer", "minimum": 1, "maximum": 8, "default": 1},
                    "max_new_tokens": {"type": "integer", "minimum": 1, "default": 32},
                    "min_new_tokens": {"type": "integer", "minimum": 0},
                    "prior_temperature": {"type": "number", "exclusiveMinimum": 0},
                    "sequence_decoding": {"type": "string", "enum": ["thorough", "fast"]},
                    "provenance": {"type": "boolean", "default": true},
                    "stream": {"type": "boolean", "default": false}}})),
                "responses": with_errors(json!({"200": {"description": "The answer (JSON) or its event stream",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Answer"}},
                        "text/event-stream": {"schema": {"type": "string"}}}}}))}},
            "/v1/chat/completions": {"post": {
                "summary": "OpenAI-compatible chat completion: RAG over the last user message",
                "description": "Greedy only: temperature must be absent or 0, top_p absent or 1, n absent or 1. Extra response fields: `sources` (and per streamed chunk `provenance`). Streamed: `chat.completion.chunk` events, then `data: [DONE]`.",
                "requestBody": body(json!({"type": "object", "additionalProperties": false, "required": ["messages"], "properties": {
                    "model": {"type": "string"},
                    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": false,
                        "required": ["role", "content"], "properties": {
                            "role": {"type": "string"}, "name": {"type": "string"},
                            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}}},
                    "max_tokens": {"type": "integer", "minimum": 1, "default": 64},
                    "max_completion_tokens": {"type": "integer", "minimum": 1},
                    "temperature": {"type": "number", "enum": [0]},
                    "top_p": {"type": "number", "enum": [1]},
                    "n": {"type": "integer", "enum": [1]},
                    "stop": {"oneOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]},
                    "stream": {"type": "boolean", "default": false},
                    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": false},
                    "user": {"type": "string"},
                    "seed": {"type": "integer"},
                    "n_docs": {"type": "integer", "minimum": 1},
                    "mode": mode}})),
                "responses": with_errors(json!({"200": {"description": "chat.completion, or chat.completion.chunk events",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}}}))}},
            "/v1/models": {"get": {"summary": "The served generator as an OpenAI model list",
                "responses": {"200": ok_json("Models", json!({"type": "object"}))}}},
            "/admin/kb": {"post": {
                "summary": "Serve another knowledge base (loopback clients only); requests in flight finish on the old one",
                "requestBody": body(json!({"type": "object", "additionalProperties": false, "required": ["path"],
                    "properties": {"path": {"type": "string"}}})),
                "responses": {
                    "200": ok_json("Swapped in", json!({"type": "object", "properties": {"kb": kb}})),
                    "400": ok_json("Not a knowledge base, or not usable with the served generator", json!({"$ref": "#/components/schemas/Error"})),
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
