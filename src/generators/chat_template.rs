//! Chat templates: the Jinja text a chat model ships (`tokenizer.chat_template` in a GGUF file,
//! `chat_template` in a HF `tokenizer_config.json`), evaluated with a Jinja engine (minijinja).
//!
//! A chat model only answers well inside the exact text format it was tuned on, and that format
//! is defined by the template, not by its family: templates insert default system prompts, trim
//! content, fold system messages into the first user turn, or refuse role orders with
//! `raise_exception`. Recognising a few shapes by pattern and re-implementing them by hand drifts
//! from the model's format, so the template is executed, in an environment set up as HF
//! transformers' `_compile_jinja_template` sets up its own (the reference behaviour):
//! `trim_blocks` and `lstrip_blocks`, loop controls (`break`/`continue`), `raise_exception`,
//! `strftime_now`, a `tojson` that writes what Python's `json.dumps` writes (not HTML-escaped),
//! Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...) and Python's way of
//! printing values (`True`, `None`, `['a', 1]`). The variables are those `apply_chat_template`
//! passes: `messages` (`role`/`content` maps), `add_generation_prompt`, `tools` and `documents`
//! (both none), and the special tokens the model has (`bos_token`, `eos_token`, `unk_token`,
//! `pad_token`).
//!
//! tests/chat_template.rs renders real-world templates (SmolLM2, Qwen2.5, Llama 2/3/3.1, Mistral,
//! Gemma, Phi-3, Zephyr) and compares them with transformers' output
//! (tests/fixtures/make_chat_template_fixtures.py).
//!
//! transformers' `{% generation %}` tag (training templates) renders its body.
//!
//! Known differences from Jinja2 that HF templates do not rely on: values joined with `~` or the
//! `string` filter print minijinja's way (`true`, not `True`); `strftime_now` uses UTC.

use super::gguf::GgufFile;
use anyhow::{anyhow, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

/// The name the template has inside its environment (minijinja's errors say `(in chat_template:LINE)`).
const NAME: &str = "chat_template";

/// The instructions one rendering may execute before it fails (minijinja's fuel), so that a
/// hostile or broken template (`{% for i in range(99999) %}{% for j in range(99999) %}`) is an
/// error, not a hang.
const FUEL: u64 = 20_000_000;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// The special tokens a template sees (as `bos_token`, `eos_token`, `unk_token`, `pad_token`);
/// one the model does not have is not passed, as transformers passes only those set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TemplateTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
}

impl TemplateTokens {
    /// The tokens of a HF `tokenizer_config.json` (`"bos_token": "<s>"` or `{"content": "<s>", ...}`).
    pub fn from_tokenizer_config(config: &serde_json::Value) -> Self {
        let token = |key: &str| -> Option<String> {
            let v = config.get(key)?;
            v.as_str()
                .or_else(|| v.get("content")?.as_str())
                .map(str::to_string)
        };
        Self {
            bos: token("bos_token"),
            eos: token("eos_token"),
            unk: token("unk_token"),
            pad: token("pad_token"),
        }
    }
}

/// A compiled chat template: formats [`ChatMessage`]s as the model was tuned to see them.
#[derive(Clone)]
pub struct ChatTemplate {
    source: Arc<str>,
    tokens: TemplateTokens,
    /// Where the template comes from (`FILE: \`KEY\``), the prefix of every error.
    origin: String,
    env: Arc<Environment<'static>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("tokens", &self.tokens)
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `source`; `origin` names where it was read (e.g. ``model.gguf: `tokenizer.chat_template` ``)
    /// and prefixes every error, compile-time (here) or render-time ([`Self::format`]).
    pub fn new(source: &str, tokens: TemplateTokens, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        let mut env = environment();
        env.add_template_owned(NAME, without_generation_tags(source))
            .map_err(|e| jinja_error(&origin, e))?;
        Ok(Self {
            source: source.into(),
            tokens,
            origin,
            env: Arc::new(env),
        })
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), with the special tokens its
    /// `tokenizer.ggml.*_token_id` keys name. A file without the key is an error too (see
    /// [`GgufFile::has`] to tell).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        const KEY: &str = "tokenizer.chat_template";
        let source = g.str(KEY)?;
        let tokens = g.strings("tokenizer.ggml.tokens")?;
        let name = |key: &str| -> Option<String> {
            let id = g.u32(key).ok()?;
            tokens.get(id as usize).cloned()
        };
        let tokens = TemplateTokens {
            bos: name("tokenizer.ggml.bos_token_id"),
            eos: name("tokenizer.ggml.eos_token_id"),
            unk: name("tokenizer.ggml.unknown_token_id"),
            pad: name("tokenizer.ggml.padding_token_id"),
        };
        Self::new(source, tokens, format!("{}: `{KEY}`", g.path.display()))
    }

    /// The `chat_template` of a HF `tokenizer_config.json` (parsed as `config`, read from `path`),
    /// with its special tokens; `None` when it has none. A template given as a list of named
    /// templates (`[{"name": "default", "template": ...}, ...]`) uses the one named `default`.
    pub fn from_tokenizer_config(config: &serde_json::Value, path: &Path) -> Result<Option<Self>> {
        let origin = format!("{}: `chat_template`", path.display());
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .ok_or_else(|| anyhow!("{origin}: a list of templates without a `default` one"))?,
            Some(other) => return Err(anyhow!("{origin}: should be a string, found {other}")),
        };
        Self::new(
            source,
            TemplateTokens::from_tokenizer_config(config),
            origin,
        )
        .map(Some)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn tokens(&self) -> &TemplateTokens {
        &self.tokens
    }

    /// Format `messages` as the model was trained to see them; `add_generation_prompt` opens the
    /// assistant turn. Encode the result without adding special tokens (they are in the text).
    /// A template that fails (including by `raise_exception`) is an error naming its origin.
    pub fn format(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut ctx: BTreeMap<&'static str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(Serde(messages)));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        let t = &self.tokens;
        for (key, token) in [
            ("bos_token", &t.bos),
            ("eos_token", &t.eos),
            ("unk_token", &t.unk),
            ("pad_token", &t.pad),
        ] {
            if let Some(token) = token {
                ctx.insert(key, Value::from(token.as_str()));
            }
        }
        self.env
            .get_template(NAME)
            .and_then(|t| t.render(Value::from_object(ctx)))
            .map_err(|e| jinja_error(&self.origin, e))
    }
}

