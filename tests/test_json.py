"""JSON exactly as Python's json module reads and writes it.

Every value is held against the reference, bit for bit: floats are compared by their bytes
(so -0.0 is not 0.0 and NaN is NaN), types must match (1 is not 1.0 or True), dict keys keep
their order. Values cross real sockets: a raw framed client sends json.dumps' own bytes, a
``Server(request_as="json")`` decodes them, its handler checks and returns them, the raw client
compares the reply's bytes with json.dumps', and a framesock ``Client`` decodes them again.
"""

from __future__ import annotations

import collections
import enum
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import framesock
from framesock import _framesock

from conftest import frame

# In CI the examples are fixed (derandomized), so a run cannot fail on a case found by chance;
# locally every run explores new ones.
settings.register_profile("ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def same(a: Any, b: Any) -> bool:
    """Equal in value, type and order, with floats compared by their bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    return a == b


def decode_error_fields(err: json.JSONDecodeError) -> tuple:
    return (err.msg, err.pos, err.lineno, err.colno)


def assert_decodes_like_json(data: bytes) -> None:
    """framesock decodes ``data`` to json.loads' value, or refuses it where json does."""
    try:
        expected = json.loads(data)
    except json.JSONDecodeError as err:
        with pytest.raises(framesock.JSONDecodeError) as caught:
            _framesock._json_loads(data)
        assert decode_error_fields(caught.value) == decode_error_fields(err)
        return
    except (ValueError, RecursionError):
        # json.loads: UnicodeDecodeError, an int past the digit limit, deep nesting.
        with pytest.raises(framesock.JSONDecodeError):
            _framesock._json_loads(data)
        return
    got = _framesock._json_loads(data)
    assert same(got, expected), (data[:200], got, expected)


# --- through real sockets ------------------------------------------------------------------------


class RawFramedClient:
    """A plain-socket framed client: json.dumps' bytes out, the reply's raw bytes back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def exchange(self, payload: bytes) -> bytes:
        self.sock.sendall(frame(payload))
        header = self._exactly(4)
        (length,) = struct.unpack(">I", header)
        assert not length & 0x8000_0000, self._exactly(length & 0x7FFF_FFFF)
        return self._exactly(length)

    def _exactly(self, count: int) -> bytes:
        chunks = []
        while count:
            chunk = self.sock.recv(min(count, 1 << 20))
            assert chunk, "server closed"
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def echo_json():
    """A framed ``Server(request_as="json")`` whose handler returns what it decoded."""
    with framesock.Server(lambda value: value, port=0, protocol="framed", request_as="json") as server:
        raw = RawFramedClient(server.address[1])
        with framesock.Client(*server.address[:2], protocol="framed", max_reply=64 << 20) as client:
            yield raw, client
        raw.close()


def round_trip(echo_json, value: Any) -> None:
    """``value`` as json.dumps writes it, through the server and back, checked at each step."""
    raw, client = echo_json
    text = json.dumps(value).encode()
    reference = json.loads(text)
    reply = raw.exchange(text)
    # The server decoded it and wrote it again byte for byte as json would: json.dumps of what
    # json.loads made of it (the same text, unless keys collided, {"null": 1, None: 2}).
    assert reply == json.dumps(reference).encode()
    # framesock's encoder and decoder, twice (in a list: a str message would be sent raw).
    assert same(client.request([reference]), [reference])


def random_finite_floats(count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    floats = []
    while len(floats) < count:
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(value):
            floats.append(value)
    return floats


def test_100k_floats_from_random_bits_cross_exactly(echo_json):
    floats = random_finite_floats(100_000, seed=8)
    for start in range(0, len(floats), 10_000):
        round_trip(echo_json, floats[start : start + 10_000])


def test_10k_integers_up_to_300_digits_cross_exactly(echo_json):
    rng = random.Random(9)
    ints = [rng.choice((1, -1)) * rng.randrange(10 ** rng.randint(1, 300)) for _ in range(10_000)]
    ints += [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 2**128, -(2**200)]
    for start in range(0, len(ints), 2_000):
        round_trip(echo_json, ints[start : start + 2_000])


def test_special_values_cross_exactly(echo_json):
    round_trip(
        echo_json,
        {
            "neg zero": -0.0,
            "tiny": 5e-324,
            "max": sys.float_info.max,
            "small": 1e-07,
            "repr edge": 1e16,
            "big int": 2**70,
            "below int64": -9223372036854775809,
            "control": "\x00\x1f\x7f",
            "non-ascii": "é€😀",
            "lone surrogate": "a\ud800b",
            "deep": [[[[[[[[[[{"x": []}]]]]]]]]]],
        },
    )


def test_values_json_loads_gives_for_nonstandard_input(echo_json):
    raw, _ = echo_json
    for text, expected in [
        (b"-0", 0),
        (b"NaN", math.nan),
        (b"Infinity", math.inf),
        (b"-Infinity", -math.inf),
        (b"1e400", math.inf),
        (b'{"a": 1, "a": 2, "b": 3}', {"a": 2, "b": 3}),
    ]:
        got = _framesock._json_loads(text)
        assert same(got, expected), (text, got)
        assert same(got, json.loads(text))
    # The server decodes the same way: "-0" arrives as the int 0 and is written back as 0.
    assert raw.exchange(b"-0") == b"0"
    assert raw.exchange(b'{"a": 1, "a": 2}') == b'{"a": 2}'


def test_encoding_matches_json_dumps_byte_for_byte():
    class Color(enum.IntEnum):
        RED = 1

    class Ratio(float):
        def __repr__(self) -> str:
            return "Ratio!"

    class Name(str):
        pass

    values = [
        1e-07,
        1e16,
        123456789012345680000.0,
        "\x7f",
        {Color.RED: Color.RED},
        {Ratio(1.5): Ratio(2.5)},
        {Name("k"): Name("v")},
        {1: "int", 2.5: "float", True: "bool", None: "none"},
        2**200,
        -(2**130),
        "lone \udc00 surrogate",
        (1, (2, [3])),
        [[]] * 3,
        {"nested": {"x": [None, True, False, 0, -1, 0.5]}},
    ]
    for value in values:
        assert _framesock._json_dumps(value) == json.dumps(value).encode(), value


class Reversed(dict):
    """A dict whose items() json.dumps asks for (it does so for every dict subclass)."""

    def items(self):  # type: ignore[override]
        return list(reversed(list(super().items())))


class Shouting(list):
    """A list whose iteration json.dumps uses (it does so for list and tuple subclasses)."""

    def __iter__(self):  # type: ignore[override]
        return (str(item).upper() for item in super().__iter__())


def test_subclasses_are_written_as_json_dumps_writes_them():
    moved = collections.OrderedDict(a=1, b=2, c=3)
    moved.move_to_end("a")
    overridden = Reversed(a=1, b={"x": 2})
    Point = collections.namedtuple("Point", "x y")
    for value in [
        moved,
        {"inner": moved, "list": [moved]},
        overridden,
        Shouting(["a", "b"]),
        (Shouting([1]), Point(1, [2, moved])),
        collections.defaultdict(int, z=1, y=2),
        collections.Counter("abracadabra"),
    ]:
        assert _framesock._json_dumps(value) == json.dumps(value).encode(), value


def test_a_subclass_whose_items_are_not_pairs_fails_as_in_json_dumps():
    class Broken(dict):
        def items(self):  # type: ignore[override]
            return [("a", 1, 2)]

    class Unlisted(dict):
        def items(self):  # type: ignore[override]
            raise KeyError("no items today")

    for value, error in [(Broken(a=1), ValueError), (Unlisted(a=1), KeyError)]:
        with pytest.raises(error):
            json.dumps(value)
        with pytest.raises(error):
            _framesock._json_dumps(value)
    # A circular reference through a subclass is still told as one.
    circular = Reversed()
    circular["self"] = circular
    for value in [circular, [circular]]:
        with pytest.raises(ValueError, match="Circular"):
            json.dumps(value)
        with pytest.raises(ValueError, match="Circular"):
            _framesock._json_dumps(value)


# Run as its own process: what failed here was a SIGSEGV.
SMALL_STACK_PROGRAM = textwrap.dedent(
    """
    import json, sys, threading
    import framesock


    def nested(depth):
        value = []
        for _ in range(depth):
            value = [value]
        return value

    def json_writes(depth):
        try:
            json.dumps(nested(depth))
        except RecursionError:
            return False
        return True

    def deepest():
        low, high = 1, 30_000
        while low + 1 < high:
            middle = (low + high) // 2
            low, high = (middle, high) if json_writes(middle) else (low, middle)
        return low

    # The deepest value json.dumps writes, found on the main thread, whose stack is large
    # (less a margin: the handler thread starts a few calls deeper). On 3.13 a 256 KiB thread
    # cannot hold that much of anything: its depth checks count calls (10,000) instead of
    # looking at the stack, and json.dumps, or merely freeing a list 2,500 deep, crashes
    # there by itself. So on the small stack the value is at most 1,200 deep (framesock 0.1
    # crashed from 600 on).
    stack_kib = int(sys.argv[1])
    depth = deepest() - 50
    if stack_kib < 1024:
        depth = min(depth, 1200)
    threading.stack_size(stack_kib * 1024)  # handler threads inherit it
    server = framesock.Server(lambda depth: nested(depth), port=0, protocol="framed",
                              request_as="json", handler_threads=1)
    with server, framesock.Client(*server.address[:2], protocol="framed") as client:
        assert depth > 100, depth
        reply = client.request(json.dumps(depth))
        assert json.dumps(reply) == json.dumps(nested(depth))
        if stack_kib >= 1024:  # (on 3.13, freeing it would crash a small stack, as above)
            try:
                client.request(json.dumps(100_000))
            except framesock.RemoteError as err:
                assert err.kind == "encode", err
            else:
                raise AssertionError("a value past the recursion limit was encoded")
        assert client.request("1") == [[]]  # the thread serves on
    print(depth)
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stack_kib", [256, 4096])
def test_a_deep_reply_on_a_small_handler_stack_is_written_or_refused_never_a_crash(stack_kib):
    done = subprocess.run(
        [sys.executable, "-c", SMALL_STACK_PROGRAM, str(stack_kib)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def json_writes(depth: int) -> bool:
    try:
        json.dumps(nested(depth))
    except RecursionError:
        return False
    return True


def test_deep_nesting_is_written_and_read_as_deep_as_json_manages():
    # The deepest list json.dumps writes here (it depends on the Python version), by bisection;
    # framesock must write it too, and read back what it wrote.
    low, high = 1, 30_000
    while low + 1 < high:
        middle = (low + high) // 2
        low, high = (middle, high) if json_writes(middle) else (low, middle)
    deepest = nested(low)
    text = _framesock._json_dumps(deepest)
    assert text == json.dumps(deepest).encode()
    assert _framesock._json_dumps(_framesock._json_loads(text)) == text


def test_encoding_refuses_what_json_dumps_with_allow_nan_false_refuses():
    circular: list = []
    circular.append(circular)
    for value, error in [
        (math.nan, ValueError),
        ([math.inf], ValueError),
        ({"k": -math.inf}, ValueError),
        ({math.nan: 1}, ValueError),
        (circular, ValueError),
        ({1, 2}, TypeError),
        (b"bytes", TypeError),
        ({(1, 2): 3}, TypeError),
        (object(), TypeError),
    ]:
        with pytest.raises(error):
            json.dumps(value, allow_nan=False)
        with pytest.raises(error):
            _framesock._json_dumps(value)


def test_refused_documents_raise_json_decode_error_where_json_does():
    for text in [
        b"",
        b" ",
        b"{",
        b"[1,]",
        b'{"a" 1}',
        b"{} extra",
        b"\n\n  [1, 2,\n  oops]",
        b"01",
        b"1.",
        b"-",
        b"+1",
        b".5",
        b"-NaN",
        b'"\x01"',
        b'"\\x"',
        b'"\\ud800',
        b"nul",
        b"[1] [2]",
        b'"\xff"',  # not UTF-8
        b"1" * 5000,  # past sys.get_int_max_str_digits() on 3.11+; any integer on 3.9-3.10
        b"[" * 100_000,
    ]:
        assert_decodes_like_json(text)


def test_large_refused_documents_raise_json_decode_error_where_json_does():
    # Past 64 KiB framesock asks json.loads about a prefix of the document only (a large
    # invalid document is not parsed whole twice): the error must still be json's, exactly,
    # wherever the fault lies, also right at the prefix's edge.
    body = b'{"key": [1, 2.5, "text \\u00e9 \xc3\xa9", true, null], "n": 12345}, '
    good = b"[" + body * 2000
    faults = [b"]x", b"}", b",]", b'"\\x"', b"01", b'"\x01"', b"nul", b'"open', b"1.e5", b"[" * 10]
    for fault in faults:
        for cut in [len(good) // 3, len(good) // 3 + 4096 - 3, len(good) // 3 + 4096 + 300, len(good) - 10]:
            # A run of spaces or digits right before the fault moves where json notices it.
            for lead in [b"", b" " * 5000, b"7" * 300]:
                document = good[:cut] + lead + fault + good[cut:]
                assert_decodes_like_json(document)
    # Near the end, inside containers opened and closed at every depth: json.loads takes the
    # document up from its last '[', '{' or ',' there, after a stand-in for what came before.
    nested = b'{"a": [1, {"b": [[], {}, "s,[{\\"]"]}, ' * 300 + b'"k": ' + body * 40
    for fault in faults + [b"", b" ", b",", b"]]]]", b"}}}}", b'"x": 1', b":", b"\n\n  x"]:
        for closing in [b"", b"]", b"]}", b"]}" * 300]:
            assert_decodes_like_json(nested + closing + fault)
            assert_decodes_like_json(nested + closing + b"\n" + fault + b" " * 5000)
    # The whole document is kept as the error's doc, as json.loads keeps it.
    document = good + b"x"
    with pytest.raises(framesock.JSONDecodeError) as caught:
        _framesock._json_loads(document)
    assert caught.value.doc == document.decode()


def test_json_loads_input_extras_are_read_too():
    for text in [
        b'\xef\xbb\xbf{"bom": 1}',
        '{"utf": [16, "é"]}'.encode("utf-16"),
        '{"utf": [32, "é"]}'.encode("utf-32"),
        '["utf-16-le"]'.encode("utf-16-le"),
        b'"\\ud800 lone, \\udc00 lone, \\ud83d\\ude00 pair"',
        b'"\xed\xa0\x80"',  # a surrogate as raw bytes: json.loads reads it (surrogatepass)
        b" \t\r\n 1 \t\r\n ",
    ]:
        assert_decodes_like_json(text)


def test_any_json_value_is_a_message():
    with framesock.Server(lambda text: text, port=0, protocol="framed") as server:
        with framesock.Client(*server.address[:2], protocol="framed") as client:
            for message in [5, 2.5, True, None, (1, "two"), [1, {"a": None}], {"k": [1.5]}, -0.0]:
                assert client.request(message) == json.dumps(message), message
            assert client.request("raw text {") == "raw text {"
            assert client.request(b"raw \xc3\xa9") == "raw é"
            with pytest.raises(TypeError):
                client.request({1, 2})
            with pytest.raises(ValueError):
                client.request([math.nan])
            assert client.request("still fine") == "still fine"


# --- generated values and texts ------------------------------------------------------------------

characters = st.characters(codec=None)  # any code point, lone surrogates included
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(width=32, allow_nan=False, allow_infinity=False)
    | st.text(characters, max_size=20)
)
keys = st.text(characters, max_size=10) | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.booleans() | st.none()


def reordered(mapping_and_moves: tuple[dict, list[int]]) -> collections.OrderedDict:
    """An OrderedDict of the mapping with some keys moved to the end: its order then differs
    from the order of the dict inside it, and json.dumps follows its items()."""
    mapping, moves = mapping_and_moves
    ordered = collections.OrderedDict(mapping)
    for move in moves:
        if ordered:
            ordered.move_to_end(list(ordered)[move % len(ordered)])
    return ordered


values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6)
    | st.tuples(children, children)
    | st.dictionaries(keys, children, max_size=6)
    | st.tuples(st.dictionaries(keys, children, max_size=6), st.lists(st.integers(0, 5), max_size=4)).map(reordered),
    max_leaves=40,
)


@settings(max_examples=400)
@given(values)
def test_generated_values_encode_and_decode_like_json(value):
    text = json.dumps(value).encode()
    assert _framesock._json_dumps(value) == text
    assert same(_framesock._json_loads(text), json.loads(text))


@settings(max_examples=100)
@given(values)
def test_generated_values_cross_real_sockets(echo_json, value):
    round_trip(echo_json, value)


whitespace = st.text(" \t\r\n", max_size=3)
number_texts = st.from_regex(r"\A-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?\Z")
string_texts = st.lists(
    st.text(characters.filter(lambda c: c not in '"\\' and c >= " "), max_size=5)
    | st.sampled_from(['\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t"])
    | st.integers(0, 0xFFFF).map(lambda unit: f"\\u{unit:04x}")
    | st.integers(0, 0xFFFF).map(lambda unit: f"\\u{unit:04X}"),
    max_size=6,
).map(lambda parts: '"' + "".join(parts) + '"')
json_texts = st.recursive(
    number_texts | string_texts | st.sampled_from(["null", "true", "false", "NaN", "Infinity", "-Infinity"]),
    lambda children: st.lists(st.tuples(whitespace, children, whitespace), max_size=5).map(
        lambda items: "[" + ",".join(a + item + b for a, item, b in items) + "]"
    )
    | st.lists(st.tuples(string_texts, whitespace, children), max_size=5).map(
        lambda items: "{" + ",".join(key + gap + ":" + item for key, gap, item in items) + "}"
    ),
    max_leaves=30,
)


@settings(max_examples=500)
@given(whitespace, json_texts, whitespace)
def test_generated_json_texts_decode_like_json_loads(before, text, after):
    data = (before + text + after).encode("utf-8", "surrogatepass")
    assert_decodes_like_json(data)


@settings(max_examples=300)
@given(json_texts, st.data())
def test_broken_json_texts_fail_like_json_loads(text, data):
    raw = text.encode("utf-8", "surrogatepass")
    cut = data.draw(st.integers(0, len(raw)))
    junk = data.draw(st.binary(max_size=3))
    assert_decodes_like_json(raw[:cut] + junk + raw[cut + 1 :])


@settings(max_examples=500)
@given(
    st.binary(max_size=12)
    | st.text(alphabet='[]{}",:0123456789.eE+-tnrufalsNIiy \\\t\n', max_size=16).map(str.encode)
)
def test_arbitrary_bytes_decode_or_fail_like_json_loads(data):
    assert_decodes_like_json(data)


PEAK_PROGRAM = """
import json, resource, sys
from framesock import _framesock
data = b"[" + b"{}," * ((8 << 20) // 3) + b"{}]"
decode = json.loads if sys.argv[1] == "json" else _framesock._json_loads
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
value = decode(data)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def peak_growth(decoder: str) -> int:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", PEAK_PROGRAM, decoder], capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout)


def test_decoding_peaks_no_higher_than_json_loads_plus_the_bytes():
    # 8 MiB of empty objects: the case that once peaked at 28x the request's size.
    size = 8 << 20
    assert peak_growth("framesock") <= peak_growth("json") + size
