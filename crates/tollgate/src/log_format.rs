//! The log lines: JSON, built in a buffer of the thread's own and handed to
//! the subscriber's writer whole, and human. Both write the request the
//! task serves (a task-local id, see `serving_request`) as a `request` span.
//!
//! tracing-subscriber's JSON format drives serde_json through a
//! `fmt::Write` adaptor, formats the timestamp into a `String` of its own and
//! parses every enclosing span's fields back out of their stored JSON. This
//! writes the same bytes (a test holds it to that) with one escape pass per
//! string: the access log's cost per request at full speed went from about
//! 10 µs of CPU to 7–8 µs on two cores.

use std::cell::{Cell, RefCell};
use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_gateway::server::serving_request;
use tracing::field::{Field, Visit};
use tracing::span::Record;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// One JSON object per event: `timestamp`, `level`, the event's fields,
/// `target`, then `span` (the innermost) and `spans` (outermost first).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLine;

impl<S> FormatEvent<S, SpanFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, SpanFields>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        with_scratch(|line| {
            let meta = event.metadata();
            line.push_str("{\"timestamp\":\"");
            timestamp(line, SystemTime::now());
            line.push_str("\",\"level\":\"");
            line.push_str(meta.level().as_str());
            line.push('"');
            event.record(&mut Fields { line: &mut *line });
            line.push_str(",\"target\":");
            string(line, meta.target());
            let current = event
                .parent()
                .and_then(|id| ctx.span(id))
                .or_else(|| ctx.lookup_current());
            let serving = serving_request();
            let serving = serving.as_ref().map(|id| id.to_str().unwrap_or_default());
            if current.is_some() || serving.is_some() {
                line.push_str(",\"span\":");
                match (&current, serving) {
                    (Some(current), _) => span(line, current),
                    (None, Some(id)) => request_span(line, id),
                    (None, None) => {}
                }
                line.push_str(",\"spans\":[");
                if let Some(id) = serving {
                    request_span(line, id);
                }
                for s in current.iter().flat_map(|c| c.scope().from_root()) {
                    if !line.ends_with('[') {
                        line.push(',');
                    }
                    span(line, &s);
                }
                line.push(']');
            }
            line.push_str("}\n");
            w.write_str(line)
        })
    }
}

/// Runs `f` on this thread's line buffer, emptied. The line is built there
/// and handed to the subscriber's writer whole: through the writer (a
/// `dyn fmt::Write`) its forty-odd pieces cost a dynamic call each.
fn with_scratch<R>(f: impl FnOnce(&mut String) -> R) -> R {
    thread_local! {
        static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    }
    LINE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut line) => {
            line.clear();
            f(&mut line)
        }
        // A value's `Debug` that logs, while its line is being written.
        Err(_) => f(&mut String::new()),
    })
}

