//! The config's matchers: `envoy.type.matcher.v3.StringMatcher` (SAN, header and
//! query matchers use the same type) and `envoy.config.core.v3.CidrRange` lists.

use std::net::IpAddr;

use regex::Regex;

use super::reader::Obj;

#[derive(Debug, Clone)]
pub enum StringPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// `safe_regex.regex`, anchored: it must match the whole value, as RE2's
    /// FullMatch does in Envoy.
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub struct StringMatcher {
    pub pattern: StringPattern,
    /// `ignore_case` (no effect on `safe_regex`, as in Envoy).
    pub ignore_case: bool,
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        let ic = self.ignore_case;
        match &self.pattern {
            StringPattern::Exact(s) if ic => value.eq_ignore_ascii_case(s),
            StringPattern::Exact(s) => value == s,
            StringPattern::Prefix(s) if ic => value
                .get(..s.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(s)),
            StringPattern::Prefix(s) => value.starts_with(s.as_str()),
            StringPattern::Suffix(s) if ic => value
                .len()
                .checked_sub(s.len())
                .and_then(|at| value.get(at..))
                .is_some_and(|p| p.eq_ignore_ascii_case(s)),
            StringPattern::Suffix(s) => value.ends_with(s.as_str()),
            StringPattern::Contains(s) if ic => {
                value.to_ascii_lowercase().contains(&s.to_ascii_lowercase())
            }
            StringPattern::Contains(s) => value.contains(s.as_str()),
            StringPattern::Regex(re) => re.is_match(value),
        }
    }
}

/// Maps a StringMatcher object; errors name the field.
pub fn map_string_matcher(m: &Obj<'_>) -> Option<StringMatcher> {
    let ignore_case = m.bool("ignore_case").unwrap_or(false);
    let pattern = if let Some(s) = m.str("exact") {
        StringPattern::Exact(s.to_string())
    } else if let Some(s) = m.str("prefix") {
        StringPattern::Prefix(s.to_string())
    } else if let Some(s) = m.str("suffix") {
        StringPattern::Suffix(s.to_string())
    } else if let Some(s) = m.str("contains") {
        StringPattern::Contains(s.to_string())
    } else if let Some(sr) = m.obj("safe_regex") {
        StringPattern::Regex(map_safe_regex(&sr)?)
    } else {
        m.errors().push(
            m.path(),
            "one of exact, prefix, suffix, contains or safe_regex is required by envoyx",
        );
        return None;
    };
    if ignore_case && matches!(pattern, StringPattern::Regex(_)) {
        // Envoy's StringMatcherImpl refuses it rather than ignore it.
        m.errors()
            .push(m.path(), "ignore_case has no effect for safe_regex.");
        return None;
    }
    Some(StringMatcher {
        pattern,
        ignore_case,
    })
}

/// `envoy.type.matcher.v3.RegexMatcher`, compiled anchored at both ends.
pub fn map_safe_regex(sr: &Obj<'_>) -> Option<Regex> {
    let re = sr.str("regex").unwrap_or_default();
    // google_re2 is the only engine and carries no settings Envoy still honours.
    if let Some(g) = sr.obj("google_re2") {
        g.ignore(&["max_program_size"]);
    }
    match Regex::new(&format!("^(?:{re})$")) {
        Ok(compiled) => Some(compiled),
        Err(e) => {
            sr.error("regex", format!("invalid regex '{re}': {e}"));
            None
        }
    }
}

/// `envoy.config.core.v3.CidrRange`, with the address masked to its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrRange {
    pub address: std::net::IpAddr,
    pub prefix_len: u8,
}

impl CidrRange {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(ip) ^ u32::from(net);
                self.prefix_len == 0 || bits >> (32 - u32::from(self.prefix_len.min(32))) == 0
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u128::from(ip) ^ u128::from(net);
                self.prefix_len == 0 || bits >> (128 - u32::from(self.prefix_len.min(128))) == 0
            }
            _ => false,
        }
    }
}

/// A repeated `envoy.config.core.v3.CidrRange` field.
pub fn map_cidrs(m: &Obj<'_>, field: &'static str) -> Vec<CidrRange> {
    let mut out = Vec::new();
    for r in m.list(field) {
        let prefix = r.str("address_prefix").unwrap_or_default();
        let Ok(address) = prefix.parse::<IpAddr>() else {
            r.error("address_prefix", format!("malformed IP address: {prefix}"));
            continue;
        };
        let max = if address.is_ipv4() { 32 } else { 128 };
        let len = r.u32("prefix_len").unwrap_or(0);
        if len > max {
            r.error("prefix_len", format!("must be at most {max}"));
            continue;
        }
        out.push(CidrRange {
            address,
            prefix_len: len as u8,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: StringPattern, ignore_case: bool) -> StringMatcher {
        StringMatcher {
            pattern: p,
            ignore_case,
        }
    }

    #[test]
    fn each_pattern_and_case() {
        assert!(m(StringPattern::Exact("a.Example".into()), true).matches("A.example"));
        assert!(!m(StringPattern::Exact("a.Example".into()), false).matches("A.example"));
        assert!(m(StringPattern::Prefix("spiffe://".into()), false).matches("spiffe://x"));
        assert!(!m(StringPattern::Prefix("spiffe://x/".into()), false).matches("spiffe://x"));
        assert!(m(StringPattern::Suffix(".EXAMPLE.com".into()), true).matches("a.example.com"));
        assert!(!m(StringPattern::Suffix("é".into()), true).matches("x"));
        assert!(m(StringPattern::Contains("NS/".into()), true).matches("spiffe://d/ns/x"));
        let re = Regex::new("^(?:spiffe://[a-z.]+/ns/\\w+/sa/web)$").unwrap();
        assert!(m(StringPattern::Regex(re.clone()), false).matches("spiffe://e.org/ns/d/sa/web"));
        assert!(!m(StringPattern::Regex(re), false).matches("spiffe://e.org/ns/d/sa/webx"));
    }
}
