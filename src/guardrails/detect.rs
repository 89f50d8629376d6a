//! The detectors: which spans of a prompt text are personal data or
//! secrets.
//!
//! One [`RegexSet`] pass over a text tells which shapes may be present,
//! and for nearly every prompt the answer is none. Only a shape the set
//! saw is then located with its own regex, and each candidate is
//! validated (a checksum, number ranges, boundaries) before it counts:
//! regex alone would take every 16-digit order number for a card.
//!
//! The patterns use ASCII classes and no `\b`, so the set stays on the
//! regex crate's lazy DFA on any text, CJK and emoji included. Boundaries
//! are checked in code, per shape.

use std::ops::Range;

use regex::{Regex, RegexSet};

/// What a detector finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Email,
    Phone,
    CreditCard,
    Iban,
    UsSsn,
    Ipv4,
    Secret,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Email,
        Kind::Phone,
        Kind::CreditCard,
        Kind::Iban,
        Kind::UsSsn,
        Kind::Ipv4,
        Kind::Secret,
    ];

    /// The name `pii_kinds`, metrics and errors use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::CreditCard => "credit_card",
            Kind::Iban => "iban",
            Kind::UsSsn => "us_ssn",
            Kind::Ipv4 => "ipv4",
            Kind::Secret => "secret",
        }
    }

    /// What a masked match becomes in the forwarded body.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Email => "[EMAIL]",
            Kind::Phone => "[PHONE]",
            Kind::CreditCard => "[CREDIT_CARD]",
            Kind::Iban => "[IBAN]",
            Kind::UsSsn => "[US_SSN]",
            Kind::Ipv4 => "[IPV4]",
            Kind::Secret => "[SECRET]",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// Which kind names a span two findings share: the more sensitive.
    fn rank(self) -> u8 {
        match self {
            Kind::Secret => 6,
            Kind::CreditCard => 5,
            Kind::Iban => 4,
            Kind::UsSsn => 3,
            Kind::Phone => 2,
            Kind::Email => 1,
            Kind::Ipv4 => 0,
        }
    }
}

/// A set of kinds as a bit mask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindSet(u8);

impl KindSet {
    pub fn all() -> KindSet {
        let mut s = KindSet::default();
        for k in Kind::ALL {
            s.insert(k);
        }
        s
    }
    pub fn contains(self, k: Kind) -> bool {
        self.0 & k.bit() != 0
    }
    pub fn insert(&mut self, k: Kind) {
        self.0 |= k.bit();
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = Kind> {
        Kind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

/// One validated match: its kind and its byte range in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    pub span: Range<usize>,
}

/// The written forms a kind takes; each has its own pattern and check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Email,
    /// `+` and a country code, any common separators.
    E164,
    /// North American numbers with separators: `(415) 555-2671`,
    /// `415-555-2671`, `1 415 555 2671`. Ten bare digits are not taken:
    /// they are as often an order number.
    Nanp,
    Card,
    Iban,
    Ssn,
    Ipv4,
    /// `sk-…`: OpenAI's keys, and Anthropic's `sk-ant-…`.
    SkKey,
    /// AWS access key ids, long-term (`AKIA`) and temporary (`ASIA`).
    AwsKeyId,
    /// GitHub tokens: `ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, and
    /// fine-grained `github_pat_`.
    GitHub,
    /// Slack tokens: `xoxb-`, `xoxp-`, `xoxa-`, `xoxr-`.
    Slack,
    /// A PEM private-key block, from its header to its footer.
    PemKey,
    /// Portcullis's own API keys: `pcl_` and 40 hex digits.
    Portcullis,
}

const SHAPES: [(Shape, &str); 13] = [
    (
        Shape::Email,
        r"[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+",
    ),
    (Shape::E164, r"\+[0-9][0-9 ().-]{6,22}[0-9]"),
    (
        Shape::Nanp,
        r"(?:1[ .-])?(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}",
    ),
    (Shape::Card, r"[0-9](?:[ -]?[0-9]){12,18}"),
    (Shape::Iban, r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}"),
    (Shape::Ssn, r"[0-9]{3}-[0-9]{2}-[0-9]{4}"),
    (
        Shape::Ipv4,
        r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}",
    ),
    (Shape::SkKey, r"sk-[A-Za-z0-9_-]{20,}"),
    (Shape::AwsKeyId, r"A[KS]IA[0-9A-Z]{16}"),
    (
        Shape::GitHub,
        r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}",
    ),
    (Shape::Slack, r"xox[abpr]-[A-Za-z0-9-]{10,}"),
    (Shape::PemKey, r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    (Shape::Portcullis, r"pcl_[0-9a-f]{40}"),
];

