//! Hexadecimal text for fixed-size ids ([`KeyId`](crate::ticket::KeyId),
//! [`SessionId`](crate::ticket::SessionId)) in logs, configs and URLs.
//!
//! Encoding is always lowercase; decoding accepts either case. Decoding is
//! total: any string gives the bytes or a [`HexError`].

use std::fmt;

/// Why a string is not the hex form of an `N`-byte id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    /// The string does not have exactly twice as many characters as the id has bytes.
    #[error("expected {expected} hex digits, got a string of {found} bytes: paste the whole id")]
    WrongLength {
        /// Number of hex digits an id of this type has.
        expected: usize,
        /// Length in bytes of the string that was given.
        found: usize,
    },
    /// A character is not one of `0-9`, `a-f`, `A-F`.
    #[error("byte {index} of the string is not a hex digit (0-9, a-f, A-F)")]
    InvalidDigit {
        /// Byte offset of the first offending character.
        index: usize,
    },
}

/// Encodes `bytes` as lowercase hex, two digits per byte.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Decodes exactly `2 * N` hex digits (either case) into `N` bytes.
pub fn decode<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    let text = s.as_bytes();
    if text.len() != 2 * N {
        return Err(HexError::WrongLength {
            expected: 2 * N,
            found: text.len(),
        });
    }
    let mut out = [0u8; N];
    for (i, (byte, pair)) in out.iter_mut().zip(text.chunks_exact(2)).enumerate() {
        let hi = digit(pair[0]).ok_or(HexError::InvalidDigit { index: 2 * i })?;
        let lo = digit(pair[1]).ok_or(HexError::InvalidDigit { index: 2 * i + 1 })?;
        *byte = (hi << 4) | lo;
    }
    Ok(out)
}

/// Writes `bytes` as lowercase hex into a formatter (for `Display` impls).
pub(crate) fn write(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = [0x00, 0x01, 0x7f, 0x80, 0xab, 0xff];
        let text = encode(&bytes);
        assert_eq!(text, "00017f80abff");
        assert_eq!(decode::<6>(&text), Ok(bytes));
        assert_eq!(decode::<6>("00017F80ABFF"), Ok(bytes));
    }

    #[test]
    fn errors() {
        assert_eq!(
            decode::<2>("abc"),
            Err(HexError::WrongLength {
                expected: 4,
                found: 3
            })
        );
        assert_eq!(
            decode::<2>("ab0g"),
            Err(HexError::InvalidDigit { index: 3 })
        );
        // Multi-byte UTF-8 is counted in bytes and never panics.
        assert_eq!(decode::<1>("é"), Err(HexError::InvalidDigit { index: 0 }));
        assert!(decode::<1>("ééé").is_err());
        assert_eq!(decode::<0>(""), Ok([]));
    }

    proptest::proptest! {
        #[test]
        fn decode_is_total(s in ".{0,40}") {
            let _ = decode::<8>(&s);
            let _ = decode::<16>(&s);
        }

        #[test]
        fn encode_decode(bytes in proptest::array::uniform16(proptest::prelude::any::<u8>())) {
            proptest::prop_assert_eq!(decode::<16>(&encode(&bytes)), Ok(bytes));
        }
    }
}
