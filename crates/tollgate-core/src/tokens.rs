//! Token counting with the model's own tokenizer (tiktoken's BPE data is
//! compiled in, so this works offline).

use crate::openai::ChatMessage;
use tiktoken_rs::CoreBPE;

/// Which BPE a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        self.bpe().encode_ordinary(text).len() as u64
    }
}

/// Tokens OpenAI adds around every chat message (`<|start|>role<|message|>…<|end|>`).
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Extra token for a message that carries a `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the assistant's reply.
pub const REPLY_PRIMING_TOKENS: u64 = 3;

/// Prompt tokens of a chat request, counted the way OpenAI bills them.
pub fn count_chat_prompt(encoding: Encoding, messages: &[ChatMessage<'_>]) -> u64 {
    let mut total = REPLY_PRIMING_TOKENS;
    for m in messages {
        total += TOKENS_PER_MESSAGE + encoding.count(&m.role);
        total += m.content.text_tokens(encoding);
        if let Some(name) = &m.name {
            total += TOKENS_PER_NAME + encoding.count(name);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn counts_known_text() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(Encoding::O200k.count("hello world"), 2);
        assert_eq!(Encoding::Cl100k.count("hello world"), 2);
    }
}
