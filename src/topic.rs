//! Room and topic names, and the patterns that match them (NATS's syntax).
//!
//! A name is one or more segments separated by dots (`chat.lobby`, `prices.eur.usd`, or just
//! `lobby`). A pattern is a name in which a segment may be a wildcard: `*` matches exactly one
//! segment (`chat.*` matches `chat.lobby`, not `chat` nor `chat.lobby.2`), and `>` as the last
//! segment matches one segment or more (`chat.>` matches `chat.lobby` and `chat.lobby.2`, not
//! `chat`). A plain name is a pattern that matches itself only.

use thiserror::Error;

/// The longest name or pattern, in bytes (UTF-8), so that it fits a frame header's length byte.
pub const MAX_TOPIC_LEN: usize = 255;

/// Why a name or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    #[error("a room or topic name cannot be empty")]
    Empty,
    #[error("a room or topic name is at most {MAX_TOPIC_LEN} bytes (UTF-8); this one is {0}")]
    TooLong(usize),
    #[error("{0:?} has an empty segment: segments are separated by single dots, with none at either end")]
    EmptySegment(String),
    #[error("{0:?} contains whitespace or a control character")]
    BadCharacter(String),
    #[error(
        "{0:?}: '*' and '>' are wildcards only as a whole segment ('chat.*'), and '>' only as the last one"
    )]
    MisplacedWildcard(String),
    #[error("{0:?} is a pattern: a message is published to a name without wildcards")]
    WildcardInName(String),
}

/// Checks `pattern` (a name, or a name with wildcard segments).
///
/// # Errors
/// [`TopicError`] saying which rule it breaks.
pub fn check_pattern(pattern: &str) -> Result<(), TopicError> {
    if pattern.is_empty() {
        return Err(TopicError::Empty);
    }
    if pattern.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(pattern.len()));
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TopicError::BadCharacter(pattern.to_owned()));
    }
    let segments: Vec<&str> = pattern.split('.').collect();
    let last = segments.len() - 1;
    for (index, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            return Err(TopicError::EmptySegment(pattern.to_owned()));
        }
        let wildcard = *segment == "*" || (*segment == ">" && index == last);
        if !wildcard && segment.contains(['*', '>']) {
            return Err(TopicError::MisplacedWildcard(pattern.to_owned()));
        }
    }
    Ok(())
}

/// Checks `name`, a name to publish to: a pattern without wildcards.
///
/// # Errors
/// As [`check_pattern`], and [`TopicError::WildcardInName`] for a pattern.
pub fn check_name(name: &str) -> Result<(), TopicError> {
    check_pattern(name)?;
    if is_pattern(name) {
        return Err(TopicError::WildcardInName(name.to_owned()));
    }
    Ok(())
}

/// Whether a valid `pattern` has wildcard segments (it matches more than one name).
pub fn is_pattern(pattern: &str) -> bool {
    pattern
        .split('.')
        .any(|segment| segment == "*" || segment == ">")
}

/// Whether the valid `pattern` matches the valid `name`.
pub fn matches(pattern: &str, name: &str) -> bool {
    let mut names = name.split('.');
    for segment in pattern.split('.') {
        match segment {
            ">" => return names.next().is_some(),
            "*" => {
                if names.next().is_none() {
                    return false;
                }
            }
            literal => {
                if names.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    names.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_patterns_follow_the_rules() {
        for good in [
            "lobby",
            "chat.lobby",
            "a.b.c",
            "chat.*",
            "chat.>",
            "*",
            ">",
            "*.x.>",
            "é.ü",
        ] {
            assert_eq!(check_pattern(good), Ok(()), "{good}");
        }
        assert_eq!(check_pattern(""), Err(TopicError::Empty));
        assert!(matches!(
            check_pattern(&"x".repeat(256)),
            Err(TopicError::TooLong(256))
        ));
        assert_eq!(check_pattern(&"x".repeat(255)), Ok(()));
        for bad in [".a", "a.", "a..b", "."] {
            assert!(
                matches!(check_pattern(bad), Err(TopicError::EmptySegment(_))),
                "{bad}"
            );
        }
        for bad in ["a b", "a\tb", "a\u{0}", "a\nb"] {
            assert!(
                matches!(check_pattern(bad), Err(TopicError::BadCharacter(_))),
                "{bad:?}"
            );
        }
        for bad in ["a*", "chat.*x", ">.a", "a.>.b", "a>"] {
            assert!(
                matches!(check_pattern(bad), Err(TopicError::MisplacedWildcard(_))),
                "{bad}"
            );
        }
        assert_eq!(check_name("chat.lobby"), Ok(()));
        assert!(matches!(
            check_name("chat.*"),
            Err(TopicError::WildcardInName(_))
        ));
        assert!(matches!(
            check_name("chat.>"),
            Err(TopicError::WildcardInName(_))
        ));
    }

    #[test]
    fn wildcards_match_one_segment_or_the_rest() {
        let cases = [
            ("lobby", "lobby", true),
            ("lobby", "lobby.2", false),
            ("chat.*", "chat.lobby", true),
            ("chat.*", "chat", false),
            ("chat.*", "chat.lobby.2", false),
            ("chat.>", "chat.lobby", true),
            ("chat.>", "chat.lobby.2", true),
            ("chat.>", "chat", false),
            ("*.lobby", "chat.lobby", true),
            ("*.lobby", "chat.kitchen", false),
            ("*", "lobby", true),
            ("*", "chat.lobby", false),
            (">", "chat.lobby", true),
            ("*.*.>", "a.b", false),
            ("*.*.>", "a.b.c", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(matches(pattern, name), expected, "{pattern} ~ {name}");
        }
    }
}
