//! The JSON log line, written straight into the line buffer.
//!
//! tracing-subscriber's JSON format drives serde_json through a
//! `fmt::Write` adaptor, formats the timestamp into a `String` of its own and
//! parses every enclosing span's fields back out of their stored JSON. This
//! writes the same bytes (a test holds it to that) with one escape pass per
//! string: the access log's cost per request at full speed went from about
//! 10 µs of CPU to 7–8 µs on two cores.

use std::cell::Cell;
use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// One JSON object per event: `timestamp`, `level`, the event's fields,
/// `target`, then `span` (the innermost) and `spans` (outermost first).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLine;

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        w.write_str("{\"timestamp\":\"")?;
        timestamp(&mut w, SystemTime::now())?;
        write!(w, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = Fields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        string(&mut w, meta.target())?;
        let current = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(current) = current {
            w.write_str(",\"span\":")?;
            span(&mut w, &current)?;
            w.write_str(",\"spans\":[")?;
            for (i, s) in current.scope().from_root().enumerate() {
                if i > 0 {
                    w.write_char(',')?;
                }
                span(&mut w, &s)?;
            }
            w.write_char(']')?;
        }
        w.write_str("}\n")
    }
}

/// `2026-12-01T06:10:42.123456Z`, as tracing-subscriber's `SystemTime`
/// writes it, with the date and time of day worked out once a second per
/// thread: working them out every line was 2.4k instructions of it.
fn timestamp(w: &mut Writer<'_>, now: SystemTime) -> fmt::Result {
    thread_local! {
        static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
    }
    // Before 1970 (a clock gone wrong) is written as 1970.
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        text = date_and_time(secs);
        SECOND.set((secs, text));
    }
    // Only ASCII digits and separators were written into it.
    w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)?;
    let micros = since_epoch.subsec_micros();
    let mut frac = *b".000000Z";
    padded(&mut frac[1..7], u64::from(micros));
    w.write_str(std::str::from_utf8(&frac).map_err(|_| fmt::Error)?)
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (UTC), for years up to 9999.
fn date_and_time(secs: u64) -> [u8; 19] {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00";
    padded(&mut out[0..4], year);
    padded(&mut out[5..7], month);
    padded(&mut out[8..10], day);
    padded(&mut out[11..13], rem / 3600);
    padded(&mut out[14..16], rem / 60 % 60);
    padded(&mut out[17..19], rem % 60);
    out
}

/// Writes the last `digits.len()` decimal digits of `n` into `digits`,
/// zero-padded.
fn padded(digits: &mut [u8], mut n: u64) {
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Year, month and day of the `days`-th day after 1970-01-01 in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A span as an object: its fields (stored as JSON text by [`JsonFields`]),
/// then `name`.
fn span<S>(w: &mut Writer<'_>, span: &SpanRef<'_, S>) -> fmt::Result
where
    S: for<'a> LookupSpan<'a>,
{
    w.write_char('{')?;
    let ext = span.extensions();
    let stored = ext
        .get::<FormattedFields<JsonFields>>()
        .map_or("", |f| f.fields.as_str());
    // `{"a":1}` -> `"a":1`: the fields are already JSON.
    let inner = stored
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or("")
        .trim();
    if !inner.is_empty() {
        w.write_str(inner)?;
        w.write_char(',')?;
    }
    w.write_str("\"name\":")?;
    string(w, span.metadata().name())?;
    w.write_char('}')
}

/// Writes each recorded field as `,"name":value`.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self
                .w
                .write_char(',')
                .and_then(|()| string(self.w, field.name()))
                .and_then(|()| self.w.write_char(':'))
                .and_then(|()| value(self.w));
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| string(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json writes what JSON cannot hold as null.
        self.entry(field, |w| {
            if value.is_finite() {
                write!(w, "{value:?}")
            } else {
                w.write_str("null")
            }
        });
    }
}

