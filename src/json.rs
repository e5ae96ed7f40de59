//! JSON bytes <-> Python objects.
//!
//! Decoding streams serde_json's parser straight into Python objects through pythonize's
//! `Pythonizer` (serde-transcode glues the two), so no intermediate `serde_json::Value` tree is
//! built. Encoding walks the Python object with our own `Serialize` so it follows `json.dumps`
//! exactly where it matters: the same accepted types (no bytes, sets or arbitrary sequences), the
//! same dict-key coercions, `", "` / `": "` separators and ASCII-only output, so a default reply is
//! byte-for-byte what the seed's server sends.

use std::cell::RefCell;
use std::io;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::ser::Formatter;

use crate::errors;

/// Nesting deeper than this is refused (as a cycle would otherwise recurse forever).
const MAX_DEPTH: usize = 512;

/// Decodes JSON text into the matching Python value (dict, list, str, int, float, bool, None).
pub fn loads<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = serde_transcode::transcode(&mut de, pythonize::Pythonizer::new(py))
        .map_err(|_| decode_error(py, text))?;
    de.end()
        .map_err(|err| errors::json_decode_error(py, text, &err))?;
    Ok(value)
}

/// Re-parses failed input with serde_json alone, to get its exact complaint and position (the
/// transcoder reports it only as text). Only the error path pays for this second parse.
fn decode_error(py: Python<'_>, text: &[u8]) -> PyErr {
    match serde_json::from_slice::<serde_json::Value>(text) {
        Err(err) => errors::json_decode_error(py, text, &err),
        // Valid JSON that pythonize could not build (should not happen for JSON input).
        Ok(_) => PyValueError::new_err("reply could not be converted to Python objects"),
    }
}

/// Encodes a Python value as JSON text in `json.dumps`' default style.
pub fn dumps(value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let failure = RefCell::new(None);
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, DumpsStyle);
    let walk = PyJson {
        value,
        depth: 0,
        failure: &failure,
    };
    match walk.serialize(&mut ser) {
        Ok(()) => Ok(out),
        Err(err) => Err(failure
            .into_inner()
            .unwrap_or_else(|| PyValueError::new_err(err.to_string()))),
    }
}

/// A Python value seen through serde; keeps the first Python exception for `dumps` to raise.
struct PyJson<'a, 'py> {
    value: &'a Bound<'py, PyAny>,
    depth: usize,
    failure: &'a RefCell<Option<PyErr>>,
}

impl PyJson<'_, '_> {
    fn fail<E: serde::ser::Error>(&self, err: PyErr) -> E {
        let message = err.to_string();
        self.failure.borrow_mut().get_or_insert(err);
        E::custom(message)
    }

    fn child<'a, 'py>(&'a self, value: &'a Bound<'py, PyAny>) -> PyJson<'a, 'py>
    where
        'a: 'py,
    {
        PyJson {
            value,
            depth: self.depth + 1,
            failure: self.failure,
        }
    }
}

impl Serialize for PyJson<'_, '_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let value = self.value;
        if self.depth > MAX_DEPTH {
            return Err(self.fail(PyValueError::new_err(
                "value is nested too deeply to encode as JSON (circular reference?)",
            )));
        }
        if let Ok(text) = value.cast::<PyString>() {
            let text = text.to_cow().map_err(|e| self.fail(e))?;
            ser.serialize_str(&text)
        } else if value.is_none() {
            ser.serialize_unit()
        } else if let Ok(flag) = value.cast::<PyBool>() {
            ser.serialize_bool(flag.is_true())
        } else if let Ok(int) = value.cast::<PyInt>() {
            if let Ok(small) = int.extract::<i64>() {
                ser.serialize_i64(small)
            } else if let Ok(big) = int.extract::<i128>() {
                ser.serialize_i128(big)
            } else if let Ok(big) = int.extract::<u128>() {
                ser.serialize_u128(big)
            } else {
                Err(self.fail(PyValueError::new_err("integer too large to encode as JSON")))
            }
        } else if let Ok(float) = value.cast::<PyFloat>() {
            let float = float.value();
            if !float.is_finite() {
                return Err(self.fail(PyValueError::new_err(format!(
                    "out of range float values are not JSON compliant: {float}"
                ))));
            }
            ser.serialize_f64(float)
        } else if let Ok(dict) = value.cast::<PyDict>() {
            let mut map = ser.serialize_map(Some(dict.len()))?;
            for (key, item) in dict.iter() {
                let key = dict_key(&key).map_err(|e| self.fail(e))?;
                map.serialize_entry(&key, &self.child(&item))?;
            }
            map.end()
        } else if let Ok(list) = value.cast::<PyList>() {
            let mut seq = ser.serialize_seq(Some(list.len()))?;
            for item in list.iter() {
                seq.serialize_element(&self.child(&item))?;
            }
            seq.end()
        } else if let Ok(tuple) = value.cast::<PyTuple>() {
            let mut seq = ser.serialize_seq(Some(tuple.len()))?;
            for item in tuple.iter() {
                seq.serialize_element(&self.child(&item))?;
            }
            seq.end()
        } else {
            let type_name = value
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".to_owned());
            Err(self.fail(PyTypeError::new_err(format!(
                "Object of type {type_name} is not JSON serializable"
            ))))
        }
    }
}

/// The key coercions of `json.dumps`: str as is; int, float, bool and None as their JSON text.
fn dict_key(key: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(text) = key.cast::<PyString>() {
        Ok(text.to_cow()?.into_owned())
    } else if key.is_none() {
        Ok("null".to_owned())
    } else if let Ok(flag) = key.cast::<PyBool>() {
        Ok(if flag.is_true() { "true" } else { "false" }.to_owned())
    } else if key.is_instance_of::<PyInt>() || key.is_instance_of::<PyFloat>() {
        Ok(key.repr()?.to_cow()?.into_owned())
    } else {
        let type_name = key.get_type().name()?.to_string();
        Err(PyTypeError::new_err(format!(
            "keys must be str, int, float, bool or None, not {type_name}"
        )))
    }
}

/// serde_json formatting with `json.dumps`' defaults: `", "` and `": "` separators and
/// `ensure_ascii=True` (every non-ASCII character written as `\uXXXX`).
struct DumpsStyle;

impl Formatter for DumpsStyle {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.is_ascii() {
            return w.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for ch in fragment.chars() {
            if ch.is_ascii() {
                w.write_all(&[ch as u8])?;
            } else {
                for unit in ch.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}
