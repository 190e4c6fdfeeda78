//! Chat templates evaluated as Jinja: real-world templates (SmolLM2, Qwen2.5, Llama 2/3/3.1,
//! Mistral, Gemma, Phi-3, Zephyr, a `{% generation %}` training template) render exactly as HF
//! transformers' `apply_chat_template` (tests/fixtures/chat_templates.json, written by
//! make_chat_template_fixtures.py), and templates that fail to compile or render, or
//! `raise_exception`, are errors naming the file and key.

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use rustrag::generators::chat_template::{ChatMessage, ChatTemplate, TemplateTokens};
use rustrag::generators::gguf::GgufFile;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct TemplateSpec {
    template: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    messages: String,
    add_generation_prompt: bool,
    expected: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Fixture {
    templates: BTreeMap<String, TemplateSpec>,
    conversations: BTreeMap<String, Vec<ChatMessage>>,
    cases: Vec<Case>,
}

fn fixture() -> Result<Fixture> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn tokens(spec: &TemplateSpec) -> TemplateTokens {
    TemplateTokens {
        bos: spec.bos_token.clone(),
        eos: spec.eos_token.clone(),
        unk: spec.unk_token.clone(),
        pad: spec.pad_token.clone(),
    }
}

#[test]
fn real_world_templates_render_as_transformers() -> Result<()> {
    let fx = fixture()?;
    let mut compiled = BTreeMap::new();
    for (name, spec) in &fx.templates {
        let t = ChatTemplate::new(&spec.template, tokens(spec), format!("fixture `{name}`"))?;
        compiled.insert(name.as_str(), t);
    }
    let (mut rendered, mut raised) = (0, 0);
    for case in &fx.cases {
        let t = &compiled[case.template.as_str()];
        let messages = &fx.conversations[&case.messages];
        let what = format!(
            "{} / {} / add_generation_prompt={}",
            case.template, case.messages, case.add_generation_prompt
        );
        let got = t.format(messages, case.add_generation_prompt);
        match (&case.expected, &case.error) {
            (Some(expected), _) => {
                let got = got.with_context(|| what.clone())?;
                assert_eq!(&got, expected, "{what}");
                rendered += 1;
            }
            (None, Some(message)) => {
                let err = format!(
                    "{:#}",
                    got.err().with_context(|| format!("{what}: no error"))?
                );
                assert!(err.contains(message), "{what}: {err}");
                assert!(
                    err.contains(&format!("fixture `{}`", case.template)),
                    "{what}: {err}"
                );
                raised += 1;
            }
            (None, None) => panic!("{what}: a case with neither expected nor error"),
        }
    }
    // 12 templates x 6 conversations x 2; the strict ones (Mistral, Llama 2, Gemma) refuse some.
    assert_eq!(fx.cases.len(), 144);
    assert!(
        rendered > 100 && raised >= 10,
        "rendered {rendered}, raised {raised}"
    );
    Ok(())
}

/// The SmolLM2 prompt the RAG pipeline builds is byte-identical to the one before templates were
/// evaluated (the default system turn, then the user turn, then the opened assistant turn).
#[test]
fn smollm2_rag_prompt_is_unchanged() -> Result<()> {
    let fx = fixture()?;
    let spec = &fx.templates["smollm2"];
    let t = ChatTemplate::new(&spec.template, tokens(spec), "smollm2")?;
    let text = t.format(&[ChatMessage::new("user", "T / passage // q?")], true)?;
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nT / passage // q?<|im_end|>\n<|im_start|>assistant\n"
    );
    Ok(())
}

/// A GGUF file holding only tokenizer metadata and `template`.
fn write_gguf(path: &Path, template: &str) -> Result<()> {
    use gguf_file::Value as V;
    let tokens = V::Array(
        ["<unk>", "<s>", "</s>"]
            .iter()
            .map(|t| V::String(t.to_string()))
            .collect(),
    );
    let template = V::String(template.to_string());
    let (bos, eos) = (V::U32(1), V::U32(2));
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(
        &mut f,
        &[
            ("tokenizer.ggml.tokens", &tokens),
            ("tokenizer.ggml.bos_token_id", &bos),
            ("tokenizer.ggml.eos_token_id", &eos),
            ("tokenizer.chat_template", &template),
        ],
        &[],
    )?;
    Ok(())
}

const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

#[test]
fn gguf_template_uses_its_special_tokens_and_raise_exception_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("mistral.gguf");
    write_gguf(&path, MISTRAL)?;
    let g = GgufFile::open(&path)?;
    let t = ChatTemplate::from_gguf(&g)?;
    let text = t.format(
        &[
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello"),
            ChatMessage::new("user", "Bye"),
        ],
        true,
    )?;
    assert_eq!(text, "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]");
    let err = t
        .format(
            &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
            true,
        )
        .err()
        .context("roles out of order")?;
    let msg = format!("{err:#}");
    for part in [
        path.display().to_string().as_str(),
        "`tokenizer.chat_template`",
        "Conversation roles must alternate user/assistant/user/assistant/...",
        "(in chat_template:1)",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    Ok(())
}

fn tokenizer_config(dir: &Path, template: &str) -> Result<(serde_json::Value, PathBuf)> {
    let path = dir.join("tokenizer_config.json");
    let config = serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false},
        "eos_token": "</s>",
        "chat_template": template,
    });
    std::fs::write(&path, serde_json::to_string(&config)?)?;
    Ok((config, path))
}