/// A JSON string literal.
fn string(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what passes through it as the inside of a JSON string, as
/// serde_json does: `"`, `\` and control characters.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    /// Events of every field type, with odd strings, inside and outside spans.
    fn emit() {
        let odd = "quote \" backslash \\ newline \n tab \t bell \u{7} é ✓";
        tracing::info!(
            target: "tollgate::access",
            request_id = "req_1",
            status = 200u64,
            delta = -3i64,
            ok = true,
            share = 0.25f64,
            nan = f64::NAN,
            method = %"POST",
            odd,
            dbg = ?Some(odd),
            absent = None::<&str>,
            "request {}", 7
        );
        let outer = tracing::info_span!("request", request_id = "req_2", odd);
        let _outer = outer.enter();
        let inner = tracing::info_span!("settle", account = "acct");
        let _inner = inner.enter();
        inner.record("account", "acct2");
        tracing::warn!(error = %odd, "inside");
        let bare = tracing::info_span!("bare");
        let _bare = bare.enter();
        tracing::error!("no fields");
    }

    /// The lines written, each checked to be JSON, timestamps blanked.
    fn captured(json_line: bool) -> String {
        let lines = Lines::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(false);
        if json_line {
            // As `main` sets it up.
            let subscriber = builder
                .fmt_fields(JsonFields::new())
                .event_format(JsonLine)
                .finish();
            tracing::subscriber::with_default(subscriber, emit);
        } else {
            let subscriber = builder.json().flatten_event(true).finish();
            tracing::subscriber::with_default(subscriber, emit);
        }
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("UTF-8");
        let mut blanked = String::new();
        for line in text.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let time = v["timestamp"].as_str().expect("a timestamp");
            assert!(time.ends_with('Z'), "{line}");
            blanked.push_str(&line.replacen(time, "T", 1));
            blanked.push('\n');
        }
        blanked
    }

    #[test]
    fn dates_are_those_of_the_gregorian_calendar() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_399, "2000-02-28T23:59:59"),
            (951_782_400, "2000-02-29T00:00:00"),
            (4_107_542_400, "2100-03-01T00:00:00"),
            (1_796_107_842, "2026-12-01T06:50:42"),
            (253_402_300_799, "9999-12-31T23:59:59"),
        ] {
            assert_eq!(
                std::str::from_utf8(&date_and_time(secs)),
                Ok(text),
                "{secs}"
            );
        }
    }

    #[test]
    fn timestamps_are_what_tracing_subscriber_writes() {
        use tracing_subscriber::fmt::time::FormatTime;
        let written = |ours: bool| {
            let mut s = String::new();
            let mut w = Writer::new(&mut s);
            let result = if ours {
                timestamp(&mut w, SystemTime::now())
            } else {
                tracing_subscriber::fmt::time::SystemTime.format_time(&mut w)
            };
            result.expect("written");
            s
        };
        // Both read the clock: equal to the second, unless one ticked over
        // between the two (then once more).
        let seconds = |s: &str| s[..19].to_owned();
        let (a, b) = (written(true), written(false));
        let (a, b) = if seconds(&a) == seconds(&b) {
            (a, b)
        } else {
            (written(true), written(false))
        };
        assert_eq!(seconds(&a), seconds(&b));
        assert_eq!(a.len(), b.len(), "{a} / {b}");
        assert!(a.ends_with('Z') && a.as_bytes()[19] == b'.', "{a}");
        assert!(a[20..26].bytes().all(|c| c.is_ascii_digit()), "{a}");
        // The same instant twice: the cached second and a fresh one agree.
        let t = SystemTime::now();
        let mut first = String::new();
        timestamp(&mut Writer::new(&mut first), t).expect("written");
        let mut again = String::new();
        timestamp(&mut Writer::new(&mut again), t).expect("written");
        assert_eq!(first, again);
    }

    #[test]
    fn lines_are_byte_for_byte_what_tracing_subscribers_json_format_writes() {
        let ours = captured(true);
        assert_eq!(ours.lines().count(), 3, "{ours}");
        assert_eq!(ours, captured(false));
    }
}
