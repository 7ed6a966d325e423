//! Token counting with the model's own tokenizer (tiktoken's BPE data is
//! compiled in, so this works offline).

use crate::openai::{ChatMessage, ChatRequest, CompletionRequest, EmbeddingRequest};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{LazyLock, Mutex, PoisonError};
use tiktoken_rs::CoreBPE;

/// Which BPE a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-5, o-series.
    O200k,
    /// gpt-4, gpt-3.5-turbo, text-embedding-3-*.
    Cl100k,
}

impl Encoding {
    /// The encoding OpenAI uses for `model`; `fallback` for models it does not know.
    pub fn for_model(model: &str, fallback: Encoding) -> Encoding {
        let m = model.rsplit('/').next().unwrap_or(model);
        if m.starts_with("gpt-4o")
            || m.starts_with("gpt-4.1")
            || m.starts_with("gpt-4.5")
            || m.starts_with("gpt-5")
            || m.starts_with("chatgpt-4o")
            || m.starts_with("o1")
            || m.starts_with("o3")
            || m.starts_with("o4")
        {
            Encoding::O200k
        } else if m.starts_with("gpt-4")
            || m.starts_with("gpt-3.5")
            || m.starts_with("text-embedding")
            || m.starts_with("davinci-002")
            || m.starts_with("babbage-002")
        {
            Encoding::Cl100k
        } else {
            fallback
        }
    }

    fn bpe(self) -> &'static CoreBPE {
        match self {
            Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
        }
    }

    /// Number of tokens in `text`.
    pub fn count(self, text: &str) -> u64 {
        let hash = CountCache::hash(self, text);
        if text.len() <= ShortCounts::MAX_TEXT_BYTES {
            return SHORT_COUNTS.with_borrow_mut(|short| short.count(hash, self, text));
        }
        let cache = || COUNTS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = cache().get(hash, self, text) {
            return n;
        }
        // Counted outside the lock: a long text takes milliseconds.
        let n = self.count_uncached(text);
        cache().insert(hash, self, text, n);
        n
    }

    fn count_uncached(self, text: &str) -> u64 {
        self.bpe().encode_ordinary(text).len() as u64
    }
}

/// Token counts of the longer texts counted lately. Agents send the same
/// system prompt and tool descriptions with every call, and a chat resends
/// every earlier message with each turn; counting costs about 150 µs per
/// 1k tokens, finding a text's count a fraction of a microsecond per 1k.
static COUNTS: LazyLock<Mutex<CountCache>> = LazyLock::new(Mutex::default);
/// Seeded once per process; hashed outside the lock.
static COUNTS_SEED: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

/// Counts keyed by text, in two generations: a text is found in either,
/// and moves to the current one when found in the older. Once the current
/// generation holds [`CountCache::GENERATION_BYTES`] of text it becomes
/// the older one and the older one is dropped, so memory stays bounded and
/// texts still in use stay. An entry's own size counts with its text's, so
/// that many texts barely past [`ShortCounts`]' are bounded too.
#[derive(Default)]
struct CountCache {
    current: HashMap<u64, CountedText>,
    older: HashMap<u64, CountedText>,
    current_bytes: usize,
}

struct CountedText {
    encoding: Encoding,
    text: Box<str>,
    tokens: u64,
}

impl CountCache {
    /// Memory kept per generation (so at most twice this in all).
    const GENERATION_BYTES: usize = 8 << 20;
    /// What an entry holds besides its text: its slot in the map.
    const ENTRY_BYTES: usize = std::mem::size_of::<(u64, CountedText)>() + 1;

    fn bytes(counted: &CountedText) -> usize {
        counted.text.len() + Self::ENTRY_BYTES
    }

    /// Where `text` is looked up; only the text itself says it is there.
    fn hash(encoding: Encoding, text: &str) -> u64 {
        COUNTS_SEED.hash_one((encoding, text))
    }

    fn get(&mut self, hash: u64, encoding: Encoding, text: &str) -> Option<u64> {
        let is_it = |c: &CountedText| c.encoding == encoding && *c.text == *text;
        if let Some(c) = self.current.get(&hash).filter(|c| is_it(c)) {
            return Some(c.tokens);
        }
        let older = self.older.remove(&hash)?;
        if !is_it(&older) {
            self.older.insert(hash, older);
            return None;
        }
        let tokens = older.tokens;
        self.keep(hash, older);
        Some(tokens)
    }

