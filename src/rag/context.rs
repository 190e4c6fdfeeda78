//! How a (document, question) pair becomes generator input — the only per-family difference of the
//! RAG head: HF's `RagRetriever.postprocess_docs` strings for seq2seq generators ([`ContextFormat`]),
//! a prompt for decoder-only ones ([`PromptFormat`], the model's chat template when it has one).

use crate::generators::gguf::{ChatMessage, ChatTemplate};
use crate::retrieve::Passage;
use crate::tokenize::{Encoded, Padding, TextTokenizer};
use anyhow::{bail, Result};

/// Separators and prefix of the context strings (RagConfig `title_sep`, `doc_sep`, generator `prefix`).
#[derive(Clone, Debug)]
pub struct ContextFormat {
    pub prefix: Option<String>,
    pub title_sep: String,
    pub doc_sep: String,
    /// Generator input length: truncate and pad every context row to this many tokens.
    pub max_combined_length: usize,
}

impl ContextFormat {
    /// `prefix + title (surrounding quotes removed) + title_sep + text + doc_sep + question`, with double
    /// spaces collapsed once (Python `str.replace("  ", " ")`).
    pub fn context_string(&self, passage: &Passage, question: &str) -> String {
        let title = passage.title.strip_prefix('"').unwrap_or(&passage.title);
        let title = title.strip_suffix('"').unwrap_or(title);
        let prefix = self.prefix.as_deref().unwrap_or("");
        format!(
            "{prefix}{title}{}{}{}{question}",
            self.title_sep, passage.text, self.doc_sep
        )
        .replace("  ", " ")
    }

    /// Context strings of `[question][doc]` rows: `docs[i]` are the passages retrieved for `questions[i]`.
    pub fn context_strings(&self, questions: &[String], docs: &[Vec<Passage>]) -> Vec<String> {
        questions
            .iter()
            .zip(docs)
            .flat_map(|(q, ps)| ps.iter().map(move |p| self.context_string(p, q)))
            .collect()
    }

    /// Generator tokenization: truncation and padding to exactly `max_combined_length` tokens
    /// (`padding="max_length", truncation=True`). Rows: `[batch*n_docs][max_combined_length]`.
    pub fn tokenize(
        &self,
        generator_tokenizer: &TextTokenizer,
        strings: &[String],
    ) -> Result<Encoded> {
        let texts: Vec<&str> = strings.iter().map(|s| s.as_str()).collect();
        generator_tokenizer.encode_batch(
            &texts,
            true,
            Some(self.max_combined_length),
            Padding::Fixed(self.max_combined_length),
        )
    }
}

/// The prompt text of one document for a decoder-only generator: `"{title} / {text} // {question}"`
/// (raw strings, no clean-up).
pub fn prompt_text(title: &str, text: &str, question: &str) -> String {
    format!("{title} / {text} // {question}")
}

/// Decoder-only prompts: `[bos] + enc(prompt_text)` or, for a chat model, one user turn with
/// `prompt_text` formatted by its chat template and ending with the opened assistant turn (the
/// template supplies its own special tokens).
#[derive(Clone, Debug)]
pub struct PromptFormat {
    /// The generator's chat template (its Jinja source is written back when the generator is saved).
    pub chat_template: Option<ChatTemplate>,
    /// Prepended to plain (non-chat) prompts.
    pub bos: Option<u32>,
    /// Fills the right of shorter rows (masked out).
    pub pad: u32,
    /// Longest prompt in tokens: the context window minus the room kept for the answer. A longer
    /// prompt keeps its question and template and has the passage text cut at the end (reported
    /// as a [`Truncation`]).
    pub max_prompt_tokens: usize,
}

/// A prompt whose passage was cut to fit the context window.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Truncation {
    /// Row in the `[question][doc]` order: question `row / n_docs`, document `row % n_docs`.
    pub row: usize,
    pub prompt_tokens_before: usize,
    pub prompt_tokens_after: usize,
    /// Passage words kept of the passage's total.
    pub passage_words_kept: usize,
    pub passage_words: usize,
}

/// Generator input rows of a batch: `[batch * n_docs]` strings and their ids.
#[derive(Clone, Debug)]
pub struct ContextRows {
    pub strings: Vec<String>,
    pub encoded: Encoded,
    pub truncated: Vec<Truncation>,
}

/// Either family's input format.
#[derive(Clone, Debug)]
pub enum InputFormat {
    Seq2Seq(ContextFormat),
    Prompt(PromptFormat),
}

impl InputFormat {
    /// The seq2seq context format, when it is one.
    pub fn context_format(&self) -> Option<&ContextFormat> {
        match self {
            Self::Seq2Seq(f) => Some(f),
            Self::Prompt(_) => None,
        }
    }

    /// Rows `[question][doc]`: `docs[i]` are the passages retrieved for `questions[i]`.
    pub fn rows(
        &self,
        tokenizer: &TextTokenizer,
        questions: &[String],
        docs: &[Vec<Passage>],
    ) -> Result<ContextRows> {
        match self {
            Self::Seq2Seq(f) => {
                let strings = f.context_strings(questions, docs);
                let encoded = f.tokenize(tokenizer, &strings)?;
                Ok(ContextRows {
                    strings,
                    encoded,
                    truncated: Vec::new(),
                })
            }
            Self::Prompt(f) => f.rows(tokenizer, questions, docs),
        }
    }

