//! JSON bytes <-> Python objects, exactly as Python's own `json` module reads and writes them.
//!
//! Decoding reads the text with jiter (pydantic's parser) and makes each Python object as jiter
//! meets it: keys cached, floats correctly rounded, integers of any size through `int()`.
//! Whatever jiter refuses goes to `json.loads` itself, which either accepts it (lone surrogate
//! escapes, a UTF-8 BOM, UTF-16/32 input) or refuses it with its own message and position. So a
//! document decodes to what `json.loads(data)` gives, or fails as it fails there.
//!
//! Encoding is written here, byte for byte as `json.dumps(value)` writes: `", "` and `": "`
//! separators, `ensure_ascii` escapes, `float.__repr__` and `int.__repr__` for numbers, the key
//! coercions, the recursion limit and circular-reference check, and `allow_nan=False` (NaN and
//! infinities raise `ValueError`: no JSON parser but Python's reads them).

use std::fmt::Write as _;

use crate::py::cached::Cached;
use jiter::Peek;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::engine::json_text::{escape, write_float_repr, Utf8};
use crate::py::errors;

/// Nesting deeper than this is refused. It is far past what `json.dumps` (and so framesock)
/// writes on any Python version (about 1,000 levels up to 3.11, 1,500 on 3.12, 10,000 on
/// 3.13), so framesock reads all it writes; and a document of nothing but brackets costs a
/// bounded amount of memory before it is refused.
pub const MAX_DEPTH: usize = 20_000;

/// The most memory a decoded document was measured to take, as a multiple of its text: 30x
/// for a list of empty lists (`[[],[],...]`), 24x for one of empty dicts; numbers 4-8x,
/// strings less (repeated ones are shared).
pub const EXPANSION: u64 = 32;

/// Decodes JSON text into what `json.loads(text)` gives; what it refuses raises
/// `framesock.JSONDecodeError`.
pub fn loads<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let built = if text.len() >= PAUSE_GC_FROM {
        without_gc(py, || build(py, text))?
    } else {
        build(py, text)
    };
    match built {
        Ok(value) => Ok(value),
        Err(Refused::Python(err)) => Err(err),
        Err(Refused::TooDeep(at)) => Err(errors::refused_json(
            py,
            text,
            PyValueError::new_err(format!("nested more than {MAX_DEPTH} levels deep")),
            at,
        )),
        Err(Refused::Jiter(err)) => reference_loads(py, text, err.index),
    }
}

/// Documents from this size on are decoded with the garbage collector paused.
const PAUSE_GC_FROM: usize = 4096;

/// Runs `work` with Python's cyclic garbage collector paused, if it was running.
///
/// Decoding makes many lists and dicts, and each few hundred of them start a collection that
/// walks the young objects, and now and then all of them: a fifth of the time of decoding a
/// large document went there. The collections cannot find anything: a decoded document holds
/// no cycles, and nothing made here has a finalizer. Other threads run in the moments a long
/// document lets the GIL go (see `build`); their garbage cycles wait for the end of this call
/// (at most the time one document takes to decode) to be collected.
fn without_gc<T>(py: Python<'_>, work: impl FnOnce() -> T) -> PyResult<T> {
    static GC: Cached<(Py<PyAny>, Py<PyAny>, Py<PyAny>)> = Cached::new();
    let (is_enabled, disable, enable) = GC.get_or_try_init(|| {
        let gc = py.import("gc")?;
        Ok::<_, PyErr>((
            gc.getattr("isenabled")?.unbind(),
            gc.getattr("disable")?.unbind(),
            gc.getattr("enable")?.unbind(),
        ))
    })?;
    if !is_enabled.call0(py)?.is_truthy(py)? {
        return Ok(work());
    }
    disable.call0(py)?;
    let result = work();
    enable.call0(py)?;
    Ok(result)
}

