//! Content decoding: a body as sent (gzip, a `data=` form, a beacon's `text/plain`) to the
//! JSON bytes inside it, with the decompressed size capped.

use std::borrow::Cow;
use std::io::Read;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;

use super::{Limits, PayloadError};

/// Undoes `Content-Encoding` and the form wrapping of a body, leaving JSON bytes.
///
/// The decompressed size is capped too: a 500 KB gzip body can inflate to gigabytes. A body
/// of plain JSON, the common case, is the request's own bytes, not a copy.
pub fn decode_body<'a>(
    raw: &'a [u8],
    content_encoding: Option<&str>,
    content_type: Option<&str>,
    limits: &Limits,
) -> Result<Cow<'a, [u8]>, PayloadError> {
    let too_large = PayloadError::TooLarge {
        what: "request body",
        limit: limits.max_request_bytes,
    };
    if raw.len() > limits.max_request_bytes {
        return Err(too_large);
    }
    let body = match content_encoding.map(|e| e.trim().to_ascii_lowercase()) {
        None => Cow::Borrowed(raw),
        Some(e) if e.is_empty() || e == "identity" => Cow::Borrowed(raw),
        Some(e) if e == "gzip" || e == "x-gzip" => {
            let mut out =
                Vec::with_capacity(raw.len().saturating_mul(4).min(limits.max_request_bytes));
            let cap = u64::try_from(limits.max_request_bytes)
                .unwrap_or(u64::MAX)
                .saturating_add(1);
            flate2::read::MultiGzDecoder::new(raw)
                .take(cap)
                .read_to_end(&mut out)
                .map_err(|err| {
                    PayloadError::BadRequest(format!("body is not valid gzip ({err})"))
                })?;
            if out.len() > limits.max_request_bytes {
                return Err(too_large);
            }
            Cow::Owned(out)
        }
        Some(other) => {
            return Err(PayloadError::BadRequest(format!(
                "Content-Encoding {other:?} is not supported; send gzip or no encoding"
            )))
        }
    };
    // A form body is `data=<base64>`. curl and many HTTP libraries label plain JSON as a form
    // by default, so a body that starts like JSON is read as JSON whatever its label says.
    let starts_like_json = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[');
    let is_form = !starts_like_json
        && (body.starts_with(b"data=")
            || content_type.is_some_and(|t| {
                t.trim_start()
                    .starts_with("application/x-www-form-urlencoded")
            }));
    if is_form {
        return form_data(&body).map(Cow::Owned);
    }
    Ok(body)
}

/// The JSON inside a `data=<base64>` form body, as browser SDKs send it.
fn form_data(body: &[u8]) -> Result<Vec<u8>, PayloadError> {
    data_field(body, "form body")
}

/// The JSON of a Segment pixel request, `GET /v1/pixel/<type>?data=<base64 JSON>`: the query
/// string has the form body's shape.
pub fn pixel_data(query: &str) -> Result<Vec<u8>, PayloadError> {
    data_field(query.as_bytes(), "pixel query")
}

/// The `data` field of a URL-encoded form (`what` names it in errors): base64 of the JSON, or
/// the JSON itself (Segment calls the base64 step optional).
fn data_field(form: &[u8], what: &str) -> Result<Vec<u8>, PayloadError> {
    let data = url::form_urlencoded::parse(form)
        .find(|(name, _)| name == "data")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| {
            PayloadError::BadRequest(format!("{what} has no data field; send data=<base64 JSON>"))
        })?;
    if data.trim_start().starts_with('{') {
        return Ok(data.into_bytes());
    }
    decode_base64(&data).ok_or_else(|| {
        PayloadError::BadRequest(format!(
            "the data field of the {what} is not base64; send data=<base64 JSON>"
        ))
    })
}

/// Standard or URL-safe base64, padded or not (SDKs differ).
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    // A standard-alphabet `+` put into a URL or form unescaped arrives URL-decoded as a space,
    // and a space is never base64: it can only have been a `+`, even at the end.
    let s = s.replace(' ', "+");
    let s = s.trim();
    GeneralPurpose::new(&alphabet::STANDARD, config)
        .decode(s)
        .or_else(|_| GeneralPurpose::new(&alphabet::URL_SAFE, config).decode(s))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_and_forms_decode_and_bombs_are_capped() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let limits = Limits::default();
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"{\"a\":1}").unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(
            &*decode_body(&gz, Some("gzip"), None, &limits).unwrap(),
            b"{\"a\":1}"
        );
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 5_000_000]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < limits.max_request_bytes);
        assert!(matches!(
            decode_body(&bomb, Some("gzip"), None, &limits),
            Err(PayloadError::TooLarge { .. })
        ));
        let form = b"data=eyJhIjoxfQ%3D%3D";
        assert_eq!(
            &*decode_body(
                form,
                Some("identity"),
                Some("application/x-www-form-urlencoded"),
                &limits
            )
            .unwrap(),
            b"{\"a\":1}"
        );
        assert!(decode_body(b"x", Some("br"), None, &limits).is_err());
        // curl -d labels JSON as a form: JSON it stays.
        assert_eq!(
            &*decode_body(
                b" {\"a\":1}",
                None,
                Some("application/x-www-form-urlencoded"),
                &limits
            )
            .unwrap(),
            b" {\"a\":1}"
        );
    }

    #[test]
    fn base64_of_either_alphabet_and_unescaped_plus_decode() {
        // "~~~" is "fn5+" in the standard alphabet, "fn5-" in the URL-safe one.
        for encoded in ["fn5+", "fn5-", "fn5 ", "fn5+\r\n", "e30=", "e30"] {
            assert!(decode_base64(encoded).is_some(), "{encoded:?}");
        }
        assert_eq!(decode_base64("fn5 ").unwrap(), b"~~~");
        assert_eq!(decode_base64("e30").unwrap(), b"{}");
        assert!(decode_base64("not*base64").is_none());
        assert_eq!(pixel_data("x=1&data=e30").unwrap(), b"{}");
        assert_eq!(pixel_data("data=%7B%7D").unwrap(), b"{}", "JSON as is");
        for bad in ["", "x=1", "data=%%", "data=*"] {
            assert!(
                matches!(pixel_data(bad), Err(PayloadError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }
}
