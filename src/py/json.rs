//! JSON bytes <-> Python objects.
//!
//! Decoding builds Python objects directly from serde_json's parser events, so no intermediate
//! `serde_json::Value` tree is built. Encoding walks the Python object with our own `Serialize` so it follows `json.dumps`
//! exactly where it matters: the same accepted types (no bytes, sets or arbitrary sequences), the
//! same dict-key coercions, `", "` / `": "` separators and ASCII-only output, so a default reply is
//! byte-for-byte what the seed's server sends.

use std::cell::RefCell;
use std::io;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::ser::Formatter;

use crate::py::errors;

/// Nesting deeper than this is refused (as a cycle would otherwise recurse forever).
const MAX_DEPTH: usize = 512;

/// Decodes JSON text into the matching Python value (dict, list, str, int, float, bool, None).
///
/// serde_json's parser calls [`PyBuilder`] for each value it meets, which makes the Python
/// object at once: no intermediate tree. (pythonize's `Pythonizer`, fed by serde-transcode, did
/// the same job but measured 1.6x slower than orjson on 64 KiB-1 MiB documents: it collects
/// every map into a builder and every key through a generic serializer.)
pub fn loads<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let keys = KeyCache::default();
    let value = PyBuilder { py, keys: &keys }
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value))
        .map_err(|err| errors::json_decode_error(py, text, &err))?;
    Ok(value)
}

/// Builds the Python object for one JSON value as serde_json parses it.
#[derive(Clone, Copy)]
struct PyBuilder<'a, 'py> {
    py: Python<'py>,
    keys: &'a KeyCache<'py>,
}

/// Object keys already made in this document, so a list of records reuses one `str` per key
/// (with its hash already computed) instead of making and hashing a new one per record.
struct KeyCache<'py> {
    slots: RefCell<Vec<Option<CachedKey<'py>>>>,
}

/// A key's text and the Python `str` made for it.
type CachedKey<'py> = (Box<str>, Bound<'py, PyString>);

const KEY_SLOTS: usize = 256;
const MAX_CACHED_KEY: usize = 64;

impl Default for KeyCache<'_> {
    fn default() -> Self {
        KeyCache {
            slots: RefCell::new(vec![None; KEY_SLOTS]),
        }
    }
}

impl<'py> KeyCache<'py> {
    fn get(&self, py: Python<'py>, key: &str) -> Bound<'py, PyString> {
        if key.len() > MAX_CACHED_KEY {
            return PyString::new(py, key);
        }
        // FNV-1a over the key picks the slot; a collision just replaces the older key.
        let slot = key.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ b as u32).wrapping_mul(0x0100_0193)
        }) as usize
            % KEY_SLOTS;
        let mut slots = self.slots.borrow_mut();
        match &slots[slot] {
            Some((cached, string)) if **cached == *key => string.clone(),
            _ => {
                let string = PyString::new(py, key);
                slots[slot] = Some((key.into(), string.clone()));
                string
            }
        }
    }
}

/// Deserializes an object key straight into a (cached) Python `str`, without an owned String.
struct KeyBuilder<'a, 'py>(PyBuilder<'a, 'py>);

impl<'de, 'py> DeserializeSeed<'de> for KeyBuilder<'_, 'py> {
    type Value = Bound<'py, PyString>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de, 'py> Visitor<'de> for KeyBuilder<'_, 'py> {
    type Value = Bound<'py, PyString>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.keys.get(self.0.py, key))
    }
}

/// A Python failure while building (rare: out of memory), carried through serde's errors.
fn build_error<E: serde::de::Error>(err: PyErr) -> E {
    E::custom(err)
}

impl<'de, 'py> DeserializeSeed<'de> for PyBuilder<'_, 'py> {
    type Value = Bound<'py, PyAny>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de, 'py> Visitor<'de> for PyBuilder<'_, 'py> {
    type Value = Bound<'py, PyAny>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.py.None().into_bound(self.py))
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(PyBool::new(self.py, v).to_owned().into_any())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        let Ok(int) = v.into_pyobject(self.py);
        Ok(int.into_any())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        let Ok(int) = v.into_pyobject(self.py);
        Ok(int.into_any())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(PyFloat::new(self.py, v).into_any())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(PyString::new(self.py, v).into_any())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(8));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(PyList::new(self.py, items).map_err(build_error)?.into_any())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let dict = PyDict::new(self.py);
        while let Some(key) = map.next_key_seed(KeyBuilder(self))? {
            let value = map.next_value_seed(self)?;
            dict.set_item(key, value).map_err(build_error)?;
        }
        Ok(dict.into_any())
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
