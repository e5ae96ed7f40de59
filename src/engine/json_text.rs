//! JSON text written the way Python's `json.dumps` writes it (default settings): string
//! escapes with `ensure_ascii=True`, and floats as `float.__repr__` spells them. Pure text work,
//! shared by the Python layer's encoder and tested without Python.

use std::fmt::Write;

/// Lets `write!` append to a byte buffer.
pub struct Utf8<'a>(pub &'a mut Vec<u8>);

impl Write for Utf8<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends UTF-8 text (or surrogate-passing UTF-8) escaped as `json.dumps` escapes it with
/// `ensure_ascii=True`: printable ASCII as is except `"` and `\`, the five short escapes, and
/// every other character as `\uXXXX` (lowercase hex; above U+FFFF as a surrogate pair).
pub fn escape(out: &mut Vec<u8>, text: &[u8]) {
    out.reserve(text.len());
    let mut index = 0;
    while index < text.len() {
        // Copy the run of bytes that need no escape in one go.
        let run = text[index..]
            .iter()
            .position(|&b| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\')
            .unwrap_or(text.len() - index);
        out.extend_from_slice(&text[index..index + run]);
        index += run;
        let Some(&lead) = text.get(index) else { break };
        let (code, width) = match lead {
            0x00..=0x7f => (u32::from(lead), 1),
            0xc0..=0xdf => (
                decode_tail(u32::from(lead & 0x1f), &text[index + 1..], 1),
                2,
            ),
            0xe0..=0xef => (
                decode_tail(u32::from(lead & 0x0f), &text[index + 1..], 2),
                3,
            ),
            _ => (
                decode_tail(u32::from(lead & 0x07), &text[index + 1..], 3),
                4,
            ),
        };
        index += width;
        match code {
            0x22 => out.extend_from_slice(b"\\\""),
            0x5c => out.extend_from_slice(b"\\\\"),
            0x0a => out.extend_from_slice(b"\\n"),
            0x0d => out.extend_from_slice(b"\\r"),
            0x09 => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x10000.. => {
                let offset = code - 0x10000;
                push_u_escape(out, 0xd800 | (offset >> 10));
                push_u_escape(out, 0xdc00 | (offset & 0x3ff));
            }
            _ => push_u_escape(out, code),
        }
    }
}

/// The code point of a multi-byte sequence, from its lead bits and `count` continuation bytes
/// (the text came from Python, so the sequence is whole).
fn decode_tail(lead_bits: u32, rest: &[u8], count: usize) -> u32 {
    rest[..count].iter().fold(lead_bits, |code, &byte| {
        (code << 6) | u32::from(byte & 0x3f)
    })
}

fn push_u_escape(out: &mut Vec<u8>, unit: u32) {
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[((unit >> shift) & 0xf) as usize]);
    }
}

/// Appends `repr(value)` for a finite float.
///
/// ryu gives the shortest digits that read back as the same double and, among those, the
/// closest to it: what Python's repr picks too. (Rust's own `{:e}` is shortest but not always
/// closest: -1113178120592002.2 came out as ...2.3.) Python then writes plain decimals when the
/// exponent is from -4 to 15 (with ".0" if there is no fraction), and otherwise `d.ddde+XX`,
/// with a sign and at least two exponent digits.
pub fn write_float_repr(out: &mut Vec<u8>, value: f64) {
    let mut buffer = ryu::Buffer::new();
    let (negative, digits, exponent) = decimal_parts(buffer.format_finite(value));
    if negative {
        out.push(b'-');
    }
    if !(-4..16).contains(&exponent) {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        let sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(Utf8(out), "e{sign}{:02}", exponent.unsigned_abs());
        return;
    }
    // Where the decimal point goes, counted in digits from the left.
    let point = exponent + 1;
    if point <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', point.unsigned_abs() as usize));
        out.extend_from_slice(&digits);
    } else if point as usize >= digits.len() {
        out.extend_from_slice(&digits);
        out.extend(std::iter::repeat_n(b'0', point as usize - digits.len()));
        out.extend_from_slice(b".0");
    } else {
        out.extend_from_slice(&digits[..point as usize]);
        out.push(b'.');
        out.extend_from_slice(&digits[point as usize..]);
    }
}

/// A decimal number's text (`-0.00123`, `1234.5`, `1.5e-7`) as (negative, significant digits,
/// exponent of the first digit): 0.00123 is (false, "123", -3). Zero is "0" with exponent 0.
fn decimal_parts(text: &str) -> (bool, Vec<u8>, i32) {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, power) = match text.split_once(['e', 'E']) {
        Some((mantissa, power)) => (mantissa, power.parse().unwrap_or(0)),
        None => (text, 0),
    };
    let whole_len = mantissa.find('.').unwrap_or(mantissa.len()) as i32;
    let all: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    let Some(first) = all.iter().position(|&d| d != b'0') else {
        return (negative, vec![b'0'], 0);
    };
    let last = all.iter().rposition(|&d| d != b'0').unwrap_or(first);
    let exponent = whole_len - 1 - first as i32 + power;
    (negative, all[first..=last].to_vec(), exponent)
}

#[cfg(test)]
mod tests {
    use super::{escape, write_float_repr};

    fn repr(value: f64) -> String {
        let mut out = Vec::new();
        write_float_repr(&mut out, value);
        String::from_utf8(out).unwrap()
    }

    fn escaped(text: &[u8]) -> String {
        let mut out = Vec::new();
        escape(&mut out, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_json_dumps_escapes_them() {
        assert_eq!(escaped(b"plain text"), "plain text");
        assert_eq!(escaped(b"\"a\\b\""), "\\\"a\\\\b\\\"");
        assert_eq!(escaped(b"\n\r\t\x08\x0c"), "\\n\\r\\t\\b\\f");
        assert_eq!(escaped(b"\x00\x1f\x7f"), "\\u0000\\u001f\\u007f");
        assert_eq!(escaped("é€".as_bytes()), "\\u00e9\\u20ac");
        assert_eq!(escaped("😀".as_bytes()), "\\ud83d\\ude00");
        // A lone surrogate as str.encode("utf-8", "surrogatepass") gives it.
        assert_eq!(escaped(b"\xed\xa0\x80x"), "\\ud800x");
    }

    #[test]
    fn floats_are_written_as_python_writes_them() {
        for (value, python) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-7, "1e-07"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (123456789012345680000.0, "1.2345678901234568e+20"),
            (1.5e300, "1.5e+300"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-12.25, "-12.25"),
            (-1113178120592002.2, "-1113178120592002.2"),
            (-233891771783429.62, "-233891771783429.62"),
            (100.0, "100.0"),
            (1234.5, "1234.5"),
            (0.00123, "0.00123"),
        ] {
            assert_eq!(repr(value), python, "{value:e}");
        }
    }
}
