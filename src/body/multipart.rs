//! `multipart/form-data` bodies (audio uploads): the framing is checked
//! strictly and the `model` part against the allowlist; the body then goes
//! to the router byte for byte, never re-serialised.
//!
//! Strict means: a `boundary` parameter; the body starts with the first
//! boundary (no preamble) and ends with the closing one (no epilogue but a
//! final CRLF); every part has `Content-Disposition: form-data; name=...`;
//! exactly one `model` part. The parsing itself is `multer`'s.

use std::convert::Infallible;

use bytes::Bytes;

use super::{policy, Judged};
use crate::reject::{Reject, RejectCode};
use crate::route::RouteSpec;
use crate::tenant::{Feature, FeatureSet, Tenant};

/// The longest `model` or `stream` value read: a form field, not a file.
const MAX_SMALL_FIELD: usize = 256;

/// Judges a complete multipart body for `route` on behalf of `tenant`.
pub async fn judge(
    route: &RouteSpec,
    tenant: &Tenant,
    content_type: Option<&str>,
    raw: Bytes,
) -> Result<Judged, Reject> {
    let form = read(content_type, raw.clone()).await?;
    let Some(model) = form.model else {
        let mut r = invalid("the form has no model part");
        r.param = Some("model".into());
        return Err(r);
    };
    let mut features = FeatureSet::default();
    if form.stream {
        features.insert(Feature::Stream);
    }
    let model_label = policy::check(route.api, tenant, &model, features)?.to_string();
    Ok(Judged {
        body: raw,
        model,
        model_label,
        features,
        prompt_tokens: 0,
        max_output_tokens: 0,
        usage_requested: true,
    })
}

/// What the gateway reads of a well-formed form.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Form {
    pub model: Option<String>,
    pub stream: bool,
}

/// Checks the framing of a whole body and reads its `model` and `stream`
/// parts.
pub async fn read(content_type: Option<&str>, raw: Bytes) -> Result<Form, Reject> {
    let boundary = content_type
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(|| {
            invalid("multipart/form-data needs a boundary parameter of 1 to 70 characters")
        })?;
    let opening = format!("--{boundary}\r\n");
    let closing = format!("\r\n--{boundary}--");
    let ends = raw.ends_with(closing.as_bytes())
        || raw
            .strip_suffix(b"\r\n")
            .is_some_and(|r| r.ends_with(closing.as_bytes()));
    if !raw.starts_with(opening.as_bytes()) || !ends {
        return Err(invalid(
            "the form must start with its boundary and end with the closing boundary",
        ));
    }
    let body = futures::stream::once(async move { Ok::<_, Infallible>(raw) });
    let mut parts = multer::Multipart::new(body, boundary);
    let mut form = Form::default();
    let mut seen_model = false;
    loop {
        let field = match parts.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(invalid(format!("malformed multipart form: {e}"))),
        };
        let Some(name) = field.name().map(str::to_owned) else {
            return Err(invalid(
                "every part needs Content-Disposition: form-data with a name",
            ));
        };
        let small = matches!(name.as_str(), "model" | "stream");
        let value = field
            .bytes()
            .await
            .map_err(|e| invalid(format!("malformed multipart form: {e}")))?;
        if !small {
            continue;
        }
        if value.len() > MAX_SMALL_FIELD {
            return Err(param(
                invalid(format!("the {name} part is too long")),
                &name,
            ));
        }
        let text = std::str::from_utf8(&value)
            .map_err(|_| param(invalid(format!("the {name} part is not UTF-8")), &name))?;
        if name == "model" {
            if seen_model {
                return Err(param(
                    invalid("the form has more than one model part"),
                    "model",
                ));
            }
            seen_model = true;
            form.model = Some(text.to_string());
        } else {
            form.stream = text.trim() == "true";
        }
    }
    Ok(form)
}

fn invalid(message: impl Into<std::borrow::Cow<'static, str>>) -> Reject {
    Reject::bad_request(RejectCode::InvalidRequest, message)
}

fn param(mut r: Reject, name: &str) -> Reject {
    r.param = Some(name.into());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "multipart/form-data; boundary=XyZ";

    fn form(parts: &[(&str, &str)]) -> String {
        let mut s = String::new();
        for (head, value) in parts {
            s.push_str(&format!("--XyZ\r\n{head}\r\n\r\n{value}\r\n"));
        }
        s.push_str("--XyZ--\r\n");
        s
    }

    fn read_now(ct: Option<&str>, body: &str) -> Result<Form, Reject> {
        futures::executor::block_on(read(ct, Bytes::from(body.to_string())))
    }

    #[test]
    fn a_well_formed_form_yields_its_model() {
        let body = form(&[
            ("Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav", "RIFF\0\0bytes"),
            ("Content-Disposition: form-data; name=\"model\"", "whisper-1"),
            ("Content-Disposition: form-data; name=\"stream\"", "true"),
        ]);
        let f = read_now(Some(CT), &body).unwrap();
        assert_eq!(
            f,
            Form {
                model: Some("whisper-1".into()),
                stream: true
            }
        );
        let no_model = form(&[("Content-Disposition: form-data; name=\"file\"", "x")]);
        assert_eq!(read_now(Some(CT), &no_model).unwrap().model, None);
    }

    #[test]
    fn malformed_framing_is_refused() {
        let model = ("Content-Disposition: form-data; name=\"model\"", "m");
        let good = form(&[model]);
        let bad = |ct: Option<&str>, body: &str| {
            let r = read_now(ct, body).unwrap_err();
            assert_eq!(
                (r.status, r.code.as_str()),
                (400, "invalid_request"),
                "{body:?}"
            );
        };
        bad(None, &good);
        bad(Some("multipart/form-data"), &good);
        bad(Some(CT), &format!("preamble\r\n{good}"));
        bad(Some(CT), &format!("{good}epilogue"));
        bad(Some(CT), good.trim_end_matches("--\r\n"));
        bad(Some(CT), &form(&[("Content-Type: text/plain", "m")]));
        bad(Some(CT), &form(&[model, model]));
        bad(
            Some(CT),
            &form(&[(
                "Content-Disposition: form-data; name=\"model\"",
                &"m".repeat(300),
            )]),
        );
        bad(
            Some(CT),
            "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n--XyZ--",
        );
    }
}
