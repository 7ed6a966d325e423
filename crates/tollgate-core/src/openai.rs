//! The parts of OpenAI's request and response bodies that Tollgate reads.
//!
//! Requests are deserialized borrowing from the body, and only the fields a
//! decision needs; the gateway forwards the original bytes, so fields it does
//! not know pass through untouched.

use crate::tokens::Encoding;
use serde::{Deserialize, Deserializer, Serialize};
use std::borrow::Cow;

/// Deserializes an optional string borrowing from the input where it can
/// (serde does not borrow through `Option<Cow<str>>` on its own).
fn opt_str<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'a>>::deserialize(d)?.map(|b| b.0))
}

/// `POST /v1/chat/completions`, as far as Tollgate reads it.
#[derive(Debug, Deserialize)]
pub struct ChatRequest<'a> {
    /// Requested model.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub model: Option<Cow<'a, str>>,
    /// The conversation.
    #[serde(borrow, default)]
    pub messages: Option<Vec<ChatMessage<'a>>>,
    /// Server-sent events instead of one body.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Output cap (legacy name).
    pub max_tokens: Option<u64>,
    /// Output cap (current name; wins over `max_tokens`).
    pub max_completion_tokens: Option<u64>,
    /// Number of choices.
    pub n: Option<u64>,
    /// End-user identifier.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub user: Option<Cow<'a, str>>,
}

impl ChatRequest<'_> {
    /// The output cap the caller asked for, if any.
    pub fn output_cap(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Whether the caller asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the caller asked for the final usage chunk of a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// `stream_options`.
#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// One message of a chat.
#[derive(Debug, Deserialize)]
pub struct ChatMessage<'a> {
    /// `system`, `user`, `assistant`, `tool`, `developer`.
    #[serde(borrow)]
    pub role: Cow<'a, str>,
    /// Text, parts, or nothing (tool calls).
    #[serde(borrow, default)]
    pub content: MessageContent<'a>,
    /// Optional participant name.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub name: Option<Cow<'a, str>>,
}

/// A message's content: a string or a list of typed parts.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
pub enum MessageContent<'a> {
    /// Plain text.
    Text(#[serde(borrow)] Cow<'a, str>),
    /// Typed parts (`text`, `image_url`, …).
    Parts(#[serde(borrow)] Vec<ContentPart<'a>>),
    /// `null` or absent.
    #[default]
    None,
}

impl MessageContent<'_> {
    /// Tokens of the text parts under `encoding`.
    pub fn text_tokens(&self, encoding: Encoding) -> u64 {
        match self {
            MessageContent::Text(t) => encoding.count(t),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .map(|t| encoding.count(t))
                .sum(),
            MessageContent::None => 0,
        }
    }
}

/// One typed part of a message.
#[derive(Debug, Deserialize)]
pub struct ContentPart<'a> {
    /// `text`, `image_url`, `input_audio`, …
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// The text of a `text` part.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub text: Option<Cow<'a, str>>,
}

/// `prompt` of `/v1/completions` or `input` of `/v1/embeddings`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextInput<'a> {
    /// One string.
    One(#[serde(borrow)] Cow<'a, str>),
    /// Several strings.
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
    /// One pre-tokenized input.
    Tokens(Vec<u32>),
    /// Several pre-tokenized inputs.
    ManyTokens(Vec<Vec<u32>>),
}

impl TextInput<'_> {
    /// Number of separate inputs.
    pub fn len(&self) -> usize {
        match self {
            TextInput::One(_) | TextInput::Tokens(_) => 1,
            TextInput::Many(v) => v.len(),
            TextInput::ManyTokens(v) => v.len(),
        }
    }

    /// Whether there is no input at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens of every input under `encoding`.
    pub fn tokens(&self, encoding: Encoding) -> u64 {
        match self {
            TextInput::One(t) => encoding.count(t),
            TextInput::Many(v) => v.iter().map(|t| encoding.count(t)).sum(),
            TextInput::Tokens(t) => t.len() as u64,
            TextInput::ManyTokens(v) => v.iter().map(|t| t.len() as u64).sum(),
        }
    }
}

/// `POST /v1/completions`, as far as Tollgate reads it.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest<'a> {
    /// Requested model.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub model: Option<Cow<'a, str>>,
    /// The prompt(s).
    #[serde(borrow)]
    pub prompt: Option<TextInput<'a>>,
    /// Server-sent events instead of one body.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Output cap.
    pub max_tokens: Option<u64>,
    /// End-user identifier.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub user: Option<Cow<'a, str>>,
}

/// `POST /v1/embeddings`, as far as Tollgate reads it.
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest<'a> {
    /// Requested model.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub model: Option<Cow<'a, str>>,
    /// The input(s).
    #[serde(borrow)]
    pub input: Option<TextInput<'a>>,
    /// `float` (default) or `base64`.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub encoding_format: Option<Cow<'a, str>>,
    /// Output dimensions.
    pub dimensions: Option<usize>,
    /// End-user identifier.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub user: Option<Cow<'a, str>>,
}

