"""The official `openai` client against rustrag's /v1/chat/completions, streaming and not.

Usage: python openai_client.py http://127.0.0.1:PORT/v1 "question"
Prints one JSON line: the content both ways and the sources (an extra field).
"""
import json
import sys

import openai

base_url, question = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
messages = [{"role": "user", "content": question}]

full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
assert full.object == "chat.completion", full
choice = full.choices[0]
assert choice.message.role == "assistant"
assert choice.finish_reason in ("stop", "length"), choice.finish_reason
assert full.usage.completion_tokens > 0, full.usage
sources = full.model_extra["sources"]

chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, stream=True))
assert all(c.object == "chat.completion.chunk" for c in chunks)
assert chunks[0].choices[0].delta.role == "assistant"
streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
assert chunks[-1].choices[0].finish_reason == choice.finish_reason, chunks[-1]
provenance = [c.model_extra.get("provenance") for c in chunks if c.model_extra.get("provenance")]
assert provenance and all(len(p["doc_posterior"]) == len(sources) for p in provenance)

# Sampling (temperature 0.7, seeded): the same seed gives the same answer, streamed or not, and
# each streamed token still carries its posterior over the sources.
sampled = [client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0.7,
                                          seed=1234) for _ in range(2)]
assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content, sampled
s_chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0.7,
                                               seed=1234, stream=True))
assert "".join(c.choices[0].delta.content or "" for c in s_chunks) == sampled[0].choices[0].message.content
s_prov = [c.model_extra.get("provenance") for c in s_chunks if c.model_extra.get("provenance")]
assert s_prov and all(abs(sum(p["doc_posterior"]) - 1) < 1e-4 for p in s_prov), s_prov

# Out of range: the client sees a 400 naming the field.
for bad, field in [({"temperature": 2.5}, "temperature"), ({"temperature": 0.7, "top_p": 1.5}, "top_p")]:
    try:
        client.chat.completions.create(model="smollm2", messages=messages, **bad)
        raise SystemExit(f"{bad} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == field, e.body

# A stop string ends the answer before it.
words = choice.message.content.split()
if len(words) > 1:
    stopped = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, stop=[words[1]])
    assert words[1] not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"
    s_chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, stop=[words[1]], stream=True))
    s_text = "".join(c.choices[0].delta.content or "" for c in s_chunks)
    assert s_text == stopped.choices[0].message.content, (s_text, stopped.choices[0].message.content)

print(json.dumps({"content": choice.message.content, "streamed_content": streamed, "sources": sources,
                  "sampled": sampled[0].choices[0].message.content,
                  "finish_reason": choice.finish_reason, "chunks": len(chunks)}))