/// Why [`build`] gave up.
enum Refused {
    /// jiter refused the text: `json.loads` gets the last word.
    Jiter(jiter::JiterError),
    /// Nesting past [`MAX_DEPTH`], at this byte.
    TooDeep(usize),
    /// Python failed (out of memory; an integer past `sys.get_int_max_str_digits()`).
    Python(PyErr),
}

impl From<jiter::JiterError> for Refused {
    fn from(err: jiter::JiterError) -> Self {
        Refused::Jiter(err)
    }
}

impl From<PyErr> for Refused {
    fn from(err: PyErr) -> Self {
        Refused::Python(err)
    }
}

/// A list or dict still being filled. For a dict, the key whose value comes next.
enum Open<'py> {
    List(Bound<'py, PyList>),
    Dict(Bound<'py, PyDict>, Bound<'py, PyString>),
}

/// How many values [`build`] makes between two moments without the GIL: about a millisecond's
/// work, so a 16 MiB document no longer holds the GIL for most of a second in one stretch.
const VALUES_BETWEEN_PAUSES: u32 = 1 << 15;

/// Builds the Python value of `text` as jiter parses it, with a stack of open containers
/// instead of recursion (so depth costs heap, not thread stack).
fn build<'py>(py: Python<'py>, text: &[u8]) -> Result<Bound<'py, PyAny>, Refused> {
    let mut parser = jiter::Jiter::new(text).with_allow_inf_nan();
    let mut strings = StringCache::for_document(text.len());
    let mut open: Vec<Open<'py>> = Vec::new();
    let mut peek = parser.peek()?;
    let mut until_pause = VALUES_BETWEEN_PAUSES;
    loop {
        until_pause -= 1;
        if until_pause == 0 {
            // A long document: let the GIL go for a moment, so other threads (handler
            // threads, the program) run meanwhile instead of waiting for the whole of it.
            until_pause = VALUES_BETWEEN_PAUSES;
            crate::py::gil::detach_for_python(py, || ());
        }
        // The value that starts at `peek`, unless it opens a non-empty container.
        let mut value = match peek {
            Peek::Null => {
                parser.known_null()?;
                py.None().into_bound(py)
            }
            Peek::True | Peek::False => {
                let flag = parser.known_bool(peek)?;
                PyBool::new(py, flag).to_owned().into_any()
            }
            Peek::String => strings.get(py, parser.known_str()?).into_any(),
            Peek::Array => {
                let first = parser.known_array()?;
                let list = PyList::empty(py);
                match first {
                    None => list.into_any(),
                    Some(first) => {
                        check_depth(&open, &parser)?;
                        open.push(Open::List(list));
                        peek = first;
                        continue;
                    }
                }
            }
            Peek::Object => {
                let dict = PyDict::new(py);
                match parser.known_object()? {
                    None => dict.into_any(),
                    Some(key) => {
                        let key = strings.get(py, key);
                        check_depth(&open, &parser)?;
                        open.push(Open::Dict(dict, key));
                        peek = parser.peek()?;
                        continue;
                    }
                }
            }
            _ => number(py, parser.known_number_bytes(peek)?)?,
        };
        // Put the value in its container; each container that this completes goes in its own.
        loop {
            match open.last_mut() {
                None => {
                    parser.finish()?;
                    return Ok(value);
                }
                Some(Open::List(list)) => {
                    // SAFETY: the GIL is held; PyList_Append takes its own reference.
                    if unsafe { ffi::PyList_Append(list.as_ptr(), value.as_ptr()) } != 0 {
                        return Err(PyErr::fetch(py).into());
                    }
                    if let Some(next) = parser.array_step()? {
                        peek = next;
                        break;
                    }
                }
                Some(Open::Dict(dict, key)) => {
                    // Set item by item, so a repeated key keeps its first place and its last
                    // value, as in json.loads.
                    // SAFETY: the GIL is held; PyDict_SetItem takes its own references.
                    if unsafe { ffi::PyDict_SetItem(dict.as_ptr(), key.as_ptr(), value.as_ptr()) }
                        != 0
                    {
                        return Err(PyErr::fetch(py).into());
                    }
                    if let Some(next_key) = parser.next_key()? {
                        *key = strings.get(py, next_key);
                        peek = parser.peek()?;
                        break;
                    }
                }
            }
            value = match open.pop() {
                Some(Open::List(list)) => list.into_any(),
                Some(Open::Dict(dict, _)) => dict.into_any(),
                None => unreachable!("a container was just filled"),
            };
        }
    }
}

