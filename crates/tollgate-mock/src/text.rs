//! Deterministic reply text: every word is exactly one token in both the
//! o200k and cl100k encodings, so `n` words are `n` completion tokens.

const WORDS: &[&str] = &[
    " the", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", " and",
    " then", " runs", " back", " home", " again", ".",
];

/// The `i`-th word of the reply (0-based); word 0 has no leading space.
pub fn word(i: u64) -> &'static str {
    if i == 0 {
        "the"
    } else {
        WORDS[(i % WORDS.len() as u64) as usize]
    }
}

/// The first `n` words concatenated: a reply of exactly `n` tokens.
pub fn generate_words(n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 6);
    for i in 0..n {
        s.push_str(word(i));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::tokens::Encoding;

    #[test]
    fn n_words_are_n_tokens_in_both_encodings() {
        for n in [0, 1, 2, 15, 16, 17, 33, 100, 257] {
            let text = generate_words(n);
            assert_eq!(Encoding::O200k.count(&text), n, "o200k, n={n}: {text:?}");
            assert_eq!(Encoding::Cl100k.count(&text), n, "cl100k, n={n}: {text:?}");
        }
    }
}
