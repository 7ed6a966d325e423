//! The price table: what a million tokens of each model cost, in and out,
//! and the cost of one request from its token counts.

use super::{Micros, TokenUsage, parse_usd};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// The table shipped with Tollgate (`data/prices.toml`).
const SHIPPED: &str = include_str!("../../data/prices.toml");

/// Prices of one model, in micro-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    /// Uncached input.
    pub input: Micros,
    /// Input served from the provider's prompt cache.
    pub cached_input: Micros,
    /// Output.
    pub output: Micros,
}

impl Price {
    /// The cost of `usage`, rounded up to the next micro-USD so that no
    /// request is free by rounding.
    pub fn cost(&self, usage: TokenUsage) -> Micros {
        let cached = usage.cached_input.min(usage.input);
        let per_million = i128::from(usage.input - cached) * i128::from(self.input)
            + i128::from(cached) * i128::from(self.cached_input)
            + i128::from(usage.output) * i128::from(self.output);
        let micros = (per_million + 999_999).div_euclid(1_000_000);
        Micros::try_from(micros).unwrap_or(Micros::MAX)
    }
}

/// A price as written in TOML: decimal dollars per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceText {
    /// Input, e.g. `"2.50"`.
    pub input: String,
    /// Cached input; defaults to the input price.
    #[serde(default)]
    pub cached_input: Option<String>,
    /// Output.
    pub output: String,
}

impl PriceText {
    fn parse(&self, model: &str) -> Result<Price, PricesError> {
        let read = |field: &'static str, text: &str| {
            parse_usd(text)
                .ok()
                .filter(|m| *m >= 0)
                .ok_or_else(|| PricesError::Amount {
                    model: model.to_owned(),
                    field,
                    text: text.to_owned(),
                })
        };
        let input = read("input", &self.input)?;
        Ok(Price {
            input,
            cached_input: match &self.cached_input {
                Some(t) => read("cached_input", t)?,
                None => input,
            },
            output: read("output", &self.output)?,
        })
    }
}

/// A price table entry that does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricesError {
    /// A price is not a non-negative dollar amount.
    #[error("price of `{model}`: {field} = `{text}` is not a dollar amount like \"2.50\"")]
    Amount {
        /// The model.
        model: String,
        /// The field.
        field: &'static str,
        /// What was written.
        text: String,
    },
    /// The shipped table does not parse (a build mistake).
    #[error("the shipped price table does not parse: {0}")]
    Shipped(String),
}

#[derive(Deserialize)]
struct PriceFile {
    models: BTreeMap<String, PriceText>,
}

/// Model name → price: the shipped table with the config's entries laid over.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    /// foldhash: the table is looked up on every charged request.
    prices: HashMap<String, Price, foldhash::fast::RandomState>,
}

impl PriceTable {
    /// The shipped table, overridden and extended by `overrides`.
    pub fn with_overrides(overrides: &BTreeMap<String, PriceText>) -> Result<Self, PricesError> {
        let shipped: PriceFile =
            toml::from_str(SHIPPED).map_err(|e| PricesError::Shipped(e.to_string()))?;
        let mut prices = HashMap::default();
        for (model, text) in shipped.models.iter().chain(overrides) {
            prices.insert(model.clone(), text.parse(model)?);
        }
        Ok(Self { prices })
    }

    /// The price of `model`: its own entry, else that of the base name of a
    /// dated snapshot (`gpt-4o-2024-08-06` → `gpt-4o`).
    pub fn get(&self, model: &str) -> Option<Price> {
        if let Some(p) = self.prices.get(model) {
            return Some(*p);
        }
        // Strip trailing dash-separated parts that are all digits (dates,
        // `0613`) or `latest`, one at a time; never a word like `mini`, which
        // would price a different model as its sibling.
        let mut name = model;
        while let Some((base, tail)) = name.rsplit_once('-') {
            if !(tail == "latest" || (!tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit())))
            {
                return None;
            }
            if let Some(p) = self.prices.get(base) {
                return Some(*p);
            }
            name = base;
        }
        None
    }

    /// How many models have a price.
    pub fn len(&self) -> usize {
        self.prices.len()
    }

    /// No model has a price.
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> PriceTable {
        PriceTable::with_overrides(&BTreeMap::new()).expect("shipped table parses")
    }

    #[test]
    fn the_shipped_table_reads() {
        let t = shipped();
        assert!(t.len() > 20);
        assert_eq!(
            t.get("gpt-4o-mini"),
            Some(Price {
                input: 150_000,
                cached_input: 75_000,
                output: 600_000
            })
        );
        // No cached price written: cached tokens cost the input price.
        let p = t.get("gpt-3.5-turbo").expect("priced");
        assert_eq!(p.cached_input, p.input);
    }

    #[test]
    fn snapshots_take_their_base_price_but_siblings_do_not() {
        let t = shipped();
        assert_eq!(t.get("gpt-4o-2024-08-06"), t.get("gpt-4o"));
        assert_eq!(t.get("gpt-4o-mini-2024-07-18"), t.get("gpt-4o-mini"));
        assert_eq!(t.get("claude-sonnet-4-20250514"), t.get("claude-sonnet-4"));
        assert_eq!(t.get("gpt-3.5-turbo-0125"), t.get("gpt-3.5-turbo"));
        assert_eq!(t.get("gpt-4o-nano"), None);
        assert_eq!(t.get("llama-3-70b"), None);
    }

    #[test]
    fn overrides_replace_and_extend() {
        let mut o = BTreeMap::new();
        o.insert(
            "gpt-4o".to_owned(),
            PriceText {
                input: "1".into(),
                cached_input: None,
                output: "2".into(),
            },
        );
        o.insert(
            "house-model".to_owned(),
            PriceText {
                input: "0.5".into(),
                cached_input: Some("0.1".into()),
                output: "1.5".into(),
            },
        );
        let t = PriceTable::with_overrides(&o).expect("parses");
        assert_eq!(t.get("gpt-4o").map(|p| p.output), Some(2_000_000));
        assert_eq!(t.get("house-model").map(|p| p.cached_input), Some(100_000));
        o.insert(
            "bad".to_owned(),
            PriceText {
                input: "-1".into(),
                cached_input: None,
                output: "1".into(),
            },
        );
        assert!(PriceTable::with_overrides(&o).is_err());
    }

    #[test]
    fn cost_is_exact_and_rounds_up() {
        let p = Price {
            input: 2_500_000,
            cached_input: 1_250_000,
            output: 10_000_000,
        };
        // 1000 in ($0.0025) + 500 out ($0.005) = $0.0075.
        let u = TokenUsage {
            input: 1000,
            cached_input: 0,
            output: 500,
        };
        assert_eq!(p.cost(u), 7_500);
        // 400 of the 1000 cached: 600 × 2.5 + 400 × 1.25 = 2000 µ$ in.
        let u = TokenUsage {
            cached_input: 400,
            ..u
        };
        assert_eq!(p.cost(u), 2_000 + 5_000);
        // One gpt-4o-mini input token is 0.15 µ$: charged as 1.
        let mini = shipped().get("gpt-4o-mini").expect("priced");
        let one = TokenUsage {
            input: 1,
            ..TokenUsage::default()
        };
        assert_eq!(mini.cost(one), 1);
        assert_eq!(mini.cost(TokenUsage::default()), 0);
    }
}
