//! Human units: sizes (`512M`, `1.5G`, `4096`) and durations (`30s`, `1m30s`, `250ms`).
//!
//! Sizes use binary multiples (`K` = 1024), as Docker and the kernel's own tools do; a bare
//! number is bytes. Durations require a unit on every component so that `30` cannot silently mean
//! thirty milliseconds to one reader and thirty seconds to another.

use std::fmt;
use std::str::FromStr;

/// Why a size or duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty value")]
    Empty,
    #[error(
        "{input:?} is not a size: use a number with an optional unit B, K, M, G or T (e.g. 512M)"
    )]
    BadSize { input: String },
    #[error("{input:?} is too large")]
    Overflow { input: String },
    #[error(
        "{input:?} is not a duration: use numbers with units ms, s, m, h or d (e.g. 30s, 1m30s, 250ms)"
    )]
    BadDuration { input: String },
}

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(u64);

impl Size {
    /// The size of `n` bytes.
    pub const fn bytes(n: u64) -> Size {
        Size(n)
    }
    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Size {
        Size(n << 20)
    }
    /// The size in bytes.
    pub const fn as_bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for Size {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Size, ParseError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(ParseError::Empty);
        }
        let bad = || ParseError::BadSize {
            input: s.to_string(),
        };
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(bad());
        }
        let shift = match unit.to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KI" | "KIB" => 10,
            "M" | "MB" | "MI" | "MIB" => 20,
            "G" | "GB" | "GI" | "GIB" => 30,
            "T" | "TB" | "TI" | "TIB" => 40,
            _ => return Err(bad()),
        };
        let bytes = match num.split_once('.') {
            None => num
                .parse::<u64>()
                .map_err(|_| bad())?
                .checked_mul(1 << shift),
            Some((whole, frac)) => {
                if frac.is_empty() || frac.contains('.') || frac.len() > 9 {
                    return Err(bad());
                }
                let whole: u64 = if whole.is_empty() {
                    0
                } else {
                    whole.parse().map_err(|_| bad())?
                };
                let frac_n: u64 = frac.parse().map_err(|_| bad())?;
                let scale = 10u64.pow(frac.len() as u32);
                let unit = 1u128 << shift;
                let total = whole as u128 * unit + frac_n as u128 * unit / scale as u128;
                u64::try_from(total).ok()
            }
        };
        bytes.map(Size).ok_or_else(|| ParseError::Overflow {
            input: s.to_string(),
        })
    }
}

impl fmt::Display for Size {
    /// The shortest exact form: `512M`, `1G`, `1536K`, `100`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        for (shift, unit) in UNITS {
            if self.0 != 0 && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A non-negative span of time with millisecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// `n` milliseconds.
    pub const fn from_millis(n: u64) -> Duration {
        Duration(std::time::Duration::from_millis(n))
    }
    /// `n` seconds.
    pub const fn from_secs(n: u64) -> Duration {
        Duration(std::time::Duration::from_secs(n))
    }
    /// The standard library form.
    pub const fn as_std(self) -> std::time::Duration {
        self.0
    }
}

impl FromStr for Duration {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Duration, ParseError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(ParseError::Empty);
        }
        let bad = || ParseError::BadDuration {
            input: s.to_string(),
        };
        let mut rest = t;
        let mut total_ms: u128 = 0;
        while !rest.is_empty() {
            let n_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            let (num, tail) = rest.split_at(n_end);
            let u_end = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(u_end);
            let ms_per: u128 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(bad()),
            };
            let value: f64 = num.parse().map_err(|_| bad())?;
            if !value.is_finite() || value < 0.0 {
                return Err(bad());
            }
            total_ms += (value * ms_per as f64).round() as u128;
            rest = tail;
        }
        let ms = u64::try_from(total_ms).map_err(|_| ParseError::Overflow {
            input: s.to_string(),
        })?;
        Ok(Duration::from_millis(ms))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return write!(f, "0s");
        }
        let (h, m, s, rem) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        if rem > 0 {
            write!(f, "{rem}ms")?;
        }
        Ok(())
    }
}

serde_via_str!(Size);
serde_via_str!(Duration);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        let cases = [
            ("0", 0),
            ("4096", 4096),
            ("1K", 1024),
            ("512M", 512 << 20),
            ("512m", 512 << 20),
            ("1G", 1 << 30),
            ("1.5G", 3 << 29),
            ("2GiB", 2 << 30),
            ("10MB", 10 << 20),
            ("1T", 1 << 40),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Size>().unwrap().as_bytes(), want, "{text}");
        }
    }

    #[test]
    fn bad_sizes_are_rejected_with_the_input_named() {
        for text in ["", "M", "12Q", "-1M", "1.2.3M", "1.M", "abc"] {
            let err = text.parse::<Size>().unwrap_err();
            if !text.is_empty() {
                assert!(err.to_string().contains(text), "{err}");
            }
        }
        assert!(matches!(
            "99999999999T".parse::<Size>(),
            Err(ParseError::Overflow { .. })
        ));
    }

    #[test]
    fn sizes_display_in_their_shortest_exact_form() {
        for text in ["512M", "1G", "1536K", "100", "0"] {
            assert_eq!(text.parse::<Size>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn durations_parse_compound_forms() {
        let cases = [
            ("250ms", 250),
            ("30s", 30_000),
            ("1m30s", 90_000),
            ("1.5s", 1_500),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
            ("0s", 0),
        ];
        for (text, want) in cases {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.as_std().as_millis(), want, "{text}");
        }
    }

    #[test]
    fn durations_need_units() {
        for text in ["30", "s", "1x", "1m30", "-5s", ""] {
            assert!(text.parse::<Duration>().is_err(), "{text}");
        }
    }

    #[test]
    fn durations_round_trip_through_display() {
        for text in ["1h2m3s", "250ms", "1m30s", "0s"] {
            assert_eq!(text.parse::<Duration>().unwrap().to_string(), text);
        }
    }
}
