//! Redis-style glob patterns over byte keys: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`.
//!
//! `literal_prefix` is what makes `user:42:*` cheap: stores answer it with a range scan
//! over keys starting with `user:42:` instead of looking at every key.

/// A parsed pattern. Matching is iterative with one backtrack point, so a hostile
/// pattern like `*a*a*a*a*b` costs O(pattern × key), never exponential time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    raw: Vec<u8>,
    prefix_len: usize,
}

impl Pattern {
    pub fn new(raw: &[u8]) -> Pattern {
        let mut prefix_len = 0;
        while prefix_len < raw.len() && !matches!(raw[prefix_len], b'*' | b'?' | b'[' | b'\\') {
            prefix_len += 1;
        }
        Pattern {
            raw: raw.to_vec(),
            prefix_len,
        }
    }

    /// The bytes every matching key starts with.
    pub fn literal_prefix(&self) -> &[u8] {
        &self.raw[..self.prefix_len]
    }

    /// True when the pattern is all literal: it matches one key, itself.
    pub fn is_exact(&self) -> bool {
        self.prefix_len == self.raw.len()
    }

    pub fn matches_all(&self) -> bool {
        self.raw == b"*"
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    pub fn matches(&self, key: &[u8]) -> bool {
        glob_match(&self.raw, key)
    }
}

fn glob_match(pattern: &[u8], key: &[u8]) -> bool {
    let (mut p, mut k) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, key index it covers to).
    let mut star: Option<(usize, usize)> = None;
    while k < key.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p + 1, k));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    k += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class_match(pattern, p, key[k]) {
                        if matched {
                            p = next;
                            k += 1;
                            continue;
                        }
                    } else if key[k] == b'[' {
                        // An unterminated class is a literal `[`.
                        p += 1;
                        k += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == key[k] {
                        p += 2;
                        k += 1;
                        continue;
                    }
                }
                literal => {
                    if literal == key[k] {
                        p += 1;
                        k += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((after_star, covered)) => {
                p = after_star;
                k = covered + 1;
                star = Some((after_star, covered + 1));
            }
            None => return false,
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

/// Matches `byte` against the class starting at `pattern[start] == b'['`. Returns
/// whether it matched and the index after the class, or `None` if the class never closes.
fn class_match(pattern: &[u8], start: usize, byte: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < pattern.len() {
        let c = pattern[i];
        if c == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if c == b'\\' && i + 1 < pattern.len() {
            matched |= pattern[i + 1] == byte;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (low, high) = if c <= pattern[i + 2] {
                (c, pattern[i + 2])
            } else {
                (pattern[i + 2], c)
            };
            matched |= (low..=high).contains(&byte);
            i += 3;
        } else {
            matched |= c == byte;
            i += 1;
        }
    }
    None
}

/// The smallest byte string greater than every string starting with `prefix`, for the
/// end of a range scan; `None` when there is none (empty prefix or all 0xff).
pub(super) fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, key: &str) -> bool {
        Pattern::new(pattern.as_bytes()).matches(key.as_bytes())
    }

    #[test]
    fn globs_match_like_redis() {
        assert!(m("*", ""));
        assert!(m("user:*", "user:42"));
        assert!(!m("user:*", "users"));
        assert!(m("h?llo", "hello"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("*a*b*c", "xxaxxbxxc"));
        assert!(!m("*a*b*c", "xxaxxbxx"));
        assert!(m("[", "["));
    }

    #[test]
    fn hostile_patterns_are_linear() {
        let key = "a".repeat(10_000);
        let pattern = format!("{}b", "*a".repeat(50));
        let started = std::time::Instant::now();
        assert!(!m(&pattern, &key));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn prefixes() {
        assert_eq!(Pattern::new(b"user:42:*").literal_prefix(), b"user:42:");
        assert_eq!(Pattern::new(b"*").literal_prefix(), b"");
        assert!(Pattern::new(b"exact").is_exact());
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(&[0xff]), None);
    }
}
