//! The connection manager's path normalisation, as Envoy's
//! `ConnectionManagerUtility::maybeNormalizePath` does it before routing:
//! `path_with_escaped_slashes_action` first (`%2F`/`%5C` kept, refused, or
//! unescaped and forwarded or redirected to), then `normalize_path` (Envoy's
//! Chromium-derived `canonicalPath`: backslashes become slashes, escaped
//! unreserved characters are decoded, characters a URL may not hold are escaped,
//! `.` and `..` segments are resolved), then `merge_slashes`. Only the path is
//! touched; the query goes on as it came.

use crate::config::EscapedSlashesAction;

/// A connection manager's normalisation settings (all off: nothing runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathNormalization {
    pub normalize_path: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashesAction,
}

/// What normalising a request's path decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Normalized {
    /// Routed and forwarded as it came.
    Unchanged,
    /// Routed and forwarded as this path (with the query).
    Changed(String),
    /// 307 to this path (`UNESCAPE_AND_REDIRECT` found escaped slashes).
    Redirect(String),
    /// 400 (`REJECT_REQUEST` found escaped slashes).
    Reject,
}

impl PathNormalization {
    pub fn is_active(&self) -> bool {
        self.normalize_path
            || self.merge_slashes
            || self.escaped_slashes != EscapedSlashesAction::KeepUnchanged
    }

    /// Normalises `path_and_query` (which starts with `/`).
    pub fn apply(&self, path_and_query: &str) -> Normalized {
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        let mut current = std::borrow::Cow::Borrowed(path);
        let mut redirect = false;
        if self.escaped_slashes != EscapedSlashesAction::KeepUnchanged && has_escaped_slash(path) {
            match self.escaped_slashes {
                EscapedSlashesAction::RejectRequest => return Normalized::Reject,
                EscapedSlashesAction::UnescapeAndRedirect => redirect = true,
                _ => {}
            }
            current = unescape_slashes(path).into();
        }
        if self.normalize_path {
            current = canonical_path(&current).into();
        }
        if self.merge_slashes && current.contains("//") {
            current = merge_slashes(&current).into();
        }
        if current == path {
            return Normalized::Unchanged;
        }
        let whole = format!("{current}{query}");
        if redirect {
            Normalized::Redirect(whole)
        } else {
            Normalized::Changed(whole)
        }
    }
}

/// `%2F`, `%2f`, `%5C` or `%5c`.
fn has_escaped_slash(path: &str) -> bool {
    path.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && is_slash_escape(w[1], w[2]))
}

fn is_slash_escape(hi: u8, lo: u8) -> bool {
    matches!((hi, lo.to_ascii_uppercase()), (b'2', b'F') | (b'5', b'C'))
}

fn unescape_slashes(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() && is_slash_escape(b[i + 1], b[i + 2]) {
            out.push(if b[i + 1] == b'2' { '/' } else { '\\' });
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Envoy's `canonicalPath` (Chromium's `CanonicalizePath`) for an origin-form
/// path.
fn canonical_path(path: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let b = path.as_bytes();
    let mut chars = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\\' => chars.push(b'/'),
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                let decoded = (hex(b[i + 1]) << 4) | hex(b[i + 2]);
                if decoded.is_ascii_alphanumeric() || matches!(decoded, b'-' | b'.' | b'_' | b'~') {
                    chars.push(decoded);
                } else {
                    chars.extend_from_slice(&b[i..i + 3]);
                }
                i += 3;
                continue;
            }
            c if c <= b' '
                || c >= 0x7f
                || matches!(c, b'"' | b'<' | b'>' | b'^' | b'`' | b'{' | b'|' | b'}') =>
            {
                chars.extend_from_slice(&[
                    b'%',
                    HEX[usize::from(c >> 4)],
                    HEX[usize::from(c & 15)],
                ]);
            }
            c => chars.push(c),
        }
        i += 1;
    }
    // `.` and `..` segments, never above the root; a path that ends in one
    // keeps its trailing slash.
    let text = String::from_utf8_lossy(&chars).into_owned();
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = text.split('/').skip(1).peekable();
    let mut trailing = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            "." => trailing = last,
            ".." => {
                segments.pop();
                trailing = last;
            }
            s => {
                segments.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(text.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// Runs of `/` as one (Envoy's `PathUtil::mergeSlashes`).
fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut previous_slash = false;
    for c in path.chars() {
        if c == '/' && previous_slash {
            continue;
        }
        previous_slash = c == '/';
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(normalize: bool, merge: bool, escaped: EscapedSlashesAction) -> PathNormalization {
        PathNormalization {
            normalize_path: normalize,
            merge_slashes: merge,
            escaped_slashes: escaped,
        }
    }

    fn changed(s: &str) -> Normalized {
        Normalized::Changed(s.to_string())
    }

    #[test]
    fn canonical_paths_as_envoy() {
        let n = with(true, false, EscapedSlashesAction::KeepUnchanged);
        for (input, want) in [
            ("/a/../b", "/b"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/%2E%2E/b", "/b"),
            ("/a/.%2e/b", "/b"),
            ("/../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/./b", "/a/b"),
            ("/a\\b", "/a/b"),
            ("/%41b", "/Ab"),
            ("/a%7eb", "/a~b"),
            ("/a%2e%2E", "/a.."),
            ("/a\"b", "/a%22b"),
            ("/a{b}", "/a%7Bb%7D"),
            ("/a/b/..?x=/../y", "/a/?x=/../y"),
        ] {
            assert_eq!(n.apply(input), changed(want), "{input}");
        }
        for same in [
            "//b",
            "/a%2Fb",
            "/a;x/b",
            "/a%zzb",
            "/a%b",
            "/a%2",
            "/a%20b",
            "/a/..%2fb",
        ] {
            assert_eq!(n.apply(same), Normalized::Unchanged, "{same}");
        }
    }

    #[test]
    fn escaped_slashes_and_merging() {
        use EscapedSlashesAction::*;
        assert_eq!(
            with(false, false, RejectRequest).apply("/a%2fb"),
            Normalized::Reject
        );
        assert_eq!(
            with(false, false, RejectRequest).apply("/a/b?x=%2F"),
            Normalized::Unchanged
        );
        assert_eq!(
            with(false, false, UnescapeAndRedirect).apply("/a%5Cb?q"),
            Normalized::Redirect("/a\\b?q".into())
        );
        assert_eq!(
            with(false, false, UnescapeAndForward).apply("/a%2Fb"),
            changed("/a/b")
        );
        assert_eq!(
            with(true, false, UnescapeAndForward).apply("/a%5Cb"),
            changed("/a/b")
        );
        assert_eq!(
            with(true, false, UnescapeAndForward).apply("/a/..%2fb"),
            changed("/b")
        );
        assert_eq!(
            with(false, true, KeepUnchanged).apply("//a//b/"),
            changed("/a/b/")
        );
        assert_eq!(
            with(true, true, KeepUnchanged).apply("/a\\\\b"),
            changed("/a/b")
        );
    }
}
