//! The few pieces of the gRPC-over-HTTP/2 wire format the proxy needs; payloads are never
//! parsed, only their 5-byte length prefixes are followed.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

pub const UNKNOWN: u32 = 2;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const NOT_FOUND: u32 = 5;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const FAILED_PRECONDITION: u32 = 9;
pub const UNAVAILABLE: u32 = 14;

/// `grpc-timeout` (e.g. `250m`) as a duration; None when malformed.
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-status` and `grpc-message` (percent-encoded UTF-8, as the gRPC spec asks).
pub fn status_headers(code: u32, message: &str) -> HeaderMap {
    let mut encoded = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let mut h = HeaderMap::with_capacity(3);
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert(
        "grpc-message",
        HeaderValue::from_str(&encoded).expect("percent-encoded text is a valid header value"),
    );
    h
}

/// The `grpc-status` of a header block, if it has one.
pub fn status_of(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get("grpc-status").map(HeaderValue::as_bytes)
}

/// A `grpc-status` value as a number (None when it is not one).
pub fn parse_code(value: &[u8]) -> Option<u32> {
    if value.is_empty() || value.len() > 3 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// "UNAVAILABLE: message" for the status in a header block, if it has one.
pub fn status_text(headers: &HeaderMap) -> Option<String> {
    let code = status_of(headers)?;
    let name = match parse_code(code) {
        Some(c) => CODE_NAMES.get(c as usize).copied().unwrap_or("UNKNOWN"),
        None => "UNKNOWN",
    };
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some(if message.is_empty() {
        name.to_string()
    } else {
        format!("{name}: {message}")
    })
}

fn percent_decode(text: &[u8]) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let hex = text
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (text[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The largest message to allow on a body with these headers: `limit` for gRPC
/// (`content-type: application/grpc…`), none for anything else, whose body has no gRPC
/// message framing to follow.
pub fn message_limit(headers: &http::HeaderMap, limit: usize) -> usize {
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        limit
    } else {
        usize::MAX
    }
}

/// Follows gRPC length-prefixed message boundaries through a byte stream, without copying,
/// to enforce a largest message size.
pub struct Meter {
    limit: usize,
    remaining: usize,
    prefix: [u8; 5],
    have: usize,
}

impl Meter {
    pub fn new(limit: usize) -> Self {
        Meter {
            limit,
            remaining: 0,
            prefix: [0; 5],
            have: 0,
        }
    }

    /// Feeds the next bytes; the size of a message over the limit, if one starts here.
    pub fn feed(&mut self, mut data: &[u8]) -> Option<usize> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                if len > self.limit {
                    return Some(len);
                }
                self.remaining = len;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout(b"12345678n"),
            Some(Duration::from_nanos(12345678))
        );
        assert_eq!(parse_timeout(b"m"), None);
        assert_eq!(parse_timeout(b"123456789S"), None);
        assert_eq!(parse_timeout(b"1x"), None);
        assert_eq!(parse_timeout(b"-1S"), None);
    }

    #[test]
    fn meter_follows_prefixes_split_anywhere() {
        let mut stream = Vec::new();
        for len in [3u32, 0, 10, 7] {
            stream.push(0);
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend(std::iter::repeat_n(b'x', len as usize));
        }
        for cut in 0..stream.len() {
            let mut m = Meter::new(10);
            assert_eq!(m.feed(&stream[..cut]), None);
            assert_eq!(m.feed(&stream[cut..]), None);
            let mut small = Meter::new(9);
            let over = small
                .feed(&stream[..cut])
                .or_else(|| small.feed(&stream[cut..]));
            assert_eq!(over, Some(10), "cut at {cut}");
        }
    }

    #[test]
    fn codes_and_their_text() {
        assert_eq!(parse_code(b"14"), Some(14));
        assert_eq!(parse_code(b"-1"), None);
        assert_eq!(parse_code(b""), None);
        assert_eq!(parse_code(b"1234"), None);
        let h = status_headers(14, "down 100%");
        assert_eq!(status_text(&h).unwrap(), "UNAVAILABLE: down 100%");
        assert_eq!(status_text(&HeaderMap::new()), None);
    }

    #[test]
    fn messages_are_percent_encoded() {
        let h = status_headers(14, "no, 100% (échec)");
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "no, 100%25 (%C3%A9chec)");
    }
}
