//! The load generator's summary: latency histogram, throughput, errors, as text or one JSON line.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::errors::ErrorCounts;

/// Smallest latency the histogram tells apart, in nanoseconds.
const LOWEST_NS: u64 = 1;
/// Largest latency the histogram tracks, in nanoseconds (60 s); longer ones are clamped to it.
const HIGHEST_NS: u64 = 60_000_000_000;
/// Significant decimal figures kept per recorded value.
const SIGFIG: u8 = 3;

/// A latency histogram in nanoseconds, 1 ns to 60 s with 3 significant figures.
///
/// Values outside the range are clamped into it; recording never fails.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// The latencies, in nanoseconds.
    hist: Histogram<u64>,
}

impl Recorder {
    /// Creates an empty recorder.
    pub fn new() -> Recorder {
        let hist = Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, SIGFIG)
            .expect("constant histogram bounds are valid");
        Recorder { hist }
    }

    /// Records one latency, clamped into 1 ns ..= 60 s.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.hist.saturating_record(ns.clamp(LOWEST_NS, HIGHEST_NS));
    }

    /// Adds all of `other`'s samples to this recorder.
    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms come from `new` with the same bounds, so `add` cannot run out of range;
        // should it ever fail, copy the samples one bucket at a time instead.
        if self.hist.add(&other.hist).is_err() {
            for bucket in other.hist.iter_recorded() {
                self.hist.saturating_record_n(
                    bucket.value_iterated_to().clamp(LOWEST_NS, HIGHEST_NS),
                    bucket.count_at_value(),
                );
            }
        }
    }

    /// Returns how many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Returns the latency at quantile `q` (0.0 ..= 1.0, clamped; NaN reads as 0), or zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        if self.hist.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.hist.value_at_quantile(q))
    }

    /// Returns the largest recorded latency (to the histogram's precision), or zero when empty.
    pub fn max(&self) -> Duration {
        if self.hist.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.hist.max())
    }
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

/// What a load-generator run did, ready to print.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The echo server's address, as given to `--connect`.
    pub server: String,
    /// The port backend the client ran on (`"io_uring"`, `"epoll"`, ...).
    pub backend: String,
    /// Connections opened.
    pub connections: u64,
    /// Messages echoed back in full within the measured window.
    pub messages: u64,
    /// Bytes echoed (and verified) within the measured window.
    pub bytes: u64,
    /// Every byte echoed and verified, including the echoes drained after the window.
    pub verified: u64,
    /// Opening the connections, before the load.
    pub setup: Duration,
    /// Load before the window (`--warmup`), not counted.
    pub warmup: Duration,
    /// The measured window: from the end of the warm-up (the start of the load, every
    /// connection open, when there is none) to the deadline or the last message.
    pub elapsed: Duration,
    /// Round-trip latency per message.
    pub latency: Recorder,
    /// Failures by kind.
    pub errors: ErrorCounts,
    /// Connections whose echo differed from what was sent (or went past it).
    pub mismatches: u64,
}

impl Summary {
    /// Returns messages per second, or 0 when no time elapsed.
    pub fn messages_per_sec(&self) -> f64 {
        per_sec(self.messages as f64, self.elapsed)
    }

    /// Returns verified megabytes (10^6 bytes) per second, or 0 when no time elapsed.
    pub fn mb_per_sec(&self) -> f64 {
        per_sec(self.bytes as f64 / 1e6, self.elapsed)
    }

