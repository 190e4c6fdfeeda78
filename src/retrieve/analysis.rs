//! Text analysis for BM25, configurable, defaulting to Anserini's `DefaultEnglishAnalyzer`: Lucene
//! `StandardTokenizer` word rules (Unicode UAX #29 word boundaries, tokens that contain a letter or
//! digit, at most 255 chars), English possessive removal, lowercasing, Lucene's English stopwords and
//! the Porter stemmer. The same [`Analyzer`] runs at index time (as a tantivy tokenizer) and at query time.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use tantivy::tokenizer::{Token, TokenStream, Tokenizer};
use unicode_segmentation::UnicodeSegmentation;

use super::porter::porter_stem;

/// Lucene's `EnglishAnalyzer.ENGLISH_STOP_WORDS_SET` (the stopwords Anserini removes by default).
pub const LUCENE_ENGLISH_STOPWORDS: [&str; 33] = [
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
];

/// Lucene `StandardTokenizer`'s default maximum token length; longer words are split at this length.
const MAX_TOKEN_CHARS: usize = 255;

/// Which stemmer runs last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StemmerKind {
    /// Porter (1980) as Lucene's `PorterStemFilter` (Anserini's default).
    Porter,
    /// Snowball English ("Porter2").
    Snowball,
    /// No stemming.
    None,
}

/// How text becomes terms. Stored in the BM25 index manifest so that queries are analysed the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalyzerConfig {
    pub lowercase: bool,
    /// Drop Lucene's 33 English stopwords.
    pub stopwords: bool,
    /// Strip English possessives (`John's` → `John`).
    pub possessives: bool,
    pub stemmer: StemmerKind,
}

impl Default for AnalyzerConfig {
    /// Anserini's default English analysis.
    fn default() -> Self {
        Self {
            lowercase: true,
            stopwords: true,
            possessives: true,
            stemmer: StemmerKind::Porter,
        }
    }
}

/// A configured analyzer; cheap to clone.
#[derive(Clone)]
pub struct Analyzer {
    config: AnalyzerConfig,
    snowball: Option<frostem::Stemmer>,
}

impl std::fmt::Debug for Analyzer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analyzer")
            .field("config", &self.config)
            .finish()
    }
}

impl Analyzer {
    pub fn new(config: AnalyzerConfig) -> Self {
        let snowball = (config.stemmer == StemmerKind::Snowball)
            .then(|| frostem::Stemmer::new(frostem::Algorithm::English));
        Self { config, snowball }
    }

    pub fn config(&self) -> &AnalyzerConfig {
        &self.config
    }

    /// The terms of `text`, in order (stopwords removed, so positions are not contiguous).
    pub fn terms(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.analyze(text, |term, _, _| out.push(term));
        out
    }

    /// Call `sink(term, byte_from, byte_to)` for every term of `text`.
    pub fn analyze(&self, text: &str, mut sink: impl FnMut(String, usize, usize)) {
        for (offset, word) in text.unicode_word_indices() {
            for (from, piece) in split_long(word) {
                if let Some(term) = self.normalize(piece) {
                    sink(term, offset + from, offset + from + piece.len());
                }
            }
        }
    }

    /// Possessive, lowercase, stopword and stemming filters on one token; `None` if it is dropped.
    fn normalize(&self, word: &str) -> Option<String> {
        let word = if self.config.possessives {
            strip_possessive(word)
        } else {
            word
        };
        let word: Cow<str> = if self.config.lowercase {
            Cow::Owned(word.to_lowercase())
        } else {
            Cow::Borrowed(word)
        };
        if word.is_empty()
            || (self.config.stopwords && LUCENE_ENGLISH_STOPWORDS.contains(&word.as_ref()))
        {
            return None;
        }
        Some(match self.config.stemmer {
            StemmerKind::Porter => porter_stem(&word),
            StemmerKind::Snowball => match &self.snowball {
                Some(s) => s.stem(&word).into_owned(),
                None => word.into_owned(),
            },
            StemmerKind::None => word.into_owned(),
        })
    }
}

/// Lucene `EnglishPossessiveFilter`: a trailing `'s` (ASCII, U+2019 or U+FF07 apostrophe) is removed.
fn strip_possessive(word: &str) -> &str {
    let mut chars = word.char_indices().rev();
    match (chars.next(), chars.next()) {
        (Some((_, 's' | 'S')), Some((i, '\'' | '\u{2019}' | '\u{FF07}'))) => &word[..i],
        _ => word,
    }
}

/// Split a word into pieces of at most [`MAX_TOKEN_CHARS`] chars, as Lucene's tokenizer does.
fn split_long(word: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut rest = (0usize, word);
    std::iter::from_fn(move || {
        let (from, s) = rest;
        if s.is_empty() {
            return None;
        }
        let cut = s
            .char_indices()
            .nth(MAX_TOKEN_CHARS)
            .map_or(s.len(), |(i, _)| i);
        rest = (from + cut, &s[cut..]);
        Some((from, &s[..cut]))
    })
}

/// The analyzer as a tantivy tokenizer (registered under the index's tokenizer name).
impl Tokenizer for Analyzer {
    type TokenStream<'a> = AnalyzedTokens;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> AnalyzedTokens {
        let mut tokens = Vec::new();
        self.analyze(text, |term, from, to| {
            tokens.push(Token {
                offset_from: from,
                offset_to: to,
                position: tokens.len(),
                text: term,
                position_length: 1,
            })
        });
        AnalyzedTokens { tokens, next: 0 }
    }
}

/// Tokens of one text, already analysed.
pub struct AnalyzedTokens {
    tokens: Vec<Token>,
    next: usize,
}

impl TokenStream for AnalyzedTokens {
    fn advance(&mut self) -> bool {
        self.next += 1;
        self.next <= self.tokens.len()
    }

    fn token(&self) -> &Token {
        &self.tokens[self.next - 1]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.next - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anserini_default_analysis() {
        let a = Analyzer::new(AnalyzerConfig::default());
        assert_eq!(
            a.terms("The 1,000 genomes project: it's John's data-sets, e.g. 3.5 mg/kg!"),
            ["1,000", "genom", "project", "john", "data", "set", "e.g", "3.5", "mg", "kg"]
        );
        assert_eq!(
            a.terms("Immunological  IMMUNOLOGY"),
            ["immunolog", "immunolog"]
        );
        assert!(a.terms("the and of, ... !!").is_empty());
    }

    #[test]
    fn configurable() {
        let plain = Analyzer::new(AnalyzerConfig {
            lowercase: false,
            stopwords: false,
            possessives: false,
            stemmer: StemmerKind::None,
        });
        assert_eq!(plain.terms("The Running dogs"), ["The", "Running", "dogs"]);
        let snowball = Analyzer::new(AnalyzerConfig {
            stemmer: StemmerKind::Snowball,
            ..Default::default()
        });
        assert_eq!(snowball.terms("generously running"), ["generous", "run"]);
    }

    #[test]
    fn long_tokens_are_split() {
        let a = Analyzer::new(AnalyzerConfig {
            stemmer: StemmerKind::None,
            ..Default::default()
        });
        let long = "x".repeat(600);
        let terms = a.terms(&long);
        assert_eq!(
            terms.iter().map(|t| t.len()).collect::<Vec<_>>(),
            [255, 255, 90]
        );
    }
}
