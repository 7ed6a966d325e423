//! A streamed response on its way to the client: event by event, finding
//! the usage chunk (and dropping it when the client did not ask for it),
//! and counting the text delivered so that a stream that ends without usage
//! (cut by the upstream, abandoned by the client) is still settled.

use crate::limits::Admission;
use bytes::{Bytes, BytesMut};
use tollgate_core::openai::{StreamChunk, Usage};
use tollgate_core::tokens::Estimate;

/// Watches one SSE stream pass by and settles its admission at the end.
#[derive(Debug)]
pub(crate) struct UsageTap {
    pending: BytesMut,
    strip_usage: bool,
    usage: Option<Usage>,
    delivered: String,
    estimate: Estimate,
    admission: Option<Admission>,
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
    /// A tap for a stream admitted with `estimate`; `strip_usage` when the
    /// gateway asked for usage on the client's behalf.
    pub(crate) fn new(admission: Admission, estimate: Estimate, strip_usage: bool) -> Self {
        Self {
            pending: BytesMut::new(),
            strip_usage,
            usage: None,
            delivered: String::new(),
            estimate,
            admission: Some(admission),
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

    /// Whatever is left when the upstream ends (an unterminated event).
    pub(crate) fn finish(&mut self) -> Bytes {
        self.pending.split().freeze()
    }

    fn keep(&mut self, event: &[u8]) -> bool {
        let Some(data) = data_of(event) else {
            return true;
        };
        let Ok(chunk) = serde_json::from_slice::<StreamChunk<'_>>(&data) else {
            // `[DONE]`, or something we do not understand: pass it on.
            return true;
        };
        chunk.push_text(&mut self.delivered);
        if chunk.is_usage_only() {
            self.usage = chunk.usage;
            return !self.strip_usage;
        }
        true
    }

    /// Tokens to settle on: the upstream's usage, else the prompt estimate
    /// plus the delivered text counted with the model's tokenizer.
    fn actual_tokens(&self) -> u64 {
        match self.usage {
            Some(u) => u.tokens(),
            None => self.estimate.prompt + self.estimate.encoding.count(&self.delivered),
        }
    }
}

impl Drop for UsageTap {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            let actual = self.actual_tokens();
            if self.usage.is_none() {
                tracing::debug!(
                    actual,
                    estimate = admission.estimate,
                    "stream ended without usage; settled on the delivered text"
                );
            }
            admission.settle(actual);
        }
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
