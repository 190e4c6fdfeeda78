//! SQuAD v1.1 exact match and token F1, as the official `evaluate-v1.1.py`: answers are normalised by
//! lowercasing, removing ASCII punctuation, removing the articles `a`/`an`/`the` (as whole words) and
//! collapsing whitespace; a prediction scores the max over the reference answers.

use std::collections::HashMap;

/// `normalize_answer` of the official script.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    // `re.sub(r'\b(a|an|the)\b', ' ', text)`: an article matches only as a whole run of word characters.
    let mut no_articles = String::with_capacity(no_punc.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punc.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut no_articles);
            no_articles.push(c);
        }
    }
    flush(&mut word, &mut no_articles);
    no_articles.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// 1.0 if the normalised strings are equal.
pub fn exact_match(prediction: &str, truth: &str) -> f64 {
    f64::from(u8::from(
        normalize_answer(prediction) == normalize_answer(truth),
    ))
}

/// Token-level F1 between the normalised prediction and reference.
pub fn f1_score(prediction: &str, truth: &str) -> f64 {
    let p = normalize_answer(prediction);
    let t = normalize_answer(truth);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let tt: Vec<&str> = t.split_whitespace().collect();
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for w in &tt {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0i64;
    for w in &pt {
        if let Some(c) = counts.get_mut(w) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pt.len() as f64;
    let recall = same as f64 / tt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// `metric_max_over_ground_truths`: the best score against any reference (0 when there is none).
pub fn max_over_answers(
    metric: fn(&str, &str) -> f64,
    prediction: &str,
    answers: &[String],
) -> f64 {
    answers
        .iter()
        .map(|a| metric(prediction, a))
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_normalisation() {
        assert_eq!(normalize_answer("The  Denver Broncos!"), "denver broncos");
        assert_eq!(normalize_answer("an apple, a day"), "apple day");
        assert_eq!(normalize_answer("theater"), "theater");
        assert_eq!(normalize_answer("A–the"), "–");
    }

    #[test]
    fn em_and_f1() {
        let answers = vec!["Denver Broncos".to_string(), "the Broncos".to_string()];
        assert_eq!(max_over_answers(exact_match, "broncos", &answers), 1.0);
        // pred {denver, broncos, team} vs {denver, broncos}: p = 2/3, r = 1, f1 = 0.8.
        assert!((max_over_answers(f1_score, "Denver Broncos team", &answers) - 0.8).abs() < 1e-12);
        assert_eq!(f1_score("", ""), 0.0);
        assert_eq!(max_over_answers(f1_score, "x", &[]), 0.0);
    }
}