/// `2026-12-01T06:10:42.123456Z`, as tracing-subscriber's `SystemTime`
/// writes it, with the date and time of day worked out once a second per
/// thread: working them out every line was 2.4k instructions of it.
fn timestamp(line: &mut String, now: SystemTime) {
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
    let micros = since_epoch.subsec_micros();
    let mut frac = *b".000000Z";
    padded(&mut frac[1..7], u64::from(micros));
    // Only ASCII digits and separators were written into either.
    for part in [&text[..], &frac[..]] {
        line.push_str(std::str::from_utf8(part).unwrap_or_default());
    }
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

/// A span as an object: its fields (stored as JSON text by [`SpanFields`]),
/// then `name`.
fn span<S>(line: &mut String, span: &SpanRef<'_, S>)
where
    S: for<'a> LookupSpan<'a>,
{
    line.push('{');
    let ext = span.extensions();
    let stored = ext
        .get::<FormattedFields<SpanFields>>()
        .map_or("", |f| f.fields.as_str());
    // `{"a":1}` -> `"a":1`: the fields are already JSON.
    let inner = stored
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or("")
        .trim();
    if !inner.is_empty() {
        line.push_str(inner);
        line.push(',');
    }
    line.push_str("\"name\":");
    string(line, span.metadata().name());
    line.push('}');
}

/// The request the task serves, as [`span`] writes a `request` span with
/// its `request_id`.
fn request_span(line: &mut String, id: &str) {
    line.push_str("{\"request_id\":");
    string(line, id);
    line.push_str(",\"name\":\"request\"}");
}

/// tracing-subscriber's human format (`Format::default()` with the
/// default fields, as `main` sets it up), with the request the task serves
/// shown as the outermost span, `request{request_id="…"}`, as a real span
/// would be: that format's span list cannot be added to from outside.
#[derive(Debug, Default, Clone, Copy)]
pub struct HumanLine;

impl<S, N> FormatEvent<S, N> for HumanLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The ANSI styles tracing-subscriber gives each part.
        const DIMMED: &str = "2";
        const BOLD: &str = "1";
        const ITALIC: &str = "3";
        let ansi = w.has_ansi_escapes();
        let paint = |w: &mut Writer<'_>, style: &str, text: &str| {
            if ansi {
                write!(w, "\x1b[{style}m{text}\x1b[0m")
            } else {
                w.write_str(text)
            }
        };
        let meta = event.metadata();
        let mut time = String::new();
        timestamp(&mut time, SystemTime::now());
        paint(&mut w, DIMMED, &time)?;
        w.write_char(' ')?;
        let (color, level) = match *meta.level() {
            Level::TRACE => ("35", "TRACE"),
            Level::DEBUG => ("34", "DEBUG"),
            Level::INFO => ("32", " INFO"),
            Level::WARN => ("33", " WARN"),
            Level::ERROR => ("31", "ERROR"),
        };
        paint(&mut w, color, level)?;
        w.write_char(' ')?;
        let mut spans = false;
        if let Some(id) = serving_request() {
            paint(&mut w, BOLD, "request")?;
            paint(&mut w, BOLD, "{")?;
            paint(&mut w, ITALIC, "request_id")?;
            paint(&mut w, DIMMED, "=")?;
            write!(w, "{:?}", id.to_str().unwrap_or_default())?;
            paint(&mut w, BOLD, "}")?;
            paint(&mut w, DIMMED, ":")?;
            spans = true;
        }
        for span in ctx.event_scope().into_iter().flat_map(|s| s.from_root()) {
            paint(&mut w, BOLD, span.metadata().name())?;
            let ext = span.extensions();
            if let Some(fields) = ext.get::<FormattedFields<N>>().filter(|f| !f.is_empty()) {
                paint(&mut w, BOLD, "{")?;
                w.write_str(fields)?;
                paint(&mut w, BOLD, "}")?;
            }
            paint(&mut w, DIMMED, ":")?;
            spans = true;
        }
        if spans {
            w.write_char(' ')?;
        }
        paint(&mut w, DIMMED, meta.target())?;
        paint(&mut w, DIMMED, ":")?;
        w.write_char(' ')?;
        ctx.format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// A span's fields, stored as the JSON object tracing-subscriber's
/// `JsonFields` stores (keys in order, `r#` taken off raw names, `log.`
/// fields left out) for [`JsonLine`] to splice into each line; without its
/// map of `serde_json::Value`s, which cost 2.9k instructions a request.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpanFields;

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut values = SpanValues::default();
        fields.record(&mut values);
        writer.write_str(&values.object())
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        // Rare (a field recorded after its span opened): merged as JSON,
        // in a map whose keys stay in order whatever serde_json's features.
        type Object = std::collections::BTreeMap<String, serde_json::Value>;
        let mut values = SpanValues::default();
        fields.record(&mut values);
        let added: Object = serde_json::from_str(&values.object()).map_err(|_| fmt::Error)?;
        let mut object: Object = serde_json::from_str(&current.fields).unwrap_or_default();
        object.extend(added);
        current.fields = serde_json::to_string(&object).map_err(|_| fmt::Error)?;
        Ok(())
    }
}