    /// Closed-book rows, one per question: the question alone (seq2seq: the generator prefix and
    /// the question; decoder-only: the question as the user turn, or BOS + question).
    pub fn question_rows(
        &self,
        tokenizer: &TextTokenizer,
        questions: &[String],
    ) -> Result<ContextRows> {
        if questions.iter().any(|q| q.trim().is_empty()) {
            bail!("empty question");
        }
        match self {
            Self::Seq2Seq(f) => {
                let prefix = f.prefix.as_deref().unwrap_or("");
                let strings: Vec<String> =
                    questions.iter().map(|q| format!("{prefix}{q}")).collect();
                let encoded = f.tokenize(tokenizer, &strings)?;
                Ok(ContextRows {
                    strings,
                    encoded,
                    truncated: Vec::new(),
                })
            }
            Self::Prompt(f) => {
                let mut strings = Vec::with_capacity(questions.len());
                let mut rows = Vec::with_capacity(questions.len());
                for q in questions {
                    let text = f.user_turn(q)?;
                    let ids = f.ids(tokenizer, &text)?;
                    if ids.len() > f.max_prompt_tokens {
                        let head: String = q.chars().take(60).collect();
                        bail!(
                            "question {head:?}… makes a {}-token prompt; the context window leaves {} tokens for prompts",
                            ids.len(),
                            f.max_prompt_tokens
                        );
                    }
                    strings.push(text);
                    rows.push(ids);
                }
                Ok(ContextRows {
                    strings,
                    encoded: f.right_padded(&rows),
                    truncated: Vec::new(),
                })
            }
        }
    }
}

impl PromptFormat {
    fn text(&self, passage: &Passage, question: &str) -> Result<String> {
        self.user_turn(&prompt_text(&passage.title, &passage.text, question))
    }

    /// `user` as the one user turn of the chat template (ending with the opened assistant turn),
    /// or as is for a plain model.
    fn user_turn(&self, user: &str) -> Result<String> {
        match &self.chat_template {
            Some(t) => t.format(&[ChatMessage::new("user", user)], true),
            None => Ok(user.to_string()),
        }
    }

    /// Token ids of one prompt (BOS first when there is no chat template).
    pub fn ids(&self, tokenizer: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
        let mut e = tokenizer.encode_batch(&[text], false, None, Padding::None)?;
        let mut ids = Vec::with_capacity(e.input_ids[0].len() + 1);
        if self.chat_template.is_none() {
            ids.extend(self.bos);
        }
        ids.append(&mut e.input_ids[0]);
        Ok(ids)
    }

    /// Prompt rows, right-padded with `pad` (mask 0); passages cut to fit `max_prompt_tokens`.
    pub fn rows(
        &self,
        tokenizer: &TextTokenizer,
        questions: &[String],
        docs: &[Vec<Passage>],
    ) -> Result<ContextRows> {
        let mut strings = Vec::new();
        let mut rows = Vec::new();
        let mut truncated = Vec::new();
        for (q, ps) in questions.iter().zip(docs) {
            if q.trim().is_empty() {
                bail!("empty question");
            }
            for p in ps {
                let row = rows.len();
                let mut text = self.text(p, q)?;
                let mut ids = self.ids(tokenizer, &text)?;
                let before = ids.len();
                if before > self.max_prompt_tokens {
                    let words: Vec<&str> = p.text.split_whitespace().collect();
                    // Cut words in proportion to the overshoot, then one by one until it fits.
                    let over = before - self.max_prompt_tokens;
                    let mut keep = words.len().saturating_sub(over);
                    loop {
                        let cut = Passage {
                            text: words[..keep].join(" "),
                            ..p.clone()
                        };
                        text = self.text(&cut, q)?;
                        ids = self.ids(tokenizer, &text)?;
                        if ids.len() <= self.max_prompt_tokens {
                            break;
                        }
                        if keep == 0 {
                            let head: String = q.chars().take(60).collect();
                            bail!(
                                "question {head:?}… ({} characters) alone makes a {}-token prompt; the context window leaves {} tokens for prompts",
                                q.chars().count(), ids.len(), self.max_prompt_tokens
                            );
                        }
                        keep = keep.saturating_sub((ids.len() - self.max_prompt_tokens).max(1));
                    }
                    tracing::warn!(
                        "passage {} cut from {} to {keep} words: its prompt had {before} tokens, the context window leaves {}",
                        p.id, words.len(), self.max_prompt_tokens
                    );
                    truncated.push(Truncation {
                        row,
                        prompt_tokens_before: before,
                        prompt_tokens_after: ids.len(),
                        passage_words_kept: keep,
                        passage_words: words.len(),
                    });
                }
                strings.push(text);
                rows.push(ids);
            }
        }
        Ok(ContextRows {
            strings,
            encoded: self.right_padded(&rows),
            truncated,
        })
    }

    /// Rows right-padded with `pad` to the longest (mask 0 on the padding).
    fn right_padded(&self, rows: &[Vec<u32>]) -> Encoded {
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let pad = |r: &Vec<u32>, fill: u32, v: Option<u32>| -> Vec<u32> {
            let mut out: Vec<u32> = match v {
                Some(v) => vec![v; r.len()],
                None => r.clone(),
            };
            out.resize(len, fill);
            out
        };
        Encoded {
            input_ids: rows.iter().map(|r| pad(r, self.pad, None)).collect(),
            attention_mask: rows.iter().map(|r| pad(r, 0, Some(1))).collect(),
            type_ids: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_string_strips_title_quotes_and_collapses_spaces() {
        let f = ContextFormat {
            prefix: Some("context: ".into()),
            title_sep: " / ".into(),
            doc_sep: " // ".into(),
            max_combined_length: 8,
        };
        let p = Passage {
            id: "a".into(),
            title: "\"Quoted\"".into(),
            text: "two  spaces   three".into(),
        };
        assert_eq!(
            f.context_string(&p, "q?"),
            "context: Quoted / two spaces  three // q?"
        );
    }
}
