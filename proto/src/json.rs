//! JSON documents on the wire (`google.protobuf.Value`: a task's input and output) and as
//! text (`input.data`, `output.data` in a task's work directory).

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

/// `value` as JSON text; `None` if it holds a number JSON cannot write (NaN, infinity).
pub fn to_text(value: &Value) -> Option<String> {
    to_json(value).map(|json| json.to_string())
}

/// `value` as a `serde_json` value; `None` as in [`to_text`].
pub fn to_json(value: &Value) -> Option<serde_json::Value> {
    Some(match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n)?.into(),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .map(to_json)
            .collect::<Option<Vec<_>>>()?
            .into(),
        Some(Kind::StructValue(object)) => object
            .fields
            .iter()
            .map(|(k, v)| Some((k.clone(), to_json(v)?)))
            .collect::<Option<serde_json::Map<_, _>>>()?
            .into(),
    })
}

/// A double as JSON writes it: whole numbers that a double holds exactly as integers (`1`,
/// not `1.0`, as proto3's JSON mapping prints them), others as they are.
fn number(n: f64) -> Option<serde_json::Number> {
    const EXACT: f64 = (1u64 << 53) as f64;
    if n.fract() == 0.0 && n.abs() <= EXACT {
        return Some((n as i64).into());
    }
    serde_json::Number::from_f64(n)
}

/// A `serde_json` value on the wire. Numbers become doubles, as in proto3's JSON mapping.
pub fn from_json(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(from_json).collect(),
        }),
        serde_json::Value::Object(fields) => Kind::StructValue(Struct {
            fields: fields.into_iter().map(|(k, v)| (k, from_json(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_round_trip_and_non_finite_numbers_are_refused() {
        let json: serde_json::Value =
            serde_json::from_str(r#"{"a":[1,-2.5,"x",null,true,1e300],"b":{"c":{}}}"#).unwrap();
        let value = from_json(json.clone());
        assert_eq!(to_json(&value), Some(json));
        let nan = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        let nested = from_json(serde_json::json!({ "k": [0] }));
        let Some(Kind::StructValue(mut object)) = nested.kind else {
            unreachable!()
        };
        object.fields.insert("bad".into(), nan.clone());
        assert_eq!(
            to_text(&Value {
                kind: Some(Kind::StructValue(object))
            }),
            None
        );
        assert_eq!(to_text(&nan), None);
        assert_eq!(to_text(&Value::default()), Some("null".into()));
    }
}
