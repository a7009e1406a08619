//! Sizes, durations and rates as operators write them (`"256MiB"`, `"30s"`, `"100/s"`).
//!
//! Every key that takes one of these parses it here, so `"5m"` means the same thing in
//! `[cache]` as in `[queue]`. Values serialize back to the canonical spelling so
//! `keel check-config` prints what was understood, not what was typed.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes, written as an integer or as `"64KiB"`, `"256MiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A non-negative span of time, written as `"500ms"`, `"30s"`, `"5m"`, `"1h30m"`, `"1d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Span(pub Duration);

/// Events per period, written as `"100/s"`, `"20/m"`, `"1000/h"`, `"5000/d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

const SIZE_UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

const SIZE_EXPECTED: &str = "a size such as 65536, \"64KiB\", \"256MiB\" or \"1GB\"";
const SPAN_EXPECTED: &str = "a duration such as \"500ms\", \"30s\", \"5m\", \"1h30m\" or \"1d\"";
const RATE_EXPECTED: &str = "a rate such as \"100/s\", \"20/m\", \"1000/h\" or \"5000/d\"";

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        if number.is_empty() {
            return Err(format!("invalid size {text:?}; expected {SIZE_EXPECTED}"));
        }
        let unit = unit.trim().to_ascii_lowercase();
        let multiplier = if unit.is_empty() {
            1
        } else {
            SIZE_UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, m)| *m)
                .ok_or_else(|| {
                    format!("unknown size unit {unit:?} in {text:?}; expected {SIZE_EXPECTED}")
                })?
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("invalid size {text:?}; expected {SIZE_EXPECTED}"))?;
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(format!("size {text:?} is too large"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, multiplier) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= multiplier && self.0.is_multiple_of(multiplier) {
                return write!(f, "{}{name}", self.0 / multiplier);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            return Err(format!("negative duration {text:?} is not allowed"));
        }
        if trimmed.is_empty() {
            return Err(format!("empty duration; expected {SPAN_EXPECTED}"));
        }
        let mut total = Duration::ZERO;
        let mut rest = trimmed;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!(
                    "invalid duration {text:?}; expected {SPAN_EXPECTED}"
                ));
            }
            let (number, after) = rest.split_at(digits);
            let unit_len = after
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_len);
            let seconds_per_unit = match unit.trim() {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3_600.0,
                "d" => 86_400.0,
                "" => return Err(format!("duration {text:?} needs a unit (ms, s, m, h or d)")),
                other => {
                    return Err(format!(
                        "unknown duration unit {other:?} in {text:?}; expected {SPAN_EXPECTED}"
                    ));
                }
            };
            let value: f64 = number
                .parse()
                .map_err(|_| format!("invalid duration {text:?}; expected {SPAN_EXPECTED}"))?;
            total += Duration::try_from_secs_f64(value * seconds_per_unit)
                .map_err(|_| format!("duration {text:?} is out of range"))?;
            rest = after;
        }
        Ok(Span(total))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        if !millis.is_multiple_of(1000) {
            return write!(f, "{millis}ms");
        }
        let seconds = millis / 1000;
        for (name, unit) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if seconds.is_multiple_of(unit) {
                return write!(f, "{}{name}", seconds / unit);
            }
        }
        write!(f, "{seconds}s")
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (count, period) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("invalid rate {text:?}; expected {RATE_EXPECTED}"))?;
        let count: u32 = count.trim().parse().map_err(|_| {
            format!(
                "invalid rate {text:?}: the count must be a whole number; expected {RATE_EXPECTED}"
            )
        })?;
        if count == 0 {
            return Err(format!("rate {text:?} must allow at least one event"));
        }
        let per = match period.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3_600),
            "d" | "day" => Duration::from_secs(86_400),
            other => {
                return Err(format!(
                    "unknown rate period {other:?} in {text:?}; expected {RATE_EXPECTED}"
                ));
            }
        };
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let period = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            3_600 => "h",
            _ => "d",
        };
        write!(f, "{}/{period}", self.count)
    }
}

/// Serde glue shared by the three types: they are written as strings (sizes also as
/// integers) and printed back in canonical form.
macro_rules! string_serde {
    ($ty:ty, $expected:expr, $accepts_integer:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct UnitVisitor;
                impl Visitor<'_> for UnitVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expected)
                    }
                    fn visit_str<E: de::Error>(self, text: &str) -> Result<$ty, E> {
                        text.parse().map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, number: i64) -> Result<$ty, E> {
                        if !$accepts_integer {
                            return Err(E::invalid_type(de::Unexpected::Signed(number), &self));
                        }
                        if number < 0 {
                            return Err(E::custom(format!(
                                "negative value {number} is not allowed"
                            )));
                        }
                        number.to_string().parse().map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, number: u64) -> Result<$ty, E> {
                        if !$accepts_integer {
                            return Err(E::invalid_type(de::Unexpected::Unsigned(number), &self));
                        }
                        number.to_string().parse().map_err(E::custom)
                    }
                }
                deserializer.deserialize_any(UnitVisitor)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
    };
}

string_serde!(ByteSize, SIZE_EXPECTED, true);
string_serde!(Span, SPAN_EXPECTED, false);
string_serde!(Rate, RATE_EXPECTED, false);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("256MiB".parse::<ByteSize>().unwrap().0, 256 << 20);
        assert_eq!("64 KiB".parse::<ByteSize>().unwrap().0, 64 << 10);
        assert_eq!("1GB".parse::<ByteSize>().unwrap().0, 1_000_000_000);
        assert_eq!("1.5KiB".parse::<ByteSize>().unwrap().0, 1536);
        assert_eq!("42".parse::<ByteSize>().unwrap().0, 42);
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn spans() {
        assert_eq!("30s".parse::<Span>().unwrap().0, Duration::from_secs(30));
        assert_eq!(
            "1h30m".parse::<Span>().unwrap().0,
            Duration::from_secs(5400)
        );
        assert_eq!(
            "250ms".parse::<Span>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!("1d".parse::<Span>().unwrap().0, Duration::from_secs(86_400));
        assert!("-5s".parse::<Span>().unwrap_err().contains("negative"));
        assert!("5".parse::<Span>().unwrap_err().contains("unit"));
        assert!("5 fortnights".parse::<Span>().is_err());
        assert_eq!(Span(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!(Span(Duration::from_millis(1500)).to_string(), "1500ms");
    }

    #[test]
    fn rates() {
        let rate: Rate = "100/s".parse().unwrap();
        assert_eq!((rate.count, rate.per), (100, Duration::from_secs(1)));
        assert_eq!("20/minute".parse::<Rate>().unwrap().to_string(), "20/m");
        assert!(
            "100/fortnight"
                .parse::<Rate>()
                .unwrap_err()
                .contains("fortnight")
        );
        assert!("0/s".parse::<Rate>().is_err());
        assert!("many/s".parse::<Rate>().is_err());
    }
}