    /// Returns `true` when the run had no errors and no mismatched echo.
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.mismatches == 0
    }

    /// Renders a multi-line summary for people, ending in a newline.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        // Writing to a `String` cannot fail.
        let _ = writeln!(s, "server:      {}", self.server);
        let _ = writeln!(s, "backend:     {}", self.backend);
        let _ = writeln!(
            s,
            "connections: {} (opened in {:.3} s)",
            self.connections,
            self.setup.as_secs_f64()
        );
        let _ = writeln!(s, "messages:    {}", self.messages);
        let _ = writeln!(
            s,
            "bytes:       {} ({} verified in all)",
            self.bytes, self.verified
        );
        let _ = write!(s, "elapsed:     {:.3} s", self.elapsed.as_secs_f64());
        if self.warmup > Duration::ZERO {
            let _ = write!(s, " (after {:.3} s of warm-up)", self.warmup.as_secs_f64());
        }
        s.push('\n');
        let _ = writeln!(
            s,
            "throughput:  {:.1} messages/s, {:.2} MB/s",
            self.messages_per_sec(),
            self.mb_per_sec()
        );
        let _ = writeln!(
            s,
            "latency:     p50 {:.1} us, p99 {:.1} us, p999 {:.1} us, max {:.1} us ({} samples)",
            micros(self.latency.quantile(0.50)),
            micros(self.latency.quantile(0.99)),
            micros(self.latency.quantile(0.999)),
            micros(self.latency.max()),
            self.latency.count()
        );
        if self.errors.is_empty() {
            let _ = writeln!(s, "errors:      none");
        } else {
            let _ = writeln!(s, "errors:      {}", self.errors.total());
            for (kind, n) in self.errors.iter() {
                let _ = writeln!(s, "  {n:>9}  {kind}");
            }
        }
        let _ = writeln!(s, "mismatched:  {} connections", self.mismatches);
        s
    }

    /// Renders the summary as one line of JSON, without a trailing newline.
    ///
    /// Keys: `backend`, `connections`, `messages`, `bytes`, `verified_bytes`, `setup_s`,
    /// `warmup_s`, `elapsed_s`, `msgs_per_s`, `mb_per_s`, `p50_us`, `p99_us`, `p999_us`, `max_us`, `errors`
    /// (kind to count), `error_total`, `mismatches`, `ok`. Floats that are not finite are
    /// written as 0.
    pub fn render_json(&self) -> String {
        let mut s = String::from("{");
        s.push_str("\"server\":");
        push_json_str(&mut s, &self.server);
        s.push_str(",\"backend\":");
        push_json_str(&mut s, &self.backend);
        let _ = write!(
            s,
            ",\"connections\":{},\"messages\":{},\"bytes\":{},\"verified_bytes\":{}",
            self.connections, self.messages, self.bytes, self.verified
        );
        let floats = [
            ("setup_s", self.setup.as_secs_f64()),
            ("warmup_s", self.warmup.as_secs_f64()),
            ("elapsed_s", self.elapsed.as_secs_f64()),
            ("msgs_per_s", self.messages_per_sec()),
            ("mb_per_s", self.mb_per_sec()),
            ("p50_us", micros(self.latency.quantile(0.50))),
            ("p99_us", micros(self.latency.quantile(0.99))),
            ("p999_us", micros(self.latency.quantile(0.999))),
            ("max_us", micros(self.latency.max())),
        ];
        for (key, value) in floats {
            let _ = write!(s, ",\"{key}\":{}", json_f64(value));
        }
        s.push_str(",\"errors\":{");
        for (i, (kind, n)) in self.errors.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            push_json_str(&mut s, kind);
            let _ = write!(s, ":{n}");
        }
        let _ = write!(
            s,
            "}},\"error_total\":{},\"mismatches\":{},\"ok\":{}}}",
            self.errors.total(),
            self.mismatches,
            self.ok()
        );
        s
    }
}

/// Returns `amount / elapsed`, or 0 when no time elapsed.
fn per_sec(amount: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

/// Returns `d` in microseconds.
fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Formats a float as a JSON number: fixed point, 3 decimals, 0 for NaN and infinities.
fn json_f64(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.3}")
    } else {
        "0".to_owned()
    }
}