    fn insert(&mut self, hash: u64, encoding: Encoding, text: &str, tokens: u64) {
        if text.len() > Self::GENERATION_BYTES {
            return;
        }
        let counted = CountedText {
            encoding,
            text: text.into(),
            tokens,
        };
        self.keep(hash, counted);
    }

    fn keep(&mut self, hash: u64, counted: CountedText) {
        let bytes = Self::bytes(&counted);
        if self.current_bytes + bytes > Self::GENERATION_BYTES {
            self.older = std::mem::take(&mut self.current);
            self.current_bytes = 0;
        }
        self.current_bytes += bytes;
        // A different text under the same hash gives way: the newer one is
        // the likelier to come again.
        if let Some(replaced) = self.current.insert(hash, counted) {
            self.current_bytes -= Self::bytes(&replaced);
        }
    }
}

thread_local! {
    /// Each thread's table: counting never waits on another thread for it.
    static SHORT_COUNTS: RefCell<ShortCounts> = RefCell::new(ShortCounts::default());
}

/// Counts of short texts (a chat's earlier turns, resent with each later
/// one; short system prompts), in a fixed table of slots, one text a slot.
/// Counting a short message costs about 1 µs; finding it here a few tens
/// of nanoseconds, and a text not found costs one copy into its slot: no
/// allocation, no lock, and the table never grows.
struct ShortCounts {
    slots: Box<[ShortSlot]>,
}

#[derive(Clone, Copy)]
struct ShortSlot {
    hash: u64,
    /// `None` while the slot is empty.
    encoding: Option<Encoding>,
    len: u8,
    tokens: u32,
    text: [u8; ShortCounts::MAX_TEXT_BYTES],
}

impl Default for ShortCounts {
    fn default() -> Self {
        let empty = ShortSlot {
            hash: 0,
            encoding: None,
            len: 0,
            tokens: 0,
            text: [0; Self::MAX_TEXT_BYTES],
        };
        Self {
            slots: vec![empty; Self::SLOTS].into_boxed_slice(),
        }
    }
}

impl ShortCounts {
    /// Longest text kept here; longer ones go to [`CountCache`].
    const MAX_TEXT_BYTES: usize = 255;
    /// Slots per thread (a power of two): 1024 × 272 bytes.
    const SLOTS: usize = 1024;

    fn count(&mut self, hash: u64, encoding: Encoding, text: &str) -> u64 {
        let slot = &mut self.slots[hash as usize & (Self::SLOTS - 1)];
        let len = text.len();
        if slot.hash == hash
            && slot.encoding == Some(encoding)
            && usize::from(slot.len) == len
            && slot.text[..len] == *text.as_bytes()
        {
            return u64::from(slot.tokens);
        }
        let tokens = encoding.count_uncached(text);
        // A text of at most 255 bytes has at most 255 tokens.
        if let (Ok(len), Ok(n)) = (u8::try_from(len), u32::try_from(tokens)) {
            slot.hash = hash;
            slot.encoding = Some(encoding);
            slot.len = len;
            slot.tokens = n;
            slot.text[..text.len()].copy_from_slice(text.as_bytes());
        }
        tokens
    }
}

