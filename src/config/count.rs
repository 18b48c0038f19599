//! Counts and sizes with a lower bound above zero, such as at least 1. A
//! negative value is rejected while the file is read, with a message that
//! gives the real lower bound. Values from zero up to the bound are left to
//! the checks, which report them together with the file's other problems.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserializer;
use serde::de::{self, Visitor};

/// Integer types that a count is read into.
pub trait Count: Sized {
    const MAX: u64;
    fn from_u64(value: u64) -> Self;
}

impl Count for u32 {
    const MAX: u64 = u32::MAX as u64;
    fn from_u64(value: u64) -> Self {
        value as u32
    }
}

impl Count for u64 {
    const MAX: u64 = u64::MAX;
    fn from_u64(value: u64) -> Self {
        value
    }
}

impl Count for usize {
    const MAX: u64 = usize::MAX as u64;
    fn from_u64(value: u64) -> Self {
        value as usize
    }
}

/// Reads a `T` whose smallest valid value is `MIN`.
struct CountVisitor<T, const MIN: u64>(PhantomData<T>);

impl<T: Count, const MIN: u64> Visitor<'_> for CountVisitor<T, MIN> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if T::MAX == u64::MAX {
            write!(f, "an integer of at least {MIN}")
        } else {
            write!(f, "an integer from {MIN} to {}", T::MAX)
        }
    }

    // Out-of-range values get the wording of the checks, which report
    // values from zero up to the bound.
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<T, E> {
        if value > T::MAX {
            return Err(E::custom(format_args!("must be at most {}, found {value}", T::MAX)));
        }
        Ok(T::from_u64(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<T, E> {
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(E::custom(format_args!("must be at least {MIN}, found {value}"))),
        }
    }
}

/// Reads a count of at least 1, for `#[serde(deserialize_with = ...)]`.
pub fn count<'de, D: Deserializer<'de>, T: Count>(deserializer: D) -> Result<T, D::Error> {
    deserializer.deserialize_u64(CountVisitor::<T, 1>(PhantomData))
}

/// Reads a count of at least 2.
pub fn count_from_two<'de, D: Deserializer<'de>, T: Count>(deserializer: D) -> Result<T, D::Error> {
    deserializer.deserialize_u64(CountVisitor::<T, 2>(PhantomData))
}

/// Reads an optional count; a missing key needs `#[serde(default)]` too.
pub fn optional_count<'de, D: Deserializer<'de>, T: Count>(deserializer: D) -> Result<Option<T>, D::Error> {
    count(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Counts {
        #[serde(default, deserialize_with = "super::count")]
        records: u64,
        #[serde(default, deserialize_with = "super::count")]
        samples: u32,
        #[serde(default, deserialize_with = "super::optional_count")]
        top_k: Option<usize>,
        #[serde(default, deserialize_with = "super::count_from_two")]
        steps: u32,
    }

    /// Reads through a YAML value, as the pipeline file's sections are.
    fn read(text: &str) -> Result<Counts, String> {
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).unwrap();
        serde_yaml_ng::from_value(value).map_err(|err| err.to_string())
    }

    #[test]
    fn reads_counts_zero_included() {
        let counts = read("{records: 18446744073709551615, samples: 4294967295, top_k: 0}").unwrap();
        assert_eq!((counts.records, counts.samples, counts.top_k), (u64::MAX, u32::MAX, Some(0)));
        assert_eq!(read("{}").unwrap().top_k, None);
    }

    #[test]
    fn negative_count_names_the_lower_bound() {
        let message = read("{records: -3}").unwrap_err();
        assert!(message.starts_with("must be at least 1, found -3"), "{message}");
        let message = read("{top_k: -1}").unwrap_err();
        assert!(message.starts_with("must be at least 1, found -1"), "{message}");
        let message = read("{records: many}").unwrap_err();
        assert!(message.contains("invalid type: string \"many\", expected an integer of at least 1"), "{message}");
    }

    #[test]
    fn narrow_count_names_its_range() {
        let message = read("{samples: 4294967296}").unwrap_err();
        assert!(message.starts_with("must be at most 4294967295, found 4294967296"), "{message}");
        let message = read("{samples: 2.5}").unwrap_err();
        assert!(message.contains("floating point `2.5`, expected an integer from 1 to 4294967295"), "{message}");
    }

    #[test]
    fn higher_lower_bound_is_named() {
        assert_eq!(read("{steps: 1}").unwrap().steps, 1, "values below the bound are left to the checks");
        let message = read("{steps: -4}").unwrap_err();
        assert!(message.starts_with("must be at least 2, found -4"), "{message}");
        let message = read("{steps: two}").unwrap_err();
        assert!(message.contains("expected an integer from 2 to 4294967295"), "{message}");
    }
}