/// `source` with transformers' `{% generation %}` / `{% endgeneration %}` tags (which mark the
/// assistant's tokens for training masks; rendering just renders the body) turned into
/// `{% if true %}` / `{% endif %}`, the same block with the same whitespace control, which
/// minijinja knows. Line numbers are kept.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            break;
        };
        let inner = &tag[2..end];
        let (open, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, close) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => "if true",
            "endgeneration" => "endif",
            _ => {
                out.push_str(&tag[..end + 2]);
                rest = &tag[end + 2..];
                continue;
            }
        };
        let _ = write!(out, "{{%{open} {replacement} {close}%}}");
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `ORIGIN: minijinja's message (in chat_template:LINE)`, with the failing expression's causes.
fn jinja_error(origin: &str, e: Error) -> anyhow::Error {
    let mut msg = format!("{origin}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let _ = write!(msg, ": {cause}");
        source = cause.source();
    }
    anyhow!(msg)
}

/// The environment HF's `_compile_jinja_template` builds, in minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters are valid"),
    );
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // A template is code from a model file: bound its work (far above what a real chat needs).
    env.set_fuel(Some(FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, _state, value| {
        let text = match value.kind() {
            ValueKind::String => {
                return out
                    .write_str(value.as_str().unwrap_or_default())
                    .map_err(Error::from)
            }
            ValueKind::Undefined => String::new(),
            _ => py_str(value),
        };
        out.write_str(&text).map_err(Error::from)
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// `raise_exception(message)`: the template refuses its input (e.g. roles out of order).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an exception: {message}"),
    ))
}

/// `strftime_now(format)`: the current time (UTC) formatted as Python's `strftime`.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, secs)
}

/// Python's `strftime` for the common directives (`%Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j
/// %%`) at `unix_secs` UTC; other directives are kept as written.
pub fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[month as usize - 1] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let month_name = MONTHS[month as usize - 1];
        let _ = match d {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:2}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{:02}", (hour + 11) % 12 + 1),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => out.write_str(if hour < 12 { "AM" } else { "PM" }),
            'b' => out.write_str(&month_name[..3]),
            'B' => out.write_str(month_name),
            'a' => out.write_str(&DAYS[weekday][..3]),
            'A' => out.write_str(DAYS[weekday]),
            'j' => write!(out, "{yday:03}"),
            '%' => out.write_str("%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// `tojson(indent=None, separators=None, sort_keys=False, ensure_ascii=False)`: Python's
/// `json.dumps` with those arguments, as transformers' override of Jinja's `tojson` (which would
/// HTML-escape and write no spaces after separators).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match (v.as_i64(), v.as_str()) {
            (Some(n), _) => " ".repeat(n.max(0) as usize),
            (None, Some(s)) => s.to_string(),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        }),
    };
    let (item_sep, key_sep) = match separators.filter(|v| !v.is_none()) {
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    )
                })?;
            (parts[0].clone(), parts[1].clone())
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOptions {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOptions {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn not_serializable(value: &Value) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "tojson: a value of type {} is not JSON serializable",
            value.kind()
        ),
    )
}

fn write_json(value: &Value, o: &JsonOptions, depth: usize, out: &mut String) -> Result<(), Error> {
    // Between items: the separator, then a newline and the indent when indenting.
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&py_number(value)),
        ValueKind::String => json_string(value.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_json(item, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::Number => py_number(&key),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
                    ValueKind::None => "null".to_string(),
                    _ => return Err(not_serializable(&key)),
                };
                entries.push((key, item));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                json_string(key, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                write_json(item, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// A JSON string as Python's `json.dumps` escapes it.
fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A number as Python prints it (`repr` of an int or a float: `1.0`, `1e-07`, `1e+16`).
fn py_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let Ok(x) = f64::try_from(value.clone()) else {
        return value.to_string();
    };
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Shortest round-trip digits; Python switches to exponent form outside 1e-4 <= |x| < 1e16.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if x == 0.0 || (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// How Jinja2 prints a value (Python's `str`): `True`, `None`, `1.0`, `['a', 1]`, `{'k': 'v'}`.
fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        _ => {
            let mut out = String::new();
            py_repr(value, &mut out);
            out
        }
    }
}

fn py_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&py_number(value)),
        ValueKind::String => py_string_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out);
                out.push_str(": ");
                py_repr(&value.get_item(&key).unwrap_or_default(), out);
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Python's `repr` of a string: single quotes unless it holds `'` and no `"`.
fn py_string_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}
