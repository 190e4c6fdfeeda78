//! Splitting documents into fixed-size word passages, as HF's `use_own_knowledge_dataset.py`
//! (`split_text`: chunks of `n` space-separated words, title kept on every chunk).

use super::ingest::Document;
use super::Passage;

/// Split `doc` into passages of at most `words_per_passage` words (0 = keep whole). Whitespace runs
/// (including newlines) count as one separator. Ids are stable: the document id when the document is
/// one passage, else `<doc id>#<chunk index>`.
pub fn split_document(doc: &Document, words_per_passage: usize) -> Vec<Passage> {
    let words: Vec<&str> = doc.text.split_whitespace().collect();
    let title = doc.title.trim().to_string();
    if words_per_passage == 0 || words.len() <= words_per_passage {
        return vec![Passage {
            id: doc.id.clone(),
            title,
            text: words.join(" "),
        }];
    }
    words
        .chunks(words_per_passage)
        .enumerate()
        .map(|(i, chunk)| Passage {
            id: format!("{}#{i}", doc.id),
            title: title.clone(),
            text: chunk.join(" "),
        })
        .collect()
}

/// The document id a passage id came from (inverse of the `#<chunk>` suffix).
pub fn document_id(passage_id: &str) -> &str {
    match passage_id.rsplit_once('#') {
        Some((doc, chunk)) if !chunk.is_empty() && chunk.bytes().all(|b| b.is_ascii_digit()) => doc,
        _ => passage_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Document {
        Document {
            id: "d".into(),
            title: "T".into(),
            text: text.into(),
            origin: "x:1".into(),
        }
    }

    #[test]
    fn splits_into_word_chunks_with_stable_ids() {
        let p = split_document(&doc("a b c\nd  e"), 2);
        let ids: Vec<_> = p.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["d#0", "d#1", "d#2"]);
        assert_eq!(p[1].text, "c d");
        assert_eq!(p[2].text, "e");
        assert!(p.iter().all(|p| p.title == "T"));
        assert_eq!(split_document(&doc("a b"), 2)[0].id, "d");
        assert_eq!(split_document(&doc("a b c"), 0).len(), 1);
        assert_eq!(document_id("d#12"), "d");
        assert_eq!(document_id("a#b"), "a#b");
    }
}