fn check_depth(open: &[Open<'_>], parser: &jiter::Jiter<'_>) -> Result<(), Refused> {
    if open.len() >= MAX_DEPTH {
        return Err(Refused::TooDeep(parser.current_index()));
    }
    Ok(())
}

/// A number as `json.loads` makes it: `int(text)` for integers (so huge ones follow
/// `sys.get_int_max_str_digits()`), a correctly rounded float otherwise (`1e400` is `inf`).
fn number<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    // jiter checked the grammar: an optional '-', then digits, '.', 'e', or NaN/Infinity.
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.len() <= 18 && digits.iter().all(u8::is_ascii_digit) {
        let magnitude = digits
            .iter()
            .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
        let Ok(int) = if negative { -magnitude } else { magnitude }.into_pyobject(py);
        return Ok(int.into_any());
    }
    // The text is ASCII, so this cannot fail.
    let text = std::str::from_utf8(text).unwrap_or_default();
    if digits.iter().all(u8::is_ascii_digit) {
        return big_int(py, text);
    }
    // Rust reads decimal text correctly rounded, as Python's float() does; NaN and
    // (-)Infinity are spelled the same.
    let value: f64 = text.parse().unwrap_or(f64::NAN);
    Ok(PyFloat::new(py, value).into_any())
}

/// `int(text)` for an integer too large for 64 bits.
fn big_int<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    let text =
        std::ffi::CString::new(text).map_err(|_| PyValueError::new_err("NUL in an integer"))?;
    // SAFETY: the GIL is held and `text` is NUL-terminated; a NULL result has set an error.
    unsafe {
        let int = ffi::PyLong_FromString(text.as_ptr(), std::ptr::null_mut(), 10);
        Bound::from_owned_ptr_or_err(py, int)
    }
}

/// Short strings already made in this document (keys above all, and repeated short values),
/// so a list of records reuses one `str` per key, hash already computed, instead of making
/// and hashing a new one per record. jiter's own Python builder does the same.
struct StringCache<'py> {
    slots: Vec<Option<(Box<str>, Bound<'py, PyString>)>>,
}

const MAX_CACHE_SLOTS: usize = 512;
const MAX_CACHED_STRING: usize = 64;

impl<'py> StringCache<'py> {
    /// A cache sized to the document: one slot per 16 bytes, a power of two from 16 to 512
    /// (clearing 512 slots would cost a small document more than the cache saves).
    fn for_document(length: usize) -> Self {
        let slots = (length / 16).clamp(16, MAX_CACHE_SLOTS).next_power_of_two();
        StringCache {
            slots: vec![None; slots.min(MAX_CACHE_SLOTS)],
        }
    }

