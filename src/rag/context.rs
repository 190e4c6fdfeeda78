//! Context strings as HF's `RagRetriever.postprocess_docs` builds them, and their generator tokenization.

use crate::retrieve::Passage;
use crate::tokenize::{Encoded, Padding, TextTokenizer};
use anyhow::Result;

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
