//! Money: integer micro-USD amounts, the price table, and budget windows on
//! the UTC calendar. No floats anywhere in accounting: an amount is an
//! `i64` of micro-USD (1 = $0.000001), parsed from and printed as decimal
//! text.

mod budget;
mod prices;
mod window;

pub use budget::{Budget, EVERY_USER, check_scope};
pub use prices::{Price, PriceTable, PriceText, PricesError};
pub use window::{Window, format_utc, parse_utc_date};

use std::fmt;

/// An amount of money in micro-USD (1 = $0.000001).
pub type Micros = i64;

/// Micro-USD in one dollar.
pub const MICROS_PER_USD: Micros = 1_000_000;

/// An amount that is not a decimal dollar figure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a dollar amount like \"25.00\" (at most 6 decimals)")]
pub struct AmountError(pub String);

/// Parses `"25.00"`, `"$0.01"`, `"0.000150"` or `"-3"` into micro-USD,
/// exactly: digits are read as digits, never through a float.
pub fn parse_usd(text: &str) -> Result<Micros, AmountError> {
    let bad = || AmountError(text.chars().take(40).collect());
    let t = text.trim();
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let t = t.strip_prefix('$').unwrap_or(t);
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) || frac.len() > 6 {
        return Err(bad());
    }
    let whole: Micros = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let mut frac_micros: Micros = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_micros += Micros::from(b - b'0') * 10_i64.pow(5 - i as u32);
    }
    let amount = whole
        .checked_mul(MICROS_PER_USD)
        .and_then(|w| w.checked_add(frac_micros))
        .ok_or_else(bad)?;
    Ok(if negative { -amount } else { amount })
}

/// Shows micro-USD as dollars with six decimals (`0.000150`), the form the
/// headers and error bodies use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usd(pub Micros);

/// Room for any `i64` of micro-USD as dollars: sign, 13 digits, point, 6.
pub const USD_TEXT_MAX: usize = 21;

impl Usd {
    /// The text, written into `buf` without the `fmt` machinery (three
    /// response headers per charged request use it).
    pub fn text(self, buf: &mut [u8; USD_TEXT_MAX]) -> &str {
        let abs = self.0.unsigned_abs();
        let per = MICROS_PER_USD as u64;
        let mut len = 0;
        let mut put = |bytes: &[u8]| {
            buf[len..len + bytes.len()].copy_from_slice(bytes);
            len += bytes.len();
        };
        if self.0 < 0 {
            put(b"-");
        }
        put(itoa::Buffer::new().format(abs / per).as_bytes());
        put(b".");
        let mut frac = itoa::Buffer::new();
        let frac = frac.format(abs % per).as_bytes();
        put(&b"000000"[frac.len()..]);
        put(frac);
        // Only ASCII digits, '-' and '.' were written.
        std::str::from_utf8(&buf[..len]).unwrap_or_default()
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text(&mut [0; USD_TEXT_MAX]))
    }
}

/// Token counts of one request, as the provider reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    /// Input tokens, cached ones included.
    pub input: u64,
    /// Of the input, tokens served from the provider's prompt cache.
    pub cached_input: u64,
    /// Output tokens.
    pub output: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dollars_exactly() {
        assert_eq!(parse_usd("25.00"), Ok(25_000_000));
        assert_eq!(parse_usd("$0.01"), Ok(10_000));
        assert_eq!(parse_usd("0.000150"), Ok(150));
        assert_eq!(parse_usd(".5"), Ok(500_000));
        assert_eq!(parse_usd("7"), Ok(7_000_000));
        assert_eq!(parse_usd("-1.5"), Ok(-1_500_000));
        for bad in [
            "",
            ".",
            "1.0000001",
            "1e3",
            "abc",
            "1,00",
            "--1",
            "99999999999999999",
        ] {
            assert!(parse_usd(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prints_six_decimals() {
        assert_eq!(Usd(150).to_string(), "0.000150");
        assert_eq!(Usd(25_000_000).to_string(), "25.000000");
        assert_eq!(Usd(-1_500_000).to_string(), "-1.500000");
        assert_eq!(Usd(0).to_string(), "0.000000");
        assert_eq!(Usd(i64::MIN).to_string(), "-9223372036854.775808");
        assert_eq!(Usd(i64::MAX).to_string(), "9223372036854.775807");
    }

    proptest::proptest! {
        #[test]
        fn text_reads_back_as_the_same_amount(micros in proptest::prelude::any::<i64>()) {
            let text = Usd(micros).to_string();
            proptest::prop_assert_eq!(parse_usd(&text).ok(), Some(micros).filter(|m| *m != i64::MIN));
        }
    }
}