    fn get(&mut self, py: Python<'py>, text: &str) -> Bound<'py, PyString> {
        if text.len() > MAX_CACHED_STRING {
            return PyString::new(py, text);
        }
        let mask = self.slots.len() - 1;
        let slot = &mut self.slots[slot_of(text.as_bytes()) & mask];
        match slot {
            Some((cached, string)) if **cached == *text => string.clone(),
            _ => {
                let string = PyString::new(py, text);
                *slot = Some((text.into(), string.clone()));
                string
            }
        }
    }
}

/// The cache slot of a short string (before masking): its length and first and last bytes,
/// mixed. Cheap rather than perfect: a collision only replaces the older string.
fn slot_of(text: &[u8]) -> usize {
    let n = text.len();
    let u64_at = |at: usize| u64::from_le_bytes(text[at..at + 8].try_into().unwrap_or_default());
    let u32_at = |at: usize| {
        u64::from(u32::from_le_bytes(
            text[at..at + 4].try_into().unwrap_or_default(),
        ))
    };
    let (head, tail) = match n {
        8.. => (u64_at(0), u64_at(n - 8)),
        4..=7 => (u32_at(0), u32_at(n - 4)),
        1..=3 => (
            u64::from(text[0]) | u64::from(text[n / 2]) << 8 | u64::from(text[n - 1]) << 16,
            0,
        ),
        0 => (0, 0),
    };
    let mixed = (head ^ tail.rotate_left(29) ^ n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 40) as usize
}

/// `json.loads(text)`, for the documents jiter refuses; `near` is where jiter stopped.
fn reference_loads<'py>(py: Python<'py>, text: &[u8], near: usize) -> PyResult<Bound<'py, PyAny>> {
    let json_loads = json_loads(py)?;
    if text.len() >= PREFIX_FROM {
        if let Some(refused) = refused_by_prefix(py, text, near) {
            return Err(refused);
        }
    }
    json_loads
        .call1((PyBytes::new(py, text),))
        .map_err(|err| errors::refused_json(py, text, err, near))
}

fn json_loads(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static JSON_LOADS: Cached<Py<PyAny>> = Cached::new();
    JSON_LOADS.import(py, "json", "loads")
}

/// Documents from this size on get their error from a prefix first (see [`refused_by_prefix`]).
const PREFIX_FROM: usize = 64 * 1024;
/// How far past where jiter stopped the prefix goes.
const PREFIX_PAST: usize = 4096;
/// How far before the prefix's end `json.loads`' error must be to be the whole document's.
const PREFIX_MARGIN: usize = 256;

/// The error `json.loads(text)` raises, found without parsing the document a second time
/// (a 16 MiB one took 1.4 s of CPU, with the GIL): `json.loads` reads a short stand-in for what
/// comes before the last `[`, `{` or `,` ahead of where jiter stopped (see [`Resume`]) and the
/// document from there, first to a little past where jiter stopped, then to the end. `json`
/// reads left to right: an error it reports well before the end of what it read came from that
/// text alone, and reading the whole document raises the same one there; except "Unterminated
/// string", which is told at the string's start but found at the end. None when this cannot
/// tell (not plain UTF-8, or no `json.JSONDecodeError`): then the whole document is parsed.
fn refused_by_prefix(py: Python<'_>, text: &[u8], near: usize) -> Option<PyErr> {
    let whole = std::str::from_utf8(text).ok()?;
    if whole.starts_with('\u{feff}') || text.iter().take(4).any(|&byte| byte == 0) {
        // A BOM, or what json.loads takes for UTF-16 or UTF-32: let it see the bytes.
        return None;
    }
    let resume = Resume::find(text, near);
    let mut end = near.saturating_add(PREFIX_PAST);
    if end < whole.len() {
        while !whole.is_char_boundary(end) {
            end += 1;
        }
        let (message, pos, read) = resume.loads(py, whole, end)?;
        if pos + PREFIX_MARGIN <= read && !message.starts_with("Unterminated string") {
            return Some(resume.error(py, whole, message, pos));
        }
    }
    let (message, pos, _) = resume.loads(py, whole, whole.len())?;
    Some(resume.error(py, whole, message, pos))
}

/// Where `json.loads` can take up a document: just after the last `[`, `{` or `,` before a
/// given point, with a short text that leaves its parser in the same state there. The same
/// containers are open (a list as `[`, a dict as `{"":`, the innermost one after a `,` as
/// `[0,` or `{"":0,`), so the same text after it gets the same error, at a position that is
/// the same distance from the end of the stand-in as it is from `at` in the document.
struct Resume {
    /// A byte offset in the document (0: from its start, with no stand-in).
    at: usize,
    lead: String,
}

