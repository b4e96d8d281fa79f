//! Just enough of Kubernetes' protobuf encoding to read a `SelfSubjectAccessReview`'s spec:
//! kubectl sends built-in types as `application/vnd.kubernetes.protobuf` (answers may be JSON,
//! which it also accepts).
//!
//! Contract: [`access_review_spec`] reads the envelope (`k8s\0` then a `runtime.Unknown` whose
//! field 2 is the object's bytes) and the spec's `resourceAttributes` (namespace 1, verb 2,
//! group 3, version 4, resource 5, subresource 6, name 7) or `nonResourceAttributes` (path 1,
//! verb 2), as `k8s.io/api/authorization/v1/generated.proto` numbers them, into the JSON shape
//! the JSON encoding has. Anything malformed is `None`; unknown fields are skipped.

use serde_json::{Map, Value};

const MAGIC: &[u8] = b"k8s\0";

/// One field: its number and, for length-delimited ones, its bytes.
struct Field<'a> {
    number: u64,
    bytes: Option<&'a [u8]>,
}

fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn fields(buf: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < buf.len() {
        let key = varint(buf, &mut at)?;
        let number = key >> 3;
        match key & 7 {
            0 => {
                varint(buf, &mut at)?;
                out.push(Field {
                    number,
                    bytes: None,
                });
            }
            1 => at = at.checked_add(8)?,
            5 => at = at.checked_add(4)?,
            2 => {
                let len = usize::try_from(varint(buf, &mut at)?).ok()?;
                let end = at.checked_add(len)?;
                out.push(Field {
                    number,
                    bytes: Some(buf.get(at..end)?),
                });
                at = end;
            }
            _ => return None,
        }
    }
    (at == buf.len()).then_some(out)
}

fn field(buf: &[u8], number: u64) -> Option<&[u8]> {
    fields(buf)?.into_iter().find(|f| f.number == number)?.bytes
}

fn strings(buf: &[u8], names: &[&str]) -> Option<Value> {
    let mut out = Map::new();
    for f in fields(buf)? {
        let name = usize::try_from(f.number)
            .ok()
            .and_then(|n| names.get(n.checked_sub(1)?));
        if let (Some(name), Some(bytes)) = (name, f.bytes) {
            out.insert(
                (*name).to_owned(),
                Value::String(String::from_utf8_lossy(bytes).into_owned()),
            );
        }
    }
    Some(Value::Object(out))
}

/// The spec of a protobuf-encoded `SelfSubjectAccessReview`, as JSON.
pub fn access_review_spec(body: &[u8]) -> Option<Value> {
    let unknown = body.strip_prefix(MAGIC)?;
    let review = field(unknown, 2)?;
    let spec = field(review, 2)?;
    let mut out = Map::new();
    if let Some(r) = field(spec, 1) {
        let names = [
            "namespace",
            "verb",
            "group",
            "version",
            "resource",
            "subresource",
            "name",
        ];
        out.insert("resourceAttributes".into(), strings(r, &names)?);
    }
    if let Some(n) = field(spec, 2) {
        out.insert(
            "nonResourceAttributes".into(),
            strings(n, &["path", "verb"])?,
        );
    }
    Some(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(number: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![number << 3 | 2, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn reads_the_spec_kubectl_sends() {
        let attrs = [ld(1, b"team-a"), ld(2, b"get"), ld(5, b"pods")].concat();
        let spec = ld(1, &attrs);
        let review = [ld(1, b""), ld(2, &spec), ld(3, b"")].concat();
        let type_meta = [
            ld(1, b"authorization.k8s.io/v1"),
            ld(2, b"SelfSubjectAccessReview"),
        ]
        .concat();
        let body = [MAGIC.to_vec(), ld(1, &type_meta), ld(2, &review)].concat();
        let got = access_review_spec(&body).expect("decodes");
        assert_eq!(got["resourceAttributes"]["namespace"], "team-a");
        assert_eq!(got["resourceAttributes"]["verb"], "get");
        assert_eq!(got["resourceAttributes"]["resource"], "pods");
        assert!(access_review_spec(b"{}").is_none());
        assert!(access_review_spec(&body[..body.len() - 3]).is_none());
    }
}