impl Shape {
    fn kind(self) -> Kind {
        match self {
            Shape::Email => Kind::Email,
            Shape::E164 | Shape::Nanp => Kind::Phone,
            Shape::Card => Kind::CreditCard,
            Shape::Iban => Kind::Iban,
            Shape::Ssn => Kind::UsSsn,
            Shape::Ipv4 => Kind::Ipv4,
            Shape::SkKey
            | Shape::AwsKeyId
            | Shape::GitHub
            | Shape::Slack
            | Shape::PemKey
            | Shape::Portcullis => Kind::Secret,
        }
    }

    /// The span a candidate really covers once validated (it may be
    /// trimmed, or a PEM header grown to its whole block), or `None`.
    fn validate(self, text: &str, m: Range<usize>) -> Option<Range<usize>> {
        let b = text.as_bytes();
        let before = m.start.checked_sub(1).and_then(|i| b.get(i)).copied();
        let after = |end: usize| b.get(end).copied();
        let word = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        // `3.14159…` and `1.2.3.4.5` are not numbers of their own.
        let in_number =
            |end: usize| after(end) == Some(b'.') && b.get(end + 1).is_some_and(u8::is_ascii_digit);
        let s = &text[m.clone()];
        let ok = match self {
            Shape::Email => return email(s).map(|len| m.start..m.start + len),
            Shape::E164 => {
                if word(before) {
                    return None;
                }
                return trimmed(s, b' ', |c| {
                    phone_e164(c) && !word(after(m.start + c.len()))
                })
                .map(|len| m.start..m.start + len);
            }
            Shape::Nanp => {
                !word(before) && !matches!(before, Some(b'+' | b'-' | b'.')) && !word(after(m.end))
            }
            Shape::Card => {
                if word(before) || matches!(before, Some(b'.' | b'+')) {
                    return None;
                }
                return windows(s, |w| {
                    let end = m.start + w.end;
                    luhn(&s[w.clone()]) && !word(after(end)) && !in_number(end)
                })
                .map(|w| m.start + w.start..m.start + w.end);
            }
            Shape::Iban => {
                if word(before) {
                    return None;
                }
                return trimmed(s, b' ', |c| iban(c) && !word(after(m.start + c.len())))
                    .map(|len| m.start..m.start + len);
            }
            Shape::Ssn => {
                !word(before)
                    && before != Some(b'-')
                    && !word(after(m.end))
                    && after(m.end) != Some(b'-')
                    && ssn(s)
            }
            Shape::Ipv4 => {
                !word(before)
                    && before != Some(b'.')
                    && !word(after(m.end))
                    && !in_number(m.end)
                    && s.split('.')
                        .all(|o| o.parse::<u16>().is_ok_and(|n| n <= 255))
            }
            Shape::SkKey => {
                // A key has a long random run; `sk-learn-tutorial-for-…`
                // has only words.
                let tail = &s[3..];
                !matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                    && longest_alnum_run(tail) >= 16
            }
            Shape::AwsKeyId | Shape::Portcullis => {
                !word(before) && before != Some(b'_') && !word(after(m.end))
            }
            Shape::GitHub => {
                !word(before)
                    && before != Some(b'_')
                    && (s.starts_with("github_pat_") || !word(after(m.end)))
            }
            Shape::Slack => !word(before) && s.bytes().any(|c| c.is_ascii_digit()),
            Shape::PemKey => return Some(m.start..pem_end(text, m.end)),
        };
        ok.then_some(m)
    }
}

/// The compiled detectors: built once per snapshot that uses them.
#[derive(Debug)]
pub struct Detectors {
    set: RegexSet,
    each: Vec<Regex>,
}