/// The `usage` block of a response.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Usage {
    /// Input tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Output tokens (absent for embeddings).
    #[serde(default)]
    pub completion_tokens: u64,
    /// Input + output.
    #[serde(default)]
    pub total_tokens: u64,
    /// How the input splits (cached tokens), when the provider says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct PromptTokensDetails {
    /// Input tokens served from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: u64,
}

/// Just the `usage` of a response body; reading it also checks that the body
/// is well-formed JSON.
#[derive(Debug, Default, Deserialize)]
pub struct UsageOnly {
    /// `usage`, when the body has one.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// The model that answered.
    #[serde(default)]
    pub model: Option<String>,
}

impl Usage {
    /// Tokens a limit counts: the total, or input plus output when a
    /// provider leaves the total out.
    pub fn tokens(&self) -> u64 {
        self.total_tokens
            .max(self.prompt_tokens.saturating_add(self.completion_tokens))
    }

    /// The counts a price applies to.
    pub fn priced(&self) -> crate::money::TokenUsage {
        crate::money::TokenUsage {
            input: self.prompt_tokens,
            cached_input: self.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            output: self.completion_tokens,
        }
    }
}

/// One `data:` chunk of a streamed chat or legacy completion: the text it
/// delivers and, in the last chunk of a stream with `include_usage`, the usage.
#[derive(Debug, Default, Deserialize)]
pub struct StreamChunk<'a> {
    /// The choices' deltas; empty in the usage chunk.
    #[serde(borrow, default)]
    pub choices: Vec<ChunkChoice<'a>>,
    /// Present (non-null) only in the usage chunk.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// The model that answered.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub model: Option<Cow<'a, str>>,
}

/// One choice of a [`StreamChunk`].
#[derive(Debug, Default, Deserialize)]
pub struct ChunkChoice<'a> {
    /// Chat: the new piece of the message.
    #[serde(borrow, default)]
    pub delta: Option<ChunkDelta<'a>>,
    /// Legacy completions: the new piece of text.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub text: Option<Cow<'a, str>>,
}

/// The delta of a chat [`ChunkChoice`].
#[derive(Debug, Default, Deserialize)]
pub struct ChunkDelta<'a> {
    /// Text content.
    #[serde(borrow, default, deserialize_with = "opt_str")]
    pub content: Option<Cow<'a, str>>,
}

impl StreamChunk<'_> {
    /// Whether this is the usage chunk that `include_usage` adds.
    pub fn is_usage_only(&self) -> bool {
        self.choices.is_empty() && self.usage.is_some()
    }

    /// Appends the text this chunk delivers to `out`.
    pub fn push_text(&self, out: &mut String) {
        for c in &self.choices {
            if let Some(t) = c.delta.as_ref().and_then(|d| d.content.as_deref()) {
                out.push_str(t);
            }
            if let Some(t) = c.text.as_deref() {
                out.push_str(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chat_request_borrowing_the_body() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":null,"tool_calls":[]}],
            "max_completion_tokens":5,"max_tokens":9,"stream":true,"stream_options":{"include_usage":true},"extra":1}"#;
        let r: ChatRequest<'_> = serde_json::from_slice(body).expect("valid");
        assert_eq!(r.model.as_deref(), Some("gpt-4o"));
        assert!(matches!(r.model, Some(Cow::Borrowed(_))));
        assert_eq!(r.output_cap(), Some(5));
        assert!(r.is_stream() && r.wants_stream_usage());
        assert_eq!(r.messages.as_ref().map(Vec::len), Some(3));
    }

    #[test]
    fn reads_every_input_shape() {
        for (body, n) in [
            (r#"{"input":"a"}"#, 1),
            (r#"{"input":["a","b"]}"#, 2),
            (r#"{"input":[1,2,3]}"#, 1),
            (r#"{"input":[[1],[2]]}"#, 2),
        ] {
            let r: EmbeddingRequest<'_> = serde_json::from_str(body).expect("valid");
            assert_eq!(r.input.map(|i| i.len()), Some(n), "{body}");
        }
    }
}

/// `body` (a JSON object) with its `model` replaced; `None` when it is not
/// a JSON object. Used by fallbacks, which resend a request to another model.
pub fn with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.as_object_mut()?
        .insert("model".into(), serde_json::Value::String(model.to_owned()));
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod with_model_tests {
    use super::with_model;

    #[test]
    fn a_fallback_rewrites_only_the_model() {
        let body =
            br#"{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
        let out = with_model(body, "gpt-4o-mini").expect("an object");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["max_tokens"], 3);
        assert_eq!(v["messages"][0]["content"], "hi");
        assert!(with_model(b"[1,2]", "m").is_none());
    }
}