/// Appends `text` as a quoted JSON string, escaping quotes, backslashes and control characters.
fn push_json_str(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if c < ' ' || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// A JSON value, as far as these tests need one.
    #[derive(Debug, PartialEq)]
    enum Json {
        Null,
        Bool(bool),
        Num(f64),
        Str(String),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
    }

    impl Json {
        fn get(&self, key: &str) -> &Json {
            match self {
                Json::Obj(fields) => fields
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v)
                    .unwrap_or_else(|| panic!("missing key {key}")),
                other => panic!("not an object: {other:?}"),
            }
        }

        fn num(&self) -> f64 {
            match self {
                Json::Num(n) => *n,
                other => panic!("not a number: {other:?}"),
            }
        }
    }

    /// A strict little JSON parser (RFC 8259 grammar), so the tests check real validity.
    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn parse(text: &str) -> Result<Json, String> {
            let mut p = Parser {
                s: text.as_bytes(),
                i: 0,
            };
            let v = p.value()?;
            p.ws();
            if p.i != p.s.len() {
                return Err(format!("trailing data at {}", p.i));
            }
            Ok(v)
        }

        fn ws(&mut self) {
            while matches!(self.s.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.i += 1;
            }
        }

        fn eat(&mut self, b: u8) -> Result<(), String> {
            self.ws();
            if self.s.get(self.i) == Some(&b) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected '{}' at {}", b as char, self.i))
            }
        }

        fn lit(&mut self, word: &str, v: Json) -> Result<Json, String> {
            if self.s[self.i..].starts_with(word.as_bytes()) {
                self.i += word.len();
                Ok(v)
            } else {
                Err(format!("bad literal at {}", self.i))
            }
        }

        fn value(&mut self) -> Result<Json, String> {
            self.ws();
            match self.s.get(self.i) {
                Some(b'{') => {
                    self.i += 1;
                    let mut fields = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(Json::Obj(fields));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.eat(b':')?;
                        fields.push((k, self.value()?));
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(Json::Obj(fields));
                            }
                            _ => return Err(format!("bad object at {}", self.i)),
                        }
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    let mut items = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(Json::Arr(items));
                    }
                    loop {
                        items.push(self.value()?);
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(Json::Arr(items));
                            }
                            _ => return Err(format!("bad array at {}", self.i)),
                        }
                    }
                }
                Some(b'"') => Ok(Json::Str(self.string()?)),
                Some(b't') => self.lit("true", Json::Bool(true)),
                Some(b'f') => self.lit("false", Json::Bool(false)),
                Some(b'n') => self.lit("null", Json::Null),
                Some(b'-' | b'0'..=b'9') => self.number(),
                _ => Err(format!("unexpected input at {}", self.i)),
            }
        }

        fn number(&mut self) -> Result<Json, String> {
            let start = self.i;
            if self.s[self.i] == b'-' {
                self.i += 1;
            }
            let digits = |p: &mut Self| {
                let from = p.i;
                while p.s.get(p.i).is_some_and(u8::is_ascii_digit) {
                    p.i += 1;
                }
                p.i - from
            };
            let int_start = self.i;
            match digits(self) {
                0 => return Err(format!("bad number at {start}")),
                n if n > 1 && self.s[int_start] == b'0' => {
                    return Err(format!("leading zero at {start}"))
                }
                _ => {}
            }
            if self.s.get(self.i) == Some(&b'.') {
                self.i += 1;
                if digits(self) == 0 {
                    return Err(format!("bad fraction at {start}"));
                }
            }
            if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
                self.i += 1;
                if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                    self.i += 1;
                }
                if digits(self) == 0 {
                    return Err(format!("bad exponent at {start}"));
                }
            }
            let text = std::str::from_utf8(&self.s[start..self.i]).unwrap();
            text.parse().map(Json::Num).map_err(|e| e.to_string())
        }

        fn string(&mut self) -> Result<String, String> {
            if self.s.get(self.i) != Some(&b'"') {
                return Err(format!("expected string at {}", self.i));
            }
            self.i += 1;
            let mut out = Vec::new();
            loop {
                let b = *self.s.get(self.i).ok_or("unterminated string")?;
                self.i += 1;
                match b {
                    b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                    b'\\' => {
                        let e = *self.s.get(self.i).ok_or("bad escape")?;
                        self.i += 1;
                        let c = match e {
                            b'"' => '"',
                            b'\\' => '\\',
                            b'/' => '/',
                            b'b' => '\u{08}',
                            b'f' => '\u{0c}',
                            b'n' => '\n',
                            b'r' => '\r',
                            b't' => '\t',
                            b'u' => {
                                let hex = self.s.get(self.i..self.i + 4).ok_or("short \\u")?;
                                self.i += 4;
                                let hex = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
                                let code =
                                    u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                                char::from_u32(code).ok_or("surrogate")?
                            }
                            _ => return Err(format!("bad escape at {}", self.i)),
                        };
                        let mut buf = [0; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                    0..=0x1f => return Err(format!("raw control char at {}", self.i - 1)),
                    _ => out.push(b),
                }
            }
        }
    }

    fn sample() -> Summary {
        let mut latency = Recorder::new();
        for us in 1..=1000u64 {
            latency.record(Duration::from_micros(us));
        }
        let mut errors = ErrorCounts::default();
        errors.add(&io::Error::from_raw_os_error(libc::ECONNRESET));
        errors.add_kind("say \"hi\"\\\n\u{1}");
        Summary {
            server: "[::1]:5150".to_owned(),
            backend: "io_uring".to_owned(),
            connections: 4,
            messages: 2_000_000,
            bytes: 50_000_000,
            verified: 50_001_000,
            setup: Duration::from_millis(250),
            warmup: Duration::from_millis(500),
            elapsed: Duration::from_secs(2),
            latency,
            errors,
            mismatches: 3,
        }
    }

    #[test]
    fn recorder_quantiles_are_monotonic_and_accurate() {
        let s = sample();
        let qs = [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0];
        let values: Vec<Duration> = qs.iter().map(|&q| s.latency.quantile(q)).collect();
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
        assert!(values[6] <= s.latency.max());
        // 3 significant figures: within 0.1 % of the true value.
        let p50 = s.latency.quantile(0.5).as_nanos() as f64;
        assert!((p50 - 500_000.0).abs() <= 500.0, "p50 {p50}");
        let max = s.latency.max().as_nanos() as f64;
        assert!((max - 1_000_000.0).abs() <= 1_000.0, "max {max}");
        assert_eq!(s.latency.count(), 1000);
    }

    #[test]
    fn recorder_clamps_and_handles_empty() {
        let mut r = Recorder::new();
        assert_eq!(r.quantile(0.5), Duration::ZERO);
        assert_eq!(r.max(), Duration::ZERO);
        r.record(Duration::ZERO);
        r.record(Duration::from_secs(3600));
        r.record(Duration::MAX);
        assert_eq!(r.count(), 3);
        assert!(r.quantile(0.0) <= Duration::from_nanos(1));
        let max = r.max();
        assert!(
            max >= Duration::from_secs(59) && max <= Duration::from_secs(61),
            "{max:?}"
        );
        // Out-of-range quantiles are clamped, NaN reads as 0.
        assert_eq!(r.quantile(2.0), r.quantile(1.0));
        assert_eq!(r.quantile(f64::NAN), r.quantile(0.0));
    }

    #[test]
    fn recorder_merge_adds_counts() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        for _ in 0..10 {
            a.record(Duration::from_micros(10));
        }
        for _ in 0..30 {
            b.record(Duration::from_millis(5));
        }
        a.merge(&b);
        assert_eq!(a.count(), 40);
        assert_eq!(b.count(), 30);
        assert!(a.quantile(0.2) < Duration::from_micros(11));
        assert!(a.quantile(0.5) > Duration::from_millis(4));
    }

    #[test]
    fn rates_and_zero_elapsed() {
        let mut s = sample();
        assert!((s.messages_per_sec() - 1_000_000.0).abs() < 1e-6);
        assert!((s.mb_per_sec() - 25.0).abs() < 1e-9);
        s.elapsed = Duration::ZERO;
        assert_eq!(s.messages_per_sec(), 0.0);
        assert_eq!(s.mb_per_sec(), 0.0);
        let json = Parser::parse(&s.render_json()).unwrap();
        assert_eq!(json.get("msgs_per_s"), &Json::Num(0.0));
    }

    #[test]
    fn json_is_valid_one_line_with_all_keys() {
        let s = sample();
        let text = s.render_json();
        assert!(!text.contains('\n'), "{text}");
        let json = Parser::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let Json::Obj(fields) = &json else {
            panic!("not an object")
        };
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server",
                "backend",
                "connections",
                "messages",
                "bytes",
                "verified_bytes",
                "setup_s",
                "warmup_s",
                "elapsed_s",
                "msgs_per_s",
                "mb_per_s",
                "p50_us",
                "p99_us",
                "p999_us",
                "max_us",
                "errors",
                "error_total",
                "mismatches",
                "ok"
            ]
        );
        assert_eq!(json.get("backend"), &Json::Str("io_uring".into()));
        assert_eq!(json.get("connections").num(), 4.0);
        assert_eq!(json.get("bytes").num(), 50_000_000.0);
        assert_eq!(json.get("verified_bytes").num(), 50_001_000.0);
        assert_eq!(json.get("setup_s").num(), 0.25);
        assert_eq!(json.get("warmup_s").num(), 0.5);
        assert_eq!(json.get("elapsed_s").num(), 2.0);
        assert_eq!(json.get("mb_per_s").num(), 25.0);
        let p50 = json.get("p50_us").num();
        assert!((p50 - 500.0).abs() <= 1.0, "{p50}");
        assert!(json.get("p999_us").num() <= json.get("max_us").num());
        assert_eq!(json.get("error_total").num(), 2.0);
        assert_eq!(json.get("mismatches").num(), 3.0);
        assert_eq!(json.get("ok"), &Json::Bool(false));
        // The awkward kind name survives the round trip.
        assert_eq!(
            json.get("errors"),
            &Json::Obj(vec![
                (
                    "connection reset by peer (ECONNRESET)".into(),
                    Json::Num(1.0)
                ),
                ("say \"hi\"\\\n\u{1}".into(), Json::Num(1.0)),
            ])
        );
        assert!(text.contains(r#""say \"hi\"\\\n\u0001""#), "{text}");
    }

    #[test]
    fn json_escapes_backend_and_clean_run_is_ok() {
        let s = Summary {
            backend: "tab\there \"quoted\"".to_owned(),
            ..Summary::default()
        };
        assert!(s.ok());
        let text = s.render_json();
        let json = Parser::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(
            json.get("backend"),
            &Json::Str("tab\there \"quoted\"".into())
        );
        assert_eq!(json.get("errors"), &Json::Obj(vec![]));
        assert_eq!(json.get("ok"), &Json::Bool(true));
        assert_eq!(json.get("max_us").num(), 0.0);
    }

    #[test]
    fn json_floats_are_never_nan_or_inf() {
        assert_eq!(json_f64(f64::NAN), "0");
        assert_eq!(json_f64(f64::INFINITY), "0");
        assert_eq!(json_f64(f64::NEG_INFINITY), "0");
        assert_eq!(json_f64(1.25), "1.250");
        assert!(Parser::parse(&json_f64(1e300)).is_ok());
    }

    #[test]
    fn parser_rejects_invalid_json() {
        for bad in [
            "{",
            "{\"a\":}",
            "{\"a\":NaN}",
            "{\"a\":1,}",
            "\"\u{1}\"",
            "01",
        ] {
            assert!(Parser::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn text_lists_everything() {
        let text = sample().render_text();
        for needle in [
            "server:      [::1]:5150",
            "connections: 4",
            "messages:    2000000",
            "bytes:       50000000",
            "elapsed:     2.000 s",
            "1000000.0 messages/s",
            "25.00 MB/s",
            "p50 500.",
            "p99 99",
            "max 100",
            "errors:      2",
            "connection reset by peer (ECONNRESET)",
            "mismatched:  3 connections",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        let clean = Summary::default().render_text();
        assert!(clean.contains("errors:      none"), "{clean}");
        assert!(clean.contains("p50 0.0 us"), "{clean}");
    }
}