impl Resume {
    /// Scans `text[..near]`, which jiter read as the valid start of a document.
    fn find(text: &[u8], near: usize) -> Self {
        let mut open: Vec<u8> = Vec::new();
        // Containers closed since the last resume point, innermost first.
        let mut closed: Vec<u8> = Vec::new();
        let mut point = None;
        let (mut in_string, mut escaped) = (false, false);
        for (at, &byte) in text[..near.min(text.len())].iter().enumerate() {
            if in_string {
                match byte {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    open.push(byte);
                    closed.clear();
                    point = Some((at + 1, byte));
                }
                b',' => {
                    closed.clear();
                    point = Some((at + 1, byte));
                }
                b']' | b'}' => match open.pop() {
                    Some(container) => closed.push(container),
                    None => return Self::from_start(),
                },
                _ => {}
            }
        }
        let Some((at, after)) = point else {
            return Self::from_start();
        };
        open.extend(closed.iter().rev());
        let Some((&innermost, outer)) = open.split_last() else {
            return Self::from_start();
        };
        let mut lead = String::with_capacity(4 * open.len() + 2);
        for &container in outer {
            lead.push_str(if container == b'[' { "[" } else { "{\"\":" });
        }
        lead.push_str(match (innermost, after) {
            (b'[', b',') => "[0,",
            (_, b',') => "{\"\":0,",
            (b'[', _) => "[",
            _ => "{",
        });
        Self { at, lead }
    }

    fn from_start() -> Self {
        Self {
            at: 0,
            lead: String::new(),
        }
    }

    /// `json.loads` of the stand-in and `whole[self.at..end]`: its error's message and
    /// position, in characters of the document, and how many characters it read.
    fn loads(&self, py: Python<'_>, whole: &str, end: usize) -> Option<(String, usize, usize)> {
        let mut text = String::with_capacity(self.lead.len() + end - self.at);
        text.push_str(&self.lead);
        text.push_str(&whole[self.at..end]);
        let err = json_loads(py).ok()?.call1((text.as_str(),)).err()?;
        let (message, _, pos) = errors::json_decode_error_args(err.value(py))?;
        let before = whole[..self.at].chars().count();
        // The lead is ASCII; an error inside it lies on the matching characters before `at`.
        let pos = (pos + before).checked_sub(self.lead.len())?;
        let read = before + whole[self.at..end].chars().count();
        Some((message, pos, read))
    }

    fn error(&self, py: Python<'_>, whole: &str, message: String, pos: usize) -> PyErr {
        let doc = pyo3::types::PyString::new(py, whole).into_any().unbind();
        errors::json_decode_error(py, message, doc, pos)
    }
}

/// Encodes a Python value as `json.dumps(value, allow_nan=False).encode()` would.
///
/// Without recursion: the lists and dicts being written are a stack on the heap, so a deep
/// value costs no thread stack (a handler thread may have a small one: `threading.stack_size`),
/// and the depth is bounded exactly where `json.dumps` bounds it, by Python's recursion limit.
pub fn dumps(value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let mut encoder = Encoder {
        out: Vec::with_capacity(128),
        open: Vec::new(),
    };
    let encoded = encoder.encode(value);
    // After an error the containers still open are left, each as `json.dumps` leaves them.
    while encoder.open.pop().is_some() {
        // SAFETY: pairs with the successful Py_EnterRecursiveCall of that container.
        unsafe { ffi::Py_LeaveRecursiveCall() };
    }
    encoded.map(|()| encoder.out)
}

/// Writes JSON text into `out`.
struct Encoder<'py> {
    out: Vec<u8>,
    /// The lists and dicts being written, outermost first: a cycle shows as one of them twice.
    open: Vec<Container<'py>>,
}

/// A container being written, and how far.
struct Container<'py> {
    /// The container as the value held it (its address): what a circular reference repeats.
    id: usize,
    items: Items<'py>,
}