#[test]
fn broken_templates_are_errors_naming_file_key_and_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Does not compile: an unclosed `{{` on line 2.
    let (config, path) = tokenizer_config(
        dir.path(),
        "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
    )?;
    let msg = format!(
        "{:#}",
        ChatTemplate::from_tokenizer_config(&config, &path)
            .err()
            .context("syntax error")?
    );
    for part in [
        path.display().to_string().as_str(),
        "`chat_template`",
        "syntax error",
        "(in chat_template:2)",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }

    // Compiles, fails when rendered: an attribute of an undefined value on line 3.
    let (config, path) = tokenizer_config(
        dir.path(),
        "{{ bos_token }}\n{% for m in messages %}\n{{ m.missing.deeper }}{% endfor %}",
    )?;
    let t = ChatTemplate::from_tokenizer_config(&config, &path)?.context("a template")?;
    assert_eq!(t.tokens().bos.as_deref(), Some("<s>"));
    let msg = format!(
        "{:#}",
        t.format(&[ChatMessage::new("user", "Hi")], true)
            .err()
            .context("render error")?
    );
    for part in [
        path.display().to_string().as_str(),
        "`chat_template`",
        "undefined",
        "(in chat_template:3)",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }

    // A GGUF whose template does not compile: an error naming the file and key.
    let gguf = dir.path().join("broken.gguf");
    write_gguf(&gguf, "{% if messages %}never closed")?;
    let msg = format!(
        "{:#}",
        ChatTemplate::from_gguf(&GgufFile::open(&gguf)?)
            .err()
            .context("unclosed block")?
    );
    assert!(
        msg.contains(&gguf.display().to_string())
            && msg.contains("`tokenizer.chat_template`")
            && msg.contains("syntax error"),
        "{msg}"
    );

    // No template at all is no chat template, not an error.
    let path = dir.path().join("plain.json");
    let config = serde_json::json!({"eos_token": "</s>"});
    assert!(ChatTemplate::from_tokenizer_config(&config, &path)?.is_none());
    Ok(())
}

/// `strftime_now` (Llama 3.2's templates date their system turn with it) gives today's date.
#[test]
fn strftime_now_is_defined() -> Result<()> {
    let t = ChatTemplate::new(
        "{% if strftime_now is defined %}{{ strftime_now('%Y') }}{% endif %}",
        TemplateTokens::default(),
        "test",
    )?;
    let year = t.format(&[], false)?;
    assert!(
        year.len() == 4 && year.starts_with("20"),
        "strftime_now('%Y') = {year:?}"
    );
    Ok(())
}

/// A template that would run for hours is stopped (minijinja's fuel) with an error, not a hang.
#[test]
fn runaway_template_is_an_error() -> Result<()> {
    let t = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        TemplateTokens::default(),
        "runaway.gguf: `tokenizer.chat_template`",
    )?;
    let start = std::time::Instant::now();
    let msg = format!("{:#}", t.format(&[], true).err().context("out of fuel")?);
    assert!(
        msg.contains("runaway.gguf") && msg.contains("fuel"),
        "{msg}"
    );
    assert!(start.elapsed().as_secs() < 30);
    Ok(())
}

#[test]
fn strftime_matches_python() {
    use rustrag::generators::chat_template::strftime;
    // datetime(2024, 7, 26, 15, 4, 5, tzinfo=timezone.utc).timestamp() == 1722006245
    let t = 1_722_006_245;
    assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
    assert_eq!(
        strftime("%A %B %e %y %H:%M:%S %I%p %j %% %Q", t),
        "Friday July 26 24 15:04:05 03PM 208 % %Q"
    );
    assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
    assert_eq!(strftime("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
}

/// Values print as Jinja2 prints them (Python's `str`), numbers in `tojson` as `json.dumps`.
#[test]
fn values_print_as_python() -> Result<()> {
    let t = ChatTemplate::new(
        "{{ true }} {{ none }} {{ [1, 'a', \"it's\"] }} {{ {'k': false} }} {{ undefined_name }}.\
         {{ 1.0 }} {{ 2.5 }} {{ 0.0001 }} {{ [1e-7, 1.5e16, 1e15] | tojson }} {{ 42 }}",
        TemplateTokens::default(),
        "test",
    )?;
    assert_eq!(
        t.format(&[], false)?,
        "True None [1, 'a', \"it's\"] {'k': False} .1.0 2.5 0.0001 [1e-07, 1.5e+16, 1000000000000000.0] 42"
    );
    Ok(())
}

/// Found by the `gguf` fuzz target in 13 s: a template containing `{%}` (the tag's `%}` overlapping
/// its `{%`) panicked while the `{% generation %}` tags were rewritten. Every such source is now a
/// syntax error naming the origin, or renders.
#[test]
fn overlapping_or_unclosed_tags_are_errors_not_panics() {
    for source in [
        "{%}",
        "a{%}b",
        "{%-}",
        "{%+}{% generation %}",
        "{%",
        "%}{%}%}",
        "{%%}",
    ] {
        let r = std::panic::catch_unwind(|| {
            ChatTemplate::new(
                source,
                TemplateTokens::default(),
                "fuzz.gguf: `tokenizer.chat_template`",
            )
            .and_then(|t| t.format(&[ChatMessage::new("user", "hi")], true))
        });
        match r {
            Err(_) => panic!("{source:?} panicked"),
            Ok(Err(e)) => assert!(format!("{e:#}").contains("fuzz.gguf"), "{source:?}: {e:#}"),
            Ok(Ok(_)) => {}
        }
    }
}
