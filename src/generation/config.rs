//! The generation section of the configuration; `crate::config` reads it from the
//! environment (`DEVGATE_GENERATION_*`).

use std::{collections::BTreeMap, str::FromStr, time::Duration};

/// The kinds devgate sells: each kind's price per output and the formats it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindCatalog(BTreeMap<String, KindSpec>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindSpec {
    /// Credits per output.
    pub price: i64,
    pub formats: Vec<String>,
}

impl KindCatalog {
    /// Joins the price table and the format table: every priced kind needs formats and
    /// every kind with formats a price, so a typo in one table cannot go unnoticed.
    pub fn new(prices: Prices, formats: Formats) -> Result<Self, String> {
        let mut kinds = BTreeMap::new();
        for (kind, price) in prices.0 {
            let Some(f) = formats.0.get(&kind) else {
                return Err(format!("kind {kind:?} has a price but no formats"));
            };
            kinds.insert(
                kind,
                KindSpec {
                    price,
                    formats: f.clone(),
                },
            );
        }
        if let Some(kind) = formats.0.keys().find(|k| !kinds.contains_key(*k)) {
            return Err(format!("kind {kind:?} has formats but no price"));
        }
        Ok(KindCatalog(kinds))
    }

    pub fn get(&self, kind: &str) -> Option<&KindSpec> {
        self.0.get(kind)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// `DEVGATE_GENERATION_PRICES`: `kind=credits,…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prices(pub BTreeMap<String, i64>);

/// `DEVGATE_GENERATION_FORMATS`: `kind=fmt|fmt,…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formats(pub BTreeMap<String, Vec<String>>);

/// The longest kind and format names the generations table holds.
const MAX_KIND_LEN: usize = 50;
const MAX_FORMAT_LEN: usize = 20;
/// A price above this × 8 outputs could not be charged in one debit without overflow risk
/// in sums; no real price comes near it.
const MAX_PRICE: i64 = 1_000_000_000;

fn name(s: &str, max: usize, what: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{what} {s:?}: 1 to {max} characters of a-z, 0-9 and _"
        ))
    }
}

/// `key=value` pairs separated by commas, each key once.
fn pairs(s: &str) -> Result<Vec<(String, &str)>, String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!("{part:?}: expected kind=value"));
        };
        let k = name(k.trim(), MAX_KIND_LEN, "kind")?;
        if !seen.insert(k.clone()) {
            return Err(format!("kind {k:?} is listed twice"));
        }
        out.push((k, v.trim()));
    }
    if out.is_empty() {
        return Err("at least one kind is required".into());
    }
    Ok(out)
}

impl FromStr for Prices {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        pairs(s)?
            .into_iter()
            .map(|(k, v)| match v.parse::<i64>() {
                Ok(p) if (1..=MAX_PRICE).contains(&p) => Ok((k, p)),
                _ => Err(format!(
                    "price of {k:?}: expected whole credits from 1 to {MAX_PRICE}, got {v:?}"
                )),
            })
            .collect::<Result<_, _>>()
            .map(Prices)
    }
}

impl FromStr for Formats {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        pairs(s)?
            .into_iter()
            .map(|(k, v)| {
                let formats = v
                    .split('|')
                    .map(|f| name(f.trim(), MAX_FORMAT_LEN, "format"))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((k, formats))
            })
            .collect::<Result<_, _>>()
            .map(Formats)
    }
}

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub kinds: KindCatalog,
    /// The orchestrator's jobs exchange (topic): jobs and cancels are published to it.
    pub jobs_exchange: String,
    /// A generation with no terminal update within this long is failed and refunded.
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_make_a_catalog() {
        let prices: Prices = "image=10,image_hd=25,video=100,audio=20,text=2"
            .parse()
            .unwrap();
        let formats: Formats =
            "image=png|jpeg|webp,image_hd=png|jpeg|webp,video=mp4|webm,audio=mp3|wav,text=txt|md"
                .parse()
                .unwrap();
        let catalog = KindCatalog::new(prices, formats).unwrap();
        let video = catalog.get("video").unwrap();
        assert_eq!(video.price, 100);
        assert_eq!(video.formats, ["mp4", "webm"]);
        assert_eq!(catalog.names().count(), 5);
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!("image=0".parse::<Prices>().is_err());
        assert!("image=ten".parse::<Prices>().is_err());
        assert!("image=1,image=2".parse::<Prices>().is_err());
        assert!("Image=1".parse::<Prices>().is_err());
        assert!("".parse::<Prices>().is_err());
        assert!("image=png|".parse::<Formats>().is_err());
        let prices: Prices = "image=1,video=2".parse().unwrap();
        let formats: Formats = "image=png".parse().unwrap();
        assert!(KindCatalog::new(prices.clone(), formats).is_err());
        let formats: Formats = "image=png,video=mp4,audio=mp3".parse().unwrap();
        assert!(KindCatalog::new(prices, formats).is_err());
    }
}
