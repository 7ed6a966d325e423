//! A streamed response on its way to the client: event by event, finding
//! the usage chunk (and dropping it when the client did not ask for it),
//! and counting the text delivered so that a stream that ends without usage
//! (cut by the upstream, abandoned by the client) is still settled.

use crate::limits::Admission;
use crate::money::Bill;
use crate::pipeline::summarize;
use crate::upstream::Endpoint;
use bytes::{Bytes, BytesMut};
use tollgate_core::openai::{StreamChunk, Usage};
use tollgate_core::tokens::{Encoding, Estimate, Estimator};
use tollgate_store::ledger::Durable;

/// The event that ends an OpenAI stream.
const DONE: &[u8] = b"data: [DONE]\n\n";

/// Watches one SSE stream pass by and settles its limits and bill at the
/// end. It holds back the closing `[DONE]` until the usage row is durable,
/// so a client that saw the whole stream is always in the ledger.
#[derive(Debug)]
pub(crate) struct UsageTap {
    pending: BytesMut,
    strip_usage: bool,
    usage: Option<Usage>,
    served_model: Option<String>,
    delivered: String,
    prompt: Prompt,
    admission: Option<Admission>,
    bill: Option<Bill>,
    done_held: bool,
}

/// The request's prompt, counted at admission when a limit or a price
/// needed it, otherwise only if the stream ends without a usage chunk.
#[derive(Debug)]
pub(crate) enum Prompt {
    /// Counted already.
    Counted(Estimate),
    /// Not yet: the request, to count on demand.
    Uncounted {
        /// Its endpoint.
        endpoint: Endpoint,
        /// Its body.
        body: Bytes,
        /// How to count it.
        estimator: Estimator,
    },
}

impl Prompt {
    fn estimate(&self) -> Option<Estimate> {
        match self {
            Prompt::Counted(e) => Some(*e),
            Prompt::Uncounted {
                endpoint,
                body,
                estimator,
            } => summarize(*endpoint, body, Some(estimator))
                .ok()
                .and_then(|s| s.estimate),
        }
    }
}

/// The end of one SSE event in `buf`: the index just past its blank line.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The payload of an event's `data:` line(s), joined, if it has any.
fn data_of(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            let d = data.get_or_insert_with(Vec::new);
            if !d.is_empty() {
                d.push(b'\n');
            }
            d.extend_from_slice(rest);
        }
    }
    data
}

impl UsageTap {
    /// A tap for a stream of a request whose `prompt` counts when the
    /// stream ends without usage; `strip_usage` when the gateway asked for
    /// usage on the client's behalf.
    pub(crate) fn new(
        admission: Option<Admission>,
        bill: Option<Bill>,
        prompt: Prompt,
        strip_usage: bool,
    ) -> Self {
        Self {
            pending: BytesMut::new(),
            strip_usage,
            usage: None,
            served_model: None,
            delivered: String::new(),
            prompt,
            admission,
            bill,
            done_held: false,
        }
    }

    /// Takes in one chunk from upstream; returns the complete events to send on.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::with_capacity(self.pending.len());
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            if self.keep(&event) {
                out.extend_from_slice(&event);
            }
        }
        out.freeze()
    }

    /// Settles, waits for the usage row to be durable, and returns what is
    /// left to send: an unterminated last event and the held-back `[DONE]`.
    pub(crate) async fn finish(&mut self, status: u16) -> Bytes {
        if let Some(durable) = self.settle(status, true) {
            durable.wait().await;
        }
        let mut rest = self.pending.split();
        if self.done_held {
            rest.extend_from_slice(DONE);
        }
        rest.freeze()
    }

    fn keep(&mut self, event: &[u8]) -> bool {
        let Some(data) = data_of(event) else {
            return true;
        };
        if data.trim_ascii() == b"[DONE]" {
            self.done_held = true;
            return false;
        }
        let Ok(chunk) = serde_json::from_slice::<StreamChunk<'_>>(&data) else {
            // Something we do not understand: pass it on.
            return true;
        };
        chunk.push_text(&mut self.delivered);
        if self.served_model.is_none() {
            self.served_model = chunk.model.as_deref().map(str::to_owned);
        }
        if chunk.is_usage_only() {
            self.usage = chunk.usage;
            return !self.strip_usage;
        }
        true
    }

    /// The usage to settle on: the upstream's, else the prompt estimate
    /// plus the delivered text counted with the model's tokenizer.
    fn actual_usage(&self) -> Usage {
        match self.usage {
            Some(u) => u,
            None => {
                let estimate = self.prompt.estimate();
                let prompt = estimate.map_or(0, |e| e.prompt);
                let encoding = estimate.map_or(Encoding::O200k, |e| e.encoding);
                let completion = encoding.count(&self.delivered);
                tracing::debug!(
                    prompt,
                    completion,
                    "stream ended without usage; settled on the delivered text"
                );
                Usage {
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    total_tokens: prompt + completion,
                    prompt_tokens_details: None,
                }
            }
        }
    }

    fn settle(&mut self, status: u16, wait: bool) -> Option<Durable> {
        if self.admission.is_none() && self.bill.is_none() {
            return None;
        }
        let usage = self.actual_usage();
        if let Some(admission) = self.admission.take() {
            admission.settle(usage.tokens());
        }
        let bill = self.bill.take()?;
        let settled = bill.settle(Some(usage.priced()), status, self.served_model.take());
        if wait { settled.durable } else { None }
    }
}

impl Drop for UsageTap {
    /// A stream dropped before its end: the client hung up (499).
    fn drop(&mut self) {
        self.settle(499, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_events_across_chunk_boundaries() {
        assert_eq!(event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(event_end(b"data: a\n"), None);
        assert_eq!(
            data_of(b"event: x\ndata: {\"a\":1}\n\n").as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(data_of(b": comment\n\n"), None);
    }
}