/// What is left to write of an open container.
enum Items<'py> {
    /// A list, or what a list or tuple subclass's iteration gave (as `json.dumps` takes
    /// them: `PySequence_Fast`).
    List(Bound<'py, PyList>, usize),
    Tuple(Bound<'py, PyTuple>, usize),
    /// An exact dict, walked with `PyDict_Next` from this position.
    Dict(Bound<'py, PyDict>, ffi::Py_ssize_t, bool),
    /// A dict subclass, by what its `items()` gave (as `json.dumps` does: it may be overridden,
    /// an `OrderedDict` has its own order).
    Pairs(Bound<'py, PyList>, usize),
}

impl<'py> Encoder<'py> {
    /// `value`, in the order of checks of `json`'s C encoder; containers go on the `open`
    /// stack and their items are written as the stack is worked through.
    fn encode(&mut self, value: &Bound<'py, PyAny>) -> PyResult<()> {
        let mut next = Some(value.clone());
        loop {
            if let Some(value) = next.take() {
                self.value(value)?;
            }
            let Some(top) = self.open.last_mut() else {
                return Ok(());
            };
            next = match &mut top.items {
                Items::List(list, index) => {
                    // By index, not by iterator: the list may change while it is written (a
                    // finalizer run by the garbage collector can run any code), and an index
                    // past the end just stops.
                    let item = list.get_item(*index).ok();
                    *index += 1;
                    if item.is_some() && *index > 1 {
                        self.out.extend_from_slice(b", ");
                    }
                    item
                }
                Items::Tuple(tuple, index) => {
                    let item = tuple.get_item(*index).ok();
                    *index += 1;
                    if item.is_some() && *index > 1 {
                        self.out.extend_from_slice(b", ");
                    }
                    item
                }
                Items::Dict(dict, position, first) => {
                    let item = next_in_dict(dict, position);
                    if let Some((key, _)) = &item {
                        if !std::mem::take(first) {
                            self.out.extend_from_slice(b", ");
                        }
                        self.key(key)?;
                        self.out.extend_from_slice(b": ");
                    }
                    item.map(|(_, value)| value)
                }
                Items::Pairs(pairs, index) => {
                    let pair = pairs.get_item(*index).ok();
                    *index += 1;
                    match pair {
                        None => None,
                        Some(pair) => {
                            let pair = pair
                                .cast_into::<PyTuple>()
                                .ok()
                                .filter(|pair| pair.len() == 2)
                                .ok_or_else(|| {
                                    PyValueError::new_err("items must return 2-tuples")
                                })?;
                            if *index > 1 {
                                self.out.extend_from_slice(b", ");
                            }
                            self.key(&pair.get_item(0)?)?;
                            self.out.extend_from_slice(b": ");
                            Some(pair.get_item(1)?)
                        }
                    }
                }
            };
            if next.is_none() {
                let closed = self.open.pop().expect("a container is open");
                // SAFETY: pairs with the successful Py_EnterRecursiveCall in `open`.
                unsafe { ffi::Py_LeaveRecursiveCall() };
                let bracket = match closed.items {
                    Items::List(..) | Items::Tuple(..) => b']',
                    Items::Dict(..) | Items::Pairs(..) => b'}',
                };
                self.out.push(bracket);
            }
        }
    }

    /// Writes a scalar, or opens a container (its items come next).
    fn value(&mut self, value: Bound<'py, PyAny>) -> PyResult<()> {
        if let Ok(text) = value.cast::<PyString>() {
            self.string(text)
        } else if value.is_none() {
            self.out.extend_from_slice(b"null");
            Ok(())
        } else if let Ok(flag) = value.cast::<PyBool>() {
            let text: &[u8] = if flag.is_true() { b"true" } else { b"false" };
            self.out.extend_from_slice(text);
            Ok(())
        } else if let Ok(int) = value.cast::<PyInt>() {
            self.int(int)
        } else if let Ok(float) = value.cast::<PyFloat>() {
            self.float(float.value())
        } else if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
            self.open(&value, b'[', |value| {
                Ok(if value.is_exact_instance_of::<PyTuple>() {
                    Items::Tuple(value.clone().cast_into()?, 0)
                } else if value.is_exact_instance_of::<PyList>() {
                    Items::List(value.clone().cast_into()?, 0)
                } else {
                    Items::List(sequence_list(value)?, 0)
                })
            })
        } else if value.is_instance_of::<PyDict>() {
            self.open(&value, b'{', |value| {
                Ok(if value.is_exact_instance_of::<PyDict>() {
                    Items::Dict(value.clone().cast_into()?, 0, true)
                } else {
                    Items::Pairs(mapping_items(value)?, 0)
                })
            })
        } else {
            Err(PyTypeError::new_err(format!(
                "Object of type {} is not JSON serializable",
                type_name(&value)
            )))
        }
    }

    /// Opens a list or dict: Python's recursion limit applies (as in `json.dumps`), and a
    /// container met again inside itself is a circular reference. `items` says what to write
    /// of it (for a subclass, asking enters Python, where the limit may strike first).
    fn open(
        &mut self,
        container: &Bound<'py, PyAny>,
        bracket: u8,
        items: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<Items<'py>>,
    ) -> PyResult<()> {
        let py = container.py();
        // SAFETY: the GIL is held (we have a Bound); the message is a NUL-terminated C string.
        if unsafe { ffi::Py_EnterRecursiveCall(c" while encoding a JSON object".as_ptr()) } != 0 {
            return Err(self.cycle_or(container, PyErr::fetch(py)));
        }
        match items(container) {
            Ok(items) => {
                self.out.push(bracket);
                let id = container.as_ptr() as usize;
                self.open.push(Container { id, items });
                Ok(())
            }
            Err(err) => {
                // SAFETY: pairs with the successful Py_EnterRecursiveCall above.
                unsafe { ffi::Py_LeaveRecursiveCall() };
                if err.is_instance_of::<pyo3::exceptions::PyRecursionError>(py) {
                    Err(self.cycle_or(container, err))
                } else {
                    Err(err)
                }
            }
        }
    }

    /// "Circular reference detected" if `container` is open already, else `too_deep`.
    fn cycle_or(&self, container: &Bound<'py, PyAny>, too_deep: PyErr) -> PyErr {
        if self.has_cycle(container.as_ptr() as usize) {
            PyValueError::new_err("Circular reference detected")
        } else {
            too_deep
        }
    }

    /// Looked for only once the recursion limit is reached: a cycle always gets there.
    fn has_cycle(&self, entering: usize) -> bool {
        let mut seen = std::collections::HashSet::with_capacity(self.open.len() + 1);
        seen.insert(entering);
        !self.open.iter().all(|open| seen.insert(open.id))
    }

    /// A dict key as `json.dumps` coerces it: str as is; float, True/False/None and int as
    /// their JSON text, in quotes.
    fn key(&mut self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(text) = key.cast::<PyString>() {
            return self.string(text);
        }
        self.out.push(b'"');
        if let Ok(float) = key.cast::<PyFloat>() {
            self.float(float.value())?;
        } else if key.is_none() {
            self.out.extend_from_slice(b"null");
        } else if let Ok(flag) = key.cast::<PyBool>() {
            let text: &[u8] = if flag.is_true() { b"true" } else { b"false" };
            self.out.extend_from_slice(text);
        } else if let Ok(int) = key.cast::<PyInt>() {
            self.int(int)?;
        } else {
            return Err(PyTypeError::new_err(format!(
                "keys must be str, int, float, bool or None, not {}",
                type_name(key)
            )));
        }
        self.out.push(b'"');
        Ok(())
    }

    /// `int.__repr__` (also for subclasses such as `IntEnum`, whose own repr differs).
    fn int(&mut self, int: &Bound<'_, PyInt>) -> PyResult<()> {
        if let Ok(small) = int.extract::<i64>() {
            let _ = write!(Utf8(&mut self.out), "{small}");
            return Ok(());
        }
        static INT_REPR: Cached<Py<PyAny>> = Cached::new();
        let py = int.py();
        let int_repr = INT_REPR.get_or_try_init(|| {
            Ok::<_, PyErr>(py.get_type::<PyInt>().getattr("__repr__")?.unbind())
        })?;
        // Past sys.get_int_max_str_digits() this raises ValueError, as json.dumps does.
        let digits = int_repr.bind(py).call1((int,))?;
        let digits = digits.cast::<PyString>()?.to_cow()?;
        self.out.extend_from_slice(digits.as_bytes());
        Ok(())
    }

    /// `float.__repr__`: the shortest digits that read back as the same double, laid out
    /// the way Python lays them out.
    fn float(&mut self, value: f64) -> PyResult<()> {
        if !value.is_finite() {
            return Err(PyValueError::new_err(format!(
                "Out of range float values are not JSON compliant: {}",
                if value.is_nan() {
                    "nan"
                } else if value > 0.0 {
                    "inf"
                } else {
                    "-inf"
                }
            )));
        }
        write_float_repr(&mut self.out, value);
        Ok(())
    }

    /// A string in quotes with `ensure_ascii` escapes; lone surrogates (which a Python str
    /// may hold but UTF-8 cannot) are escaped as `\udXXX`, as `json.dumps` writes them.
    fn string(&mut self, text: &Bound<'_, PyString>) -> PyResult<()> {
        self.out.push(b'"');
        match text.to_cow() {
            Ok(utf8) => escape(&mut self.out, utf8.as_bytes()),
            Err(_) => {
                let encoded = text.encode_surrogatepass()?;
                escape(&mut self.out, encoded.as_bytes());
            }
        }
        self.out.push(b'"');
        Ok(())
    }
}

/// The next key and value of an exact dict from `position`, as `PyDict_Next` walks it: it
/// stays memory-safe if the dict changes meanwhile (pyo3's iterator would panic instead).
fn next_in_dict<'py>(
    dict: &Bound<'py, PyDict>,
    position: &mut ffi::Py_ssize_t,
) -> Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let mut key = std::ptr::null_mut();
    let mut value = std::ptr::null_mut();
    // SAFETY: the GIL is held; PyDict_Next hands out borrowed references, which are owned
    // (incref'd) at once, before anything else can run.
    unsafe {
        if ffi::PyDict_Next(dict.as_ptr(), position, &mut key, &mut value) == 0 {
            return None;
        }
        let py = dict.py();
        Some((
            Bound::from_borrowed_ptr(py, key),
            Bound::from_borrowed_ptr(py, value),
        ))
    }
}