impl Detectors {
    pub fn new() -> Result<Detectors, regex::Error> {
        let patterns = SHAPES.map(|(_, p)| p);
        Ok(Detectors {
            set: RegexSet::new(patterns)?,
            each: patterns
                .iter()
                .map(|p| Regex::new(p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Appends the validated findings of `kinds` in `text` to `out`, in
    /// order of position. Findings that overlap are merged into one, named
    /// by the more sensitive kind, so masking covers all of them.
    pub fn scan(&self, text: &str, kinds: KindSet, out: &mut Vec<Finding>) {
        // The clean text's one pass, without the allocation `matches` makes.
        if !self.set.is_match(text) {
            return;
        }
        let seen = self.set.matches(text);
        let from = out.len();
        for i in seen.iter() {
            let (Some((shape, _)), Some(re)) = (SHAPES.get(i), self.each.get(i)) else {
                continue;
            };
            if !kinds.contains(shape.kind()) {
                continue;
            }
            // After a candidate validated shorter than it matched, the
            // search goes on from where the finding ends: the rest can
            // hold another (`DE89 30 DE89 3704 …`).
            let mut at = 0;
            while let Some(m) = text.get(at..).and_then(|_| re.find_at(text, at)) {
                let resume = match shape.validate(text, m.range()) {
                    Some(span) => {
                        let end = span.end;
                        out.push(Finding {
                            kind: shape.kind(),
                            span,
                        });
                        end
                    }
                    None => m.end(),
                };
                at = resume.max(m.start() + 1);
                while !text.is_char_boundary(at) {
                    at += 1;
                }
            }
        }
        let found = &mut out[from..];
        found.sort_by_key(|f| (f.span.start, std::cmp::Reverse(f.span.end)));
        let mut merged: Vec<Finding> = Vec::with_capacity(found.len());
        for f in out.drain(from..) {
            match merged.last_mut() {
                Some(last) if f.span.start < last.span.end => {
                    last.span.end = last.span.end.max(f.span.end);
                    if f.kind.rank() > last.kind.rank() {
                        last.kind = f.kind;
                    }
                }
                _ => merged.push(f),
            }
        }
        out.extend(merged);
    }
}

/// `text` with each finding (in order, not overlapping, as [`Detectors::scan`]
/// gives them) replaced by its kind's label.
pub fn mask(text: &str, findings: &[Finding]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings {
        if let Some(keep) = text.get(at..f.span.start) {
            out.push_str(keep);
            out.push_str(f.kind.label());
            at = f.span.end;
        }
    }
    out.push_str(text.get(at..).unwrap_or_default());
    out
}

/// The length of the valid mailbox `s` starts with: a local part of at
/// most 64 bytes, and the longest domain prefix whose labels are 1-63
/// letters, digits or inner hyphens, at most 253 bytes, and whose last
/// label has a top-level domain's shape (letters, or `xn--` punycode).
/// What follows is left out: `bob@example.com.42`, and
/// `bob@example.com-----BEGIN…`, whose hyphens the pattern took in.
fn email(s: &str) -> Option<usize> {
    let at = s.find('@')?;
    let (local, domain) = (&s[..at], &s[at + 1..]);
    if local.len() > 64 {
        return None;
    }
    let d = domain.as_bytes();
    (1..=d.len().min(253))
        .rev()
        .filter(|&p| {
            d[p - 1].is_ascii_alphanumeric() && matches!(d.get(p), None | Some(b'.' | b'-'))
        })
        .find(|&p| valid_domain(&domain[..p]))
        .map(|p| at + 1 + p)
}

fn valid_domain(domain: &str) -> bool {
    let label_ok =
        |l: &str| (1..=63).contains(&l.len()) && !l.starts_with('-') && !l.ends_with('-');
    let tld_ok = |l: &str| {
        (l.len() >= 2 && l.bytes().all(|c| c.is_ascii_alphabetic()))
            || (l.len() > 4 && l[..4].eq_ignore_ascii_case("xn--"))
    };
    let mut labels = domain.split('.').rev();
    let Some(tld) = labels.next() else {
        return false;
    };
    let mut others = 0;
    for l in labels {
        if !label_ok(l) {
            return false;
        }
        others += 1;
    }
    others > 0 && label_ok(tld) && tld_ok(tld)
}

/// E.164 as people write it: 8 to 15 digits, a country code that does
/// not start with 0, single separators, at most one pair of parentheses
/// around digits.
fn phone_e164(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
    if !(8..=15).contains(&digits) || b.get(1) == Some(&b'0') {
        return false;
    }
    let sep = |c: u8| matches!(c, b' ' | b'.' | b'-');
    let doubled = b.windows(2).any(|w| sep(w[0]) && sep(w[1]));
    let opens = b.iter().filter(|c| **c == b'(').count();
    let closes = b.iter().filter(|c| **c == b')').count();
    let paired = match (opens, closes) {
        (0, 0) => true,
        (1, 1) => {
            let (o, c) = (s.find('(').unwrap_or(0), s.find(')').unwrap_or(0));
            o < c && c - o > 1 && b[o + 1..c].iter().all(u8::is_ascii_digit)
        }
        _ => false,
    };
    !doubled && paired
}

/// The Luhn checksum over the digits of 13-19 digit `s` (separators
/// skipped). No allocation: a hostile text can hold many candidates.
fn luhn(s: &str) -> bool {
    let (mut sum, mut n) = (0u32, 0usize);
    for d in s
        .bytes()
        .rev()
        .filter(u8::is_ascii_digit)
        .map(|c| u32::from(c - b'0'))
    {
        sum += match (n % 2 == 1, d * 2) {
            (true, d2) if d2 > 9 => d2 - 9,
            (true, d2) => d2,
            (false, _) => d,
        };
        n += 1;
    }
    (13..=19).contains(&n) && sum % 10 == 0
}

/// ISO 13616: 15-34 letters and digits (spaces skipped) whose
/// rearrangement (the first four moved to the end, letters as 10-35) is
/// 1 mod 97.
fn iban(s: &str) -> bool {
    let compact = || s.bytes().filter(|c| *c != b' ');
    if !(15..=34).contains(&compact().count()) {
        return false;
    }
    let mut rem = 0u32;
    for c in compact().skip(4).chain(compact().take(4)) {
        rem = match c {
            b'0'..=b'9' => (rem * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => (rem * 100 + u32::from(c - b'A') + 10) % 97,
            _ => return false,
        };
    }
    rem == 1
}

/// `AAA-GG-SSSS` as the SSA issues them: area not 000, 666 or 9xx; group
/// and serial not all zeros.
fn ssn(s: &str) -> bool {
    let (area, group, serial) = (&s[0..3], &s[4..6], &s[7..11]);
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}

fn longest_alnum_run(s: &str) -> usize {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// The longest prefix of `s`, cut at a `sep`, that `valid` accepts: a
/// number followed by more digits (`+1 415 555 2671 42`) is still found.
fn trimmed(s: &str, sep: u8, valid: impl Fn(&str) -> bool) -> Option<usize> {
    let cuts = s
        .bytes()
        .enumerate()
        .filter(|(_, c)| *c == sep)
        .map(|(i, _)| i)
        .rev();
    std::iter::once(s.len())
        .chain(cuts)
        .find(|&end| valid(&s[..end]))
}

/// The widest run of whole digit groups of `s` (cut at spaces and
/// dashes) that `valid` accepts: the whole, or shortened at its end or at
/// its start (`order 12 4111 1111 1111 1111`).
fn windows(s: &str, valid: impl Fn(&Range<usize>) -> bool) -> Option<Range<usize>> {
    let seps: Vec<usize> = s
        .bytes()
        .enumerate()
        .filter(|(_, c)| matches!(c, b' ' | b'-'))
        .map(|(i, _)| i)
        .collect();
    let mut all: Vec<Range<usize>> = std::iter::once(0..s.len())
        .chain(seps.iter().map(|&e| 0..e))
        .chain(seps.iter().map(|&st| st + 1..s.len()))
        .collect();
    all.sort_by_key(|w| std::cmp::Reverse(w.len()));
    all.into_iter().find(|w| valid(w))
}

/// Where a PEM private key that begins at `from` (just after its header)
/// ends: after its `-----END … PRIVATE KEY-----` footer, or, for a key cut
/// short, after the run of lines that look like key material (base64
/// without spaces, or `Name: value` headers).
fn pem_end(text: &str, from: usize) -> usize {
    let rest = &text[from..];
    if let Some(footer) = rest.find("-----END ") {
        let after = footer + "-----END ".len();
        if let Some(close) = rest[after..].find("-----") {
            let footer_name = &rest[after..after + close];
            if footer_name.ends_with("PRIVATE KEY") {
                return from + after + close + 5;
            }
        }
    }
    let mut end = from;
    for line in rest.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let material = body
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='));
        let header = body.contains(": ") && !body.contains("  ");
        if !(material || header || body.is_empty() && end == from) {
            break;
        }
        end += line.len();
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds_in(text: &str) -> Vec<(&'static str, &str)> {
        let d = Detectors::new().unwrap();
        let mut out = Vec::new();
        d.scan(text, KindSet::all(), &mut out);
        out.iter()
            .map(|f| (f.kind.name(), &text[f.span.clone()]))
            .collect()
    }

    /// Each kind's true positives (found exactly, in context) and false
    /// positives (nothing found).
    #[test]
    fn the_corpus() {
        let found: &[(&str, &str, &str)] = &[
            ("email", "write to bob.smith+tag@example.co.uk today", "bob.smith+tag@example.co.uk"),
            ("email", "<alice@mail.example.org>", "alice@mail.example.org"),
            ("email", "a..b@example.com", "b@example.com"),
            ("email", "ops@example.com.42 is wrong", "ops@example.com"),
            ("email", "x@xn--bcher-kva.example", "x@xn--bcher-kva.example"),
            ("email", "bob@example.com-----BEGIN", "bob@example.com"),
            ("phone", "call +1 415 555 2671 now", "+1 415 555 2671"),
            ("phone", "+44 20 7946 0958", "+44 20 7946 0958"),
            ("phone", "+49-30-1234567", "+49-30-1234567"),
            ("phone", "+1 (415) 555-2671", "+1 (415) 555-2671"),
            ("phone", "(415) 555-2671", "(415) 555-2671"),
            ("phone", "tel 415-555-2671.", "415-555-2671"),
            ("phone", "1-415-555-2671", "1-415-555-2671"),
            ("phone", "415.555.2671", "415.555.2671"),
            ("phone", "+1 415 555 2671 4111111 later", "+1 415 555 2671"),
            ("credit_card", "card 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
            ("credit_card", "4111-1111-1111-1111", "4111-1111-1111-1111"),
            ("credit_card", "5555555555554444", "5555555555554444"),
            ("credit_card", "amex 378282246310005", "378282246310005"),
            ("credit_card", "4111 1111 1111 1111 12", "4111 1111 1111 1111"),
            ("credit_card", "order 12 4111 1111 1111 1111", "4111 1111 1111 1111"),
            ("iban", "DE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 00"),
            ("iban", "GB82WEST12345698765432", "GB82WEST12345698765432"),
            ("iban", "to FR14 2004 1010 0505 0001 3M02 606 please", "FR14 2004 1010 0505 0001 3M02 606"),
            ("iban", "DE89 3704 0044 0532 0130 00 AB", "DE89 3704 0044 0532 0130 00"),
            ("us_ssn", "ssn 123-45-6789.", "123-45-6789"),
            ("us_ssn", "078-05-1120", "078-05-1120"),
            ("ipv4", "host 192.168.1.20 is down", "192.168.1.20"),
            ("ipv4", "(10.0.0.1)", "10.0.0.1"),
            ("ipv4", "255.255.255.255", "255.255.255.255"),
            ("secret", "key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"),
            ("secret", "sk-abcdefghijklmnopqrstuvwxyz123456", "sk-abcdefghijklmnopqrstuvwxyz123456"),
            ("secret", "sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe", "sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"),
            ("secret", "AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
            ("secret", "ASIAIOSFODNN7EXAMPLE,", "ASIAIOSFODNN7EXAMPLE"),
            ("secret", "ghp_0123456789abcdefghijABCDEFGHIJ012345", "ghp_0123456789abcdefghijABCDEFGHIJ012345"),
            ("secret", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop"),
            ("secret", "xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij"),
            ("secret", "xoxp-9876543210-ABCDEF", "xoxp-9876543210-ABCDEF"),
            ("secret", "pcl_0123456789abcdef0123456789abcdef01234567", "pcl_0123456789abcdef0123456789abcdef01234567"),
            (
                "secret",
                "my key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1\nq2w3e4r5==\n-----END RSA PRIVATE KEY-----\nthanks",
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1\nq2w3e4r5==\n-----END RSA PRIVATE KEY-----",
            ),
            (
                "secret",
                "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\nhkiG9w0BAQEFAASC\nwhat is this?",
                "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\nhkiG9w0BAQEFAASC\n",
            ),
            ("secret", "-----BEGIN OPENSSH PRIVATE KEY-----", "-----BEGIN OPENSSH PRIVATE KEY-----"),
        ];
        for (kind, text, want) in found {
            assert_eq!(kinds_in(text), [(*kind, *want)], "in {text:?}");
        }
        let clean = [
            // email
            "user@localhost",
            "name@domain.c",
            "@handle and foo@",
            "email at example dot com",
            // phone
            "4155552671",
            "+0 123 456 789",
            "+12 34",
            "2 + 2 = 4, +5 - 3",
            "(015) 555-2671",
            "415-155-2671",
            // credit card: Luhn fails, too short, too long, inside a token
            "4111 1111 1111 1112",
            "order 1234567812345678",
            "411111111111",
            "12345678901234567890123",
            "ID4111111111111111",
            "pi is 3.1415926535897932384",
            // iban
            "DE89 3704 0044 0532 0130 01",
            "GB82WEST1234569876543X",
            "ISBN 9780306406157",
            // ssn
            "000-12-3456",
            "666-12-3456",
            "912-12-3456",
            "123-00-4567",
            "123-45-0000",
            "1123-45-6789",
            // ipv4
            "256.1.1.1",
            "1.2.3",
            "version v1.2.3.4",
            "oid 1.3.6.1.4.1",
            // secrets
            "sk-learn-tutorial-for-beginners-2024",
            "sk-short",
            "desk-reservation-system-for-the-office",
            "AKIAIOSFODNN7EXAMP",
            "ghp_tooshort",
            "xoxb-abcdefghijk",
            "pcl_0123",
            "-----BEGIN PUBLIC KEY-----",
            "-----BEGIN CERTIFICATE-----",
            // prose, CJK and emoji
            "The quick brown fox jumps over the lazy dog at 10:30 on 2024-05-01.",
            "東京都の天気は晴れです 🌞 電話は後で",
        ];
        for text in clean {
            assert_eq!(kinds_in(text), [], "in {text:?}");
        }
    }

    #[test]
    fn the_search_goes_on_after_a_trimmed_finding() {
        let text = "DE89 3704 0044 0532 0130 00 GB82 WEST 1234 5698 7654 32";
        assert_eq!(
            kinds_in(text),
            [
                ("iban", "DE89 3704 0044 0532 0130 00"),
                ("iban", "GB82 WEST 1234 5698 7654 32")
            ]
        );
    }

    #[test]
    fn overlapping_findings_merge_and_masking_labels_each() {
        let text = "mail bob@example.com, card 4111111111111111, ip 10.1.2.3";
        let d = Detectors::new().unwrap();
        let mut out = Vec::new();
        d.scan(text, KindSet::all(), &mut out);
        assert_eq!(
            mask(text, &out),
            "mail [EMAIL], card [CREDIT_CARD], ip [IPV4]"
        );
        // Only the kinds asked for.
        let mut only = KindSet::default();
        only.insert(Kind::Ipv4);
        out.clear();
        d.scan(text, only, &mut out);
        assert_eq!(
            mask(text, &out),
            "mail bob@example.com, card 4111111111111111, ip [IPV4]"
        );
        // A secret that holds an email-like part is one span.
        let text = "sk-Abcdefghijklmnopqrstuv@example.com";
        out.clear();
        d.scan(text, KindSet::all(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(mask(text, &out), "[SECRET]");
    }

    #[test]
    fn kinds_round_trip_by_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
            assert_eq!(k.label(), format!("[{}]", k.name().to_uppercase()));
        }
        assert_eq!(Kind::parse("ssn"), None);
        assert_eq!(KindSet::all().iter().count(), 7);
    }
}