/// Tokens OpenAI adds around every chat message (`<|start|>role<|message|>…<|end|>`).
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Extra token for a message that carries a `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the assistant's reply.
pub const REPLY_PRIMING_TOKENS: u64 = 3;

/// Roles that are one token in both encodings: counted without the tokenizer.
const ONE_TOKEN_ROLES: [&str; 6] = [
    "system",
    "user",
    "assistant",
    "developer",
    "tool",
    "function",
];

fn role_tokens(encoding: Encoding, role: &str) -> u64 {
    if ONE_TOKEN_ROLES.contains(&role) {
        1
    } else {
        encoding.count(role)
    }
}

/// Prompt tokens of a chat request, counted the way OpenAI bills them.
pub fn count_chat_prompt(encoding: Encoding, messages: &[ChatMessage<'_>]) -> u64 {
    let mut total = REPLY_PRIMING_TOKENS;
    for m in messages {
        total += TOKENS_PER_MESSAGE + role_tokens(encoding, &m.role);
        total += m.content.text_tokens(encoding);
        if let Some(name) = &m.name {
            total += TOKENS_PER_NAME + encoding.count(name);
        }
    }
    total
}

/// How a request's tokens are estimated before the call: its prompt counted
/// with the model's tokenizer, plus its output cap or a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimator {
    /// The encoding of models tiktoken does not know.
    pub fallback: Encoding,
    /// Output tokens assumed when a request sets no cap.
    pub default_output: u64,
}

/// A request's estimated tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Prompt tokens, counted.
    pub prompt: u64,
    /// Output tokens: the request's cap, or the default.
    pub output: u64,
    /// The encoding they were counted in (delivered text is counted in it too).
    pub encoding: Encoding,
}

impl Estimate {
    /// Prompt plus output.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.output)
    }
}

impl Estimator {
    fn output(&self, cap: Option<u64>, choices: u64) -> u64 {
        cap.unwrap_or(self.default_output)
            .saturating_mul(choices.max(1))
    }

    /// A chat completion: messages with OpenAI's per-message overhead.
    pub fn chat(&self, model: &str, r: &ChatRequest<'_>) -> Estimate {
        let encoding = Encoding::for_model(model, self.fallback);
        let prompt = r
            .messages
            .as_deref()
            .map_or(0, |m| count_chat_prompt(encoding, m));
        Estimate {
            prompt,
            output: self.output(r.output_cap(), r.n.unwrap_or(1)),
            encoding,
        }
    }

    /// A legacy completion: one output per prompt.
    pub fn completion(&self, model: &str, r: &CompletionRequest<'_>) -> Estimate {
        let encoding = Encoding::for_model(model, self.fallback);
        let (prompt, prompts) = r
            .prompt
            .as_ref()
            .map_or((0, 1), |p| (p.tokens(encoding), p.len() as u64));
        Estimate {
            prompt,
            output: self.output(r.max_tokens, prompts),
            encoding,
        }
    }

    /// Embeddings: input only.
    pub fn embedding(&self, model: &str, r: &EmbeddingRequest<'_>) -> Estimate {
        let encoding = Encoding::for_model(model, self.fallback);
        Estimate {
            prompt: r.input.as_ref().map_or(0, |i| i.tokens(encoding)),
            output: 0,
            encoding,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_prompt_overhead_and_output_cap() {
        let est = Estimator {
            fallback: Encoding::O200k,
            default_output: 100,
        };
        let r: ChatRequest<'_> = serde_json::from_str(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}],"max_tokens":7,"n":2}"#,
        )
        .expect("valid");
        // 3 priming + 3 per message + "user" (1) + "hello world" (2).
        let e = est.chat("gpt-4o", &r);
        assert_eq!((e.prompt, e.output), (9, 14));
        let r: ChatRequest<'_> =
            serde_json::from_str(r#"{"messages":[{"role":"user","content":"hello world"}]}"#)
                .expect("valid");
        assert_eq!(est.chat("gpt-4o", &r).output, 100);
    }

    #[test]
    fn picks_openai_encodings() {
        assert_eq!(
            Encoding::for_model("gpt-4o-mini", Encoding::Cl100k),
            Encoding::O200k
        );
        assert_eq!(
            Encoding::for_model("gpt-3.5-turbo", Encoding::O200k),
            Encoding::Cl100k
        );
        assert_eq!(
            Encoding::for_model("llama-3", Encoding::Cl100k),
            Encoding::Cl100k
        );
    }

    #[test]
    fn the_usual_roles_are_one_token_in_both_encodings() {
        for role in ONE_TOKEN_ROLES {
            for enc in [Encoding::O200k, Encoding::Cl100k] {
                assert_eq!(enc.count(role), 1, "{role} in {enc:?}");
            }
        }
    }

    #[test]
    fn counts_known_text() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(Encoding::O200k.count("hello world"), 2);
        assert_eq!(Encoding::Cl100k.count("hello world"), 2);
    }

    #[test]
    fn a_text_counts_the_same_from_the_cache() {
        let long = "Limits are exact, and every token is counted. ".repeat(100);
        for text in ["Hello, how are you?", "", long.as_str()] {
            for encoding in [Encoding::O200k, Encoding::Cl100k] {
                let exact = encoding.count_uncached(text);
                assert_eq!(encoding.count(text), exact, "first count");
                assert_eq!(encoding.count(text), exact, "from the cache");
            }
        }
        // The same text in the other encoding is a different entry.
        assert_ne!(
            Encoding::O200k.count(&"日本語のテキスト。".repeat(200)),
            Encoding::Cl100k.count(&"日本語のテキスト。".repeat(200))
        );
    }

    #[test]
    fn the_short_table_answers_only_for_the_very_text() {
        let mut short = ShortCounts::default();
        let hash = |e, t| CountCache::hash(e, t);
        let (a, b) = ("Hello, how are you?", "Hello, who are you?");
        let n = short.count(hash(Encoding::O200k, a), Encoding::O200k, a);
        assert_eq!(n, Encoding::O200k.count_uncached(a));
        // Another text, or the other encoding, under the same hash (a
        // collision, forced here) is counted, not taken for it.
        let h = hash(Encoding::O200k, a);
        assert_eq!(
            short.count(h, Encoding::O200k, b),
            Encoding::O200k.count_uncached(b)
        );
        assert_eq!(short.count(h, Encoding::O200k, a), n);
        let zh = "你好，你今天过得怎么样？我很好，谢谢。";
        assert_eq!(
            short.count(h, Encoding::O200k, zh),
            Encoding::O200k.count_uncached(zh)
        );
        assert_eq!(
            short.count(h, Encoding::Cl100k, zh),
            Encoding::Cl100k.count_uncached(zh)
        );
        assert_ne!(
            Encoding::O200k.count_uncached(zh),
            Encoding::Cl100k.count_uncached(zh),
            "the two encodings differ on this text"
        );
    }

    #[test]
    fn the_cache_answers_only_for_the_very_text() {
        let mut cache = CountCache::default();
        let (a, b) = ("a".repeat(2000), "b".repeat(2000));
        let hash = CountCache::hash(Encoding::O200k, &a);
        cache.insert(hash, Encoding::O200k, &a, 7);
        assert_eq!(cache.get(hash, Encoding::O200k, &a), Some(7));
        assert_eq!(cache.get(hash, Encoding::Cl100k, &a), None);
        // Another text under the same hash (a collision) is not taken for it.
        assert_eq!(cache.get(hash, Encoding::O200k, &b), None);
    }

    #[test]
    fn the_cache_keeps_texts_in_use_within_two_generations() {
        let mut cache = CountCache::default();
        let text = |i: usize| format!("{i:08}{}", "x".repeat(1 << 20));
        let hash = |t: &str| CountCache::hash(Encoding::O200k, t);
        let used = text(0);
        cache.insert(hash(&used), Encoding::O200k, &used, 1);
        // Twenty 1 MiB texts: over two generations' worth.
        for i in 1..=20 {
            let t = text(i);
            cache.insert(hash(&t), Encoding::O200k, &t, i as u64);
            // `used` is asked for all along, so it keeps moving up.
            assert_eq!(cache.get(hash(&used), Encoding::O200k, &used), Some(1));
            assert!(cache.current_bytes <= CountCache::GENERATION_BYTES);
        }
        let first = text(1);
        assert_eq!(
            cache.get(hash(&first), Encoding::O200k, &first),
            None,
            "an unused old text is gone"
        );
        let last = text(20);
        assert_eq!(cache.get(hash(&last), Encoding::O200k, &last), Some(20));
        let held: usize = cache
            .current
            .values()
            .chain(cache.older.values())
            .map(|c| c.text.len())
            .sum();
        assert!(held <= 2 * CountCache::GENERATION_BYTES);
    }

    #[test]
    fn many_texts_just_past_the_short_table_are_bounded_by_their_entries_too() {
        let mut cache = CountCache::default();
        let len = ShortCounts::MAX_TEXT_BYTES + 1;
        let per_generation = CountCache::GENERATION_BYTES / (len + CountCache::ENTRY_BYTES);
        for i in 0..3 * per_generation {
            let t = format!("{i:0len$}");
            cache.insert(
                CountCache::hash(Encoding::O200k, &t),
                Encoding::O200k,
                &t,
                1,
            );
            assert!(cache.current_bytes <= CountCache::GENERATION_BYTES);
        }
        let entries = cache.current.len() + cache.older.len();
        assert!(
            entries <= 2 * per_generation,
            "{entries} entries held, at most {} expected",
            2 * per_generation
        );
    }
}
