//! MQTT 3.1.1 topic names and filters: which are valid, and which filter
//! matches which name. Pure.

/// A topic a PUBLISH may name: not empty, no wildcards, no NUL.
pub fn valid_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A SUBSCRIBE filter: `+` stands alone in its level, `#` only as the last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if !last => return false,
            "+" | "#" => {}
            l if l.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether the filter has a wildcard (else it matches one name only: itself).
pub fn is_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// Whether `filter` matches `topic`. Wildcards at the first level do not
/// match names starting with `$` (MQTT 3.1.1 §4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_the_standard_says() {
        for (f, t) in [
            ("a/b", "a/b"),
            ("a/+", "a/b"),
            ("+/+", "a/b"),
            ("a/#", "a/b/c"),
            ("a/#", "a"),
            ("#", "a/b"),
            ("+/b/+", "a/b/c"),
            ("a/+/c", "a//c"),
            ("$SYS/#", "$SYS/x"),
        ] {
            assert!(matches(f, t), "{f} should match {t}");
        }
        for (f, t) in [("a/b", "a/c"), ("a/+", "a/b/c"), ("a/+", "a"), ("+", "$SYS"), ("#", "$SYS/x"), ("a/b/c", "a/b")]
        {
            assert!(!matches(f, t), "{f} should not match {t}");
        }
    }

    #[test]
    fn wildcards_are_whole_levels_and_names_have_none() {
        for f in ["a", "a/+", "+", "#", "a/#", "+/+/#", "a//b"] {
            assert!(valid_filter(f), "{f}");
        }
        for f in ["", "a/#/b", "a+", "a/b#", "##", "a\0"] {
            assert!(!valid_filter(f), "{f:?}");
        }
        assert!(valid_name("a/b") && !valid_name("a/+") && !valid_name("#") && !valid_name(""));
    }
}