/// A span's fields as they are recorded: each name and its `,"name":value`.
#[derive(Default)]
struct SpanValues(Vec<(&'static str, String)>);

impl SpanValues {
    /// Records one field through [`Fields`], under its name less `r#`.
    fn add(&mut self, field: &Field, value: impl FnOnce(&mut Fields<'_>, &'static str)) {
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let mut pair = String::new();
        value(&mut Fields { line: &mut pair }, name);
        self.0.push((name, pair));
    }

    /// `{"a":1,"b":2}`, keys in order, the last value of a name recorded twice.
    fn object(mut self) -> String {
        // Stable: of equal names, the one recorded last comes last.
        self.0.sort_by_key(|(name, _)| *name);
        let mut object = String::from("{");
        for (i, (name, pair)) in self.0.iter().enumerate() {
            if self.0.get(i + 1).is_some_and(|(next, _)| next == name) {
                continue;
            }
            // Each pair starts with the comma that goes before it.
            object.push_str(if object.len() == 1 { &pair[1..] } else { pair });
        }
        object.push('}');
        object
    }
}

impl Visit for SpanValues {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, |f, name| string(f.name(name), value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.add(field, |f, name| f.debug(name, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.add(field, |f, name| f.integer(name, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.add(field, |f, name| f.integer(name, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.add(field, |f, name| f.boolean(name, value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.add(field, |f, name| f.float(name, value));
    }
}

/// Writes each recorded field as `,"name":value`.
struct Fields<'a> {
    line: &'a mut String,
}

impl Fields<'_> {
    /// Writes `,"name":` and returns the line for the value.
    fn name(&mut self, name: &str) -> &mut String {
        self.line.push(',');
        string(self.line, name);
        self.line.push(':');
        self.line
    }

    fn debug(&mut self, name: &str, value: &dyn fmt::Debug) {
        let line = self.name(name);
        line.push('"');
        // Into a String, only a `Debug` that fails can fail; the string
        // is closed whatever it wrote.
        let _ = write!(Escaped(line), "{value:?}");
        line.push('"');
    }

    fn integer(&mut self, name: &str, value: impl itoa::Integer) {
        self.name(name).push_str(itoa::Buffer::new().format(value));
    }

    fn boolean(&mut self, name: &str, value: bool) {
        self.name(name)
            .push_str(if value { "true" } else { "false" });
    }

    fn float(&mut self, name: &str, value: f64) {
        let line = self.name(name);
        // serde_json writes what JSON cannot hold as null.
        if value.is_finite() {
            let _ = write!(line, "{value:?}");
        } else {
            line.push_str("null");
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        string(self.name(field.name()), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.debug(field.name(), value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.integer(field.name(), value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.integer(field.name(), value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.boolean(field.name(), value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.float(field.name(), value);
    }
}

/// A JSON string literal.
fn string(line: &mut String, s: &str) {
    line.push('"');
    escape(line, s);
    line.push('"');
}

/// `s` as the inside of a JSON string, escaped as serde_json escapes:
/// `"`, `\` and control characters.
fn escape(line: &mut String, s: &str) {
    // Nearly every string needs nothing escaped: one pass to see that.
    if !tollgate_core::json::needs_escape(s.as_bytes()) {
        line.push_str(s);
        return;
    }
    // What needs escaping, serde_json escapes, as the journal's lines do
    // (a `str` always serializes); its quotes are left out.
    let quoted = serde_json::to_string(s).unwrap_or_default();
    if let Some(inside) = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
        line.push_str(inside);
    }
}

/// Escapes what is formatted through it (a `Debug` value) into a line.
struct Escaped<'a>(&'a mut String);

impl Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape(self.0, s);
        Ok(())
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
        let typed = tracing::info_span!(
            "typed",
            zeta = 1u64,
            r#type = "raw",
            ok = false,
            share = 0.5f64,
            delta = -2i64,
            dbg = ?["a"],
            later = tracing::field::Empty
        );
        typed.record("later", 9i64);
        typed.record("zeta", "again");
        let _typed = typed.enter();
        tracing::info!("typed");
    }

    /// Events inside a request, whose id stands as a `request` span: a real
    /// one, or the task's (as the gateway serves requests).
    fn emit_in_request(real_span: bool) {
        let inside = || {
            tracing::warn!(status = 502u64, "upstream \"failed\"");
            let settle = tracing::info_span!("settle", account = "acct");
            let _settle = settle.enter();
            tracing::info!(cost = 7u64, "settled");
        };
        if real_span {
            let request = tracing::info_span!("request", request_id = "req_9\"");
            let _request = request.enter();
            inside();
        } else {
            let id = http::HeaderValue::from_static("req_9\"");
            tollgate_gateway::server::as_serving(id, inside);
        }
        tracing::info!("after the request");
    }

    /// The lines written, each checked to be JSON, timestamps blanked.
    fn captured(json_line: bool, emit: fn()) -> String {
        let lines = Lines::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(false);
        if json_line {
            // As `main` sets it up.
            let subscriber = builder
                .fmt_fields(SpanFields)
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
            if ours {
                timestamp(&mut s, SystemTime::now());
            } else {
                tracing_subscriber::fmt::time::SystemTime
                    .format_time(&mut Writer::new(&mut s))
                    .expect("written");
            }
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
        timestamp(&mut first, t);
        let mut again = String::new();
        timestamp(&mut again, t);
        assert_eq!(first, again);
    }

    /// Human lines, timestamps blanked.
    fn captured_human(human_line: bool, ansi: bool, emit: fn()) -> String {
        let lines = Lines::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(ansi);
        if human_line {
            let subscriber = builder.event_format(HumanLine).finish();
            tracing::subscriber::with_default(subscriber, emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("UTF-8");
        let start = if ansi { "\x1b[2m".len() } else { 0 };
        let is_time = |t: &[u8]| t.len() == 27 && t[4] == b'-' && t[10] == b'T' && t[26] == b'Z';
        let mut blanked = String::new();
        for line in text.lines() {
            // A line of its own, or the rest of a field's text after a newline.
            match line.get(start..start + 27) {
                Some(time) if is_time(time.as_bytes()) => {
                    blanked.push_str(&line.replacen(time, "T", 1));
                }
                _ => blanked.push_str(line),
            }
            blanked.push('\n');
        }
        blanked
    }

    #[test]
    fn lines_are_byte_for_byte_what_tracing_subscribers_json_format_writes() {
        let ours = captured(true, emit);
        assert_eq!(ours.lines().count(), 4, "{ours}");
        assert_eq!(ours, captured(false, emit));
    }

    #[test]
    fn the_request_a_task_serves_is_written_as_a_request_span() {
        let ours = captured(true, || emit_in_request(false));
        assert_eq!(ours.lines().count(), 3, "{ours}");
        assert!(ours.contains(r#""spans":[{"request_id":"req_9\"","name":"request"},"#));
        assert_eq!(ours, captured(false, || emit_in_request(true)));
        for ansi in [false, true] {
            let ours = captured_human(true, ansi, || emit_in_request(false));
            assert_eq!(ours.lines().count(), 3, "{ours}");
            assert_eq!(ours, captured_human(false, ansi, || emit_in_request(true)));
        }
    }

    #[test]
    fn human_lines_are_byte_for_byte_what_tracing_subscribers_format_writes() {
        for ansi in [false, true] {
            let ours = captured_human(true, ansi, emit);
            let events = ours
                .lines()
                .filter(|l| l.starts_with("T ") || l.starts_with("\x1b[2mT\x1b[0m "));
            assert_eq!(events.count(), 4, "{ours}");
            assert!(ours.contains("acct2"), "span fields: {ours}");
            assert_eq!(ours, captured_human(false, ansi, emit));
        }
    }
}
