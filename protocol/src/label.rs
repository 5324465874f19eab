//! Device labels: the syntax both sides enforce (agents in inventory,
//! operators through the controller), as Kubernetes does, so labels survive
//! selectors, URLs and shells unquoted.

/// A label that breaks the syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidLabel {
    #[error("label key {0:?} must be 1-63 characters of A-Z a-z 0-9 . _ - /")]
    Key(String),
    #[error("label value {value:?} for {key:?} must be 0-63 characters of A-Z a-z 0-9 . _ - /")]
    Value { key: String, value: String },
}

/// Keys: 1-63 characters, values: 0-63 characters, both of `[A-Za-z0-9._-/]`.
pub fn validate_label(key: &str, value: &str) -> Result<(), InvalidLabel> {
    let ok_chars = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if key.is_empty() || key.len() > 63 || !ok_chars(key) {
        return Err(InvalidLabel::Key(key.into()));
    }
    if value.len() > 63 || !ok_chars(value) {
        return Err(InvalidLabel::Value { key: key.into(), value: value.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_label;

    #[test]
    fn label_syntax() {
        assert!(validate_label("site", "lyon-2").is_ok());
        assert!(validate_label("example.com/role", "").is_ok());
        for (k, v) in [("", "x"), ("a b", "x"), ("k", "x y"), ("k", "é"), (&*"k".repeat(64), "x")] {
            assert!(validate_label(k, v).is_err(), "{k:?}={v:?}");
        }
    }
}