/// `list(sequence)`, as `json.dumps` takes a list or tuple subclass (`PySequence_Fast`).
fn sequence_list<'py>(sequence: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
    let py = sequence.py();
    // SAFETY: the GIL is held; PySequence_List returns a new reference or NULL with an error.
    let list =
        unsafe { Bound::from_owned_ptr_or_err(py, ffi::PySequence_List(sequence.as_ptr())) }?;
    Ok(list.cast_into::<PyList>()?)
}

/// `list(mapping.items())`, as `json.dumps` takes a dict subclass's items (`PyMapping_Items`).
fn mapping_items<'py>(mapping: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
    let py = mapping.py();
    // SAFETY: the GIL is held; PyMapping_Items returns a new reference or NULL with an error.
    let items =
        unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyMapping_Items(mapping.as_ptr())) }?;
    Ok(items.cast_into::<PyList>()?)
}

/// `str.encode("utf-8", "surrogatepass")`: UTF-8, with each lone surrogate as its own 3 bytes.
trait SurrogatePass<'py> {
    fn encode_surrogatepass(&self) -> PyResult<Bound<'py, PyBytes>>;
}

impl<'py> SurrogatePass<'py> for Bound<'py, PyString> {
    fn encode_surrogatepass(&self) -> PyResult<Bound<'py, PyBytes>> {
        Ok(self
            .call_method1("encode", ("utf-8", "surrogatepass"))?
            .cast_into::<PyBytes>()?)
    }
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

/// `loads`, for tests and measurements from Python (not public API).
#[pyfunction]
pub fn _json_loads<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    loads(py, data)
}

/// `dumps`, for tests and measurements from Python (not public API).
#[pyfunction]
pub fn _json_dumps<'py>(value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    Ok(PyBytes::new(value.py(), &dumps(value)?))
}
