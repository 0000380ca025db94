"""safetensors I/O in model.py (DESIGN.md §2): `save_safetensors` writes the same bytes as the `safetensors` package,
files round-trip bit for bit in every direction, and `load_safetensors` turns every malformed file into a ValueError
that names the file, without crashing, hanging or allocating what a lying header asks for.

The layout the package writes, which ours must reproduce:
    8 bytes   little-endian u64 N, the header length including padding
    N bytes   compact JSON (no spaces), UTF-8, non-ASCII written raw; "__metadata__" first when given (also when {}),
              then the tensors in file order, each {"dtype": …, "shape": […], "data_offsets": [begin, end]}, keys in
              that order; the JSON is right-padded with spaces to a multiple of 8
    the rest  the tensors' bytes back to back, no alignment padding; tensors sorted by dtype, descending in
              the package's enum order (U64, I64, F64, F32, U32, I32, BF16, F16, U16, I16, F8_E4M3, F8_E5M2, I8,
              U8, BOOL), ties broken by name (code point order)
The package writes several metadata keys in a random (hash map) order, so byte equality is checked with at most one
metadata key; with more, the parsed header and the data must agree.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import torch

from model import load_safetensors, save_safetensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool,
          torch.float64]
SHAPES = [(), (0,), (3, 0), (5,), (2, 3), (2, 3, 4)]


@pytest.fixture
def st():
    """The reference package (its torch API); tests that compare against it skip when it is missing."""
    return pytest.importorskip("safetensors.torch")


def random_tensor(dtype: torch.dtype, shape: tuple, seed: int = 0) -> torch.Tensor:
    """Random bit patterns, so floats include NaNs with payloads, ±inf, -0.0 and subnormals."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool().reshape(shape)
    nbytes = numel * dtype.itemsize
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def special_floats(dtype: torch.dtype) -> torch.Tensor:
    values = [0.0, -0.0, 1.0, -1.5, float("nan"), float("inf"), float("-inf"), 1e-40, 3.0e38, 65504.0]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bitwise_equal(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert raw_bytes(got[name]) == raw_bytes(want[name]), name


def mixed_tensors() -> dict:
    """Every dtype, empties, 0-dim, awkward names, inserted in an order unlike the file order."""
    t = {}
    for i, dtype in enumerate(DTYPES):
        code = str(dtype).split(".")[-1]
        t[f"layer.10.{code}"] = random_tensor(dtype, (3, 2), seed=i)
        t[f"layer.2.{code}"] = random_tensor(dtype, (4,), seed=100 + i)
        t[f"Z.{code}.scalar"] = random_tensor(dtype, (), seed=200 + i)
        t[f"a.{code}.empty"] = torch.empty((0,), dtype=dtype)
        t[f"m.{code}.empty2d"] = torch.empty((3, 0), dtype=dtype)
    t["special.f32"] = special_floats(torch.float32)
    t["special.bf16"] = special_floats(torch.bfloat16)
    t["special.f16"] = special_floats(torch.float16)
    t["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.randn(8, 8, generator=torch.Generator().manual_seed(7))
    t["é.unicode"] = torch.ones(2)
    t["中文"] = torch.zeros(1, dtype=torch.int64)
    t['quote"back\\slash\nnewline\ttab\x01ctl/'] = torch.arange(3, dtype=torch.int32)
    t["B"] = torch.ones(1)  # upper case sorts before lower case
    return dict(reversed(list(t.items())))


# ---- byte parity with the package --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_match_package_single_tensor(st, tmp_path, dtype, shape):
    tensors = {"x": random_tensor(dtype, shape)}
    save_safetensors(tensors, tmp_path / "ours.safetensors")
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"k\"\\\n\x02": "é 中文\t/"}],
                         ids=["none", "empty", "format-pt", "escapes"])
def test_bytes_match_package_many_tensors(st, tmp_path, metadata):
    tensors = mixed_tensors()
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_bytes_match_package_empty_dict(st, tmp_path):
    save_safetensors({}, tmp_path / "ours.safetensors")
    st.save_file({}, str(tmp_path / "theirs.safetensors"))
    assert (tmp_path / "ours.safetensors").read_bytes() == b"\x08" + b"\x00" * 7 + b"{}      "
    assert (tmp_path / "theirs.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()


def test_non_contiguous_inputs_are_written_as_their_values(st, tmp_path):
    """The package refuses non-contiguous tensors; ours must write the same bytes as for `.contiguous()`."""
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    views = {
        "transposed": base.transpose(0, 2),
        "strided": base[:, ::2, 1::2],
        "expanded": torch.arange(4, dtype=torch.int64).expand(3, 4),  # stride 0
        "offset_slice": base.reshape(-1)[7:19],  # contiguous, but not at the start of its storage
        "permuted_bf16": base.to(torch.bfloat16).permute(2, 0, 1),
        "requires_grad": torch.nn.Parameter(torch.ones(2, 2)).t(),
    }
    assert not views["transposed"].is_contiguous() and views["offset_slice"].storage_offset() == 7
    save_safetensors(views, tmp_path / "ours.safetensors")
    st.save_file({k: v.detach().contiguous() for k, v in views.items()}, str(tmp_path / "theirs.safetensors"))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    assert_bitwise_equal(load_safetensors(tmp_path / "ours.safetensors"), {k: v.detach() for k, v in views.items()})


def test_several_metadata_keys(st, tmp_path):
    """With more than one key the package's metadata order is random; everything else must still be identical."""
    metadata = {"format": "pt", "b": "2", "a": "1", "ünï": "cödé"}
    tensors = mixed_tensors()
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=metadata)
    ours, theirs = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "theirs.safetensors").read_bytes()
    n = struct.unpack("<Q", ours[:8])[0]
    assert ours[:8] == theirs[:8] and len(ours) == len(theirs)
    h_ours, h_theirs = json.loads(ours[8:8 + n]), json.loads(theirs[8:8 + n])
    assert h_ours == h_theirs and list(h_ours) == list(h_theirs)  # same tensor order (metadata comes first)
    assert ours[8 + n:] == theirs[8 + n:]
    save_safetensors(tensors, tmp_path / "again.safetensors", metadata=metadata)
    assert (tmp_path / "again.safetensors").read_bytes() == ours  # ours is deterministic


# ---- round trips ------------------------------------------------------------------------------------------------
def test_round_trip_ours_to_ours(tmp_path):
    tensors = mixed_tensors()
    save_safetensors(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    loaded = load_safetensors(tmp_path / "a.safetensors")
    assert_bitwise_equal(loaded, tensors)
    assert all(t.device.type == "cpu" for t in loaded.values())


def test_round_trip_package_to_ours(st, tmp_path):
    tensors = mixed_tensors()
    st.save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt", "x": "y"})
    assert_bitwise_equal(load_safetensors(str(tmp_path / "a.safetensors")), tensors)


def test_round_trip_ours_to_package(st, tmp_path):
    tensors = mixed_tensors()
    metadata = {"format": "pt", "note": "é\n"}
    save_safetensors(tensors, tmp_path / "a.safetensors", metadata=metadata)
    assert_bitwise_equal(st.load_file(str(tmp_path / "a.safetensors")), tensors)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata


def test_str_and_path_and_device_arguments(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    save_safetensors(tensors, str(tmp_path / "a.safetensors"))
    assert_bitwise_equal(load_safetensors(str(tmp_path / "a.safetensors")), tensors)
    assert_bitwise_equal(load_safetensors(tmp_path / "a.safetensors", device="cpu"), tensors)


def test_loaded_tensors_are_writable_and_private(tmp_path):
    """In-place edits of loaded tensors (e.g. a training step) must neither crash nor write through to the file.
    Run in a child process: writing into a read-only memory map would kill the interpreter, not raise."""
    path = tmp_path / "a.safetensors"
    save_safetensors({"w": torch.zeros(4), "b": torch.ones(3, dtype=torch.bfloat16)}, path)
    script = textwrap.dedent(f"""
        import torch
        from model import load_safetensors
        t = load_safetensors({str(path)!r})
        t["w"].add_(1.0); t["b"].mul_(3)
        assert t["w"].tolist() == [1.0] * 4 and t["b"].tolist() == [3.0] * 3
        again = load_safetensors({str(path)!r})
        assert again["w"].tolist() == [0.0] * 4 and again["b"].tolist() == [1.0] * 3, "edits reached the file"
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ---- unusual but valid files (the package reads all of these) ---------------------------------------------------
def build(header, data: bytes = b"", pad: bool = True) -> bytes:
    """Hand-made file: u64 length + header (a dict is dumped as JSON) + data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


F32_1_2 = struct.pack("<2f", 1.0, 2.0)


def test_reader_accepts_unusual_valid_files(tmp_path):
    cases = {
        # no padding, so the F32 data starts at a misaligned address
        "unpadded": (build({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, F32_1_2, pad=False),
                     {"x": torch.tensor([1.0, 2.0])}),
        # header entries not in data order, metadata last, spaces inside the JSON
        "reordered": (build(b'{ "b" : {"data_offsets": [1, 9], "shape": [2], "dtype": "F32"},\n'
                            b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
                            b' "__metadata__": {"format": "pt"} }', b"\x07" + F32_1_2),
                      {"a": torch.tensor([7], dtype=torch.uint8), "b": torch.tensor([1.0, 2.0])}),
        "empty_header": (build({}), {}),
        "metadata_only": (build({"__metadata__": {"k": "v"}}), {}),
        # several empty tensors share an offset
        "shared_empty_offsets": (build({"e1": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                                        "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "e2": {"dtype": "I64", "shape": [3, 0], "data_offsets": [8, 8]},
                                        "e3": {"dtype": "BF16", "shape": [0, 5], "data_offsets": [0, 0]}},
                                       F32_1_2),
                                 {"e1": torch.empty(0), "x": torch.tensor([1.0, 2.0]),
                                  "e2": torch.empty(3, 0, dtype=torch.int64), "e3": torch.empty(0, 5, dtype=torch.bfloat16)}),
        "scalar": (build({"s": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]}}, struct.pack("<d", -2.5)),
                   {"s": torch.tensor(-2.5, dtype=torch.float64)}),
    }
    for name, (blob, want) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        assert_bitwise_equal(load_safetensors(path), want)


# ---- malformed files --------------------------------------------------------------------------------------------
def entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


ONE = b"\x00" * 4
MALFORMED = {
    "empty_file": b"",
    "shorter_than_8_bytes": b"\x08\x00\x00",
    "header_length_zero": struct.pack("<Q", 0),
    "header_past_end": struct.pack("<Q", 64) + b'{"x":{}}',
    "header_length_2**40": struct.pack("<Q", 2**40) + b"{}      ",
    "header_length_2**64-1": struct.pack("<Q", 2**64 - 1) + b"{}      ",
    "header_not_utf8": build(b'{"a\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', ONE),
    "header_not_json": build(b'{"a": {"dtype": "F32", ', ONE),
    "header_json_array": build(b"[]"),
    "header_json_string": build(b'"x"'),
    "header_json_null": build(b"null"),
    "header_json_number": build(b"42"),
    "header_nested_100k_deep": build(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "entry_not_object": build({"a": 3}),
    "entry_is_list": build({"a": ["F32", [1], [0, 4]]}, ONE),
    "missing_dtype": build({"a": {"shape": [1], "data_offsets": [0, 4]}}, ONE),
    "missing_shape": build({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, ONE),
    "missing_offsets": build({"a": {"dtype": "F32", "shape": [1]}}, ONE),
    "unknown_dtype": build({"a": entry(dtype="F33")}, ONE),
    "dtype_torch_name": build({"a": entry(dtype="float32")}, ONE),
    "dtype_lowercase": build({"a": entry(dtype="f32")}, ONE),
    "dtype_not_string": build({"a": entry(dtype=5)}, ONE),
    "shape_negative": build({"a": entry(shape=(-1,))}, ONE),
    "shape_negative_pair": build({"a": entry(shape=(-1, -1))}, ONE),
    "shape_float": build({"a": entry(shape=(1.0,))}, ONE),
    "shape_fraction": build({"a": entry(shape=(0.5, 2))}, ONE),
    "shape_bool": build({"a": entry(shape=(True,))}, ONE),
    "shape_string": build({"a": entry(shape="1")}, ONE),
    "shape_int_not_list": build({"a": entry(shape=1)}, ONE),
    "shape_nested": build({"a": entry(shape=[[1]])}, ONE),
    "shape_null": build({"a": entry(shape=None)}, ONE),
    "shape_huge_product": build({"a": entry(shape=(2**40, 2**40))}, ONE),
    "offsets_not_list": build({"a": entry(offsets="0,4")}, ONE),
    "offsets_one_number": build({"a": entry(offsets=[4])}, ONE),
    "offsets_three_numbers": build({"a": entry(offsets=[0, 4, 8])}, ONE),
    "offsets_float": build({"a": entry(offsets=[0, 4.0])}, ONE),
    "offsets_bool": build({"a": entry(offsets=[False, 4])}, ONE),
    "offsets_negative": build({"a": entry(offsets=(-4, 0))}, ONE),
    "offsets_past_buffer": build({"a": entry(shape=(2,), offsets=(0, 8))}, ONE),
    "offsets_huge_but_consistent": build({"a": entry(shape=(2**68,), offsets=(0, 2**70))}, ONE),
    "offsets_end_before_begin": build({"a": entry(offsets=(4, 0))}, ONE * 2),
    "offsets_overlap": build({"a": entry(shape=(2,), offsets=(0, 8)), "b": entry(shape=(2,), offsets=(4, 12))},
                             ONE * 3),
    "offsets_same_region": build({"a": entry(), "b": entry()}, ONE),
    "gap_between_tensors": build({"a": entry(), "b": entry(offsets=(8, 12))}, ONE * 3),
    "gap_at_start": build({"a": entry(offsets=(4, 8))}, ONE * 2),
    "trailing_bytes": build({"a": entry()}, ONE * 2),
    "data_without_tensors": build({}, ONE),
    "bytes_not_shape_times_itemsize": build({"a": entry(shape=(2,), offsets=(0, 4))}, ONE),
    "scalar_with_no_bytes": build({"a": entry(shape=(), offsets=(0, 0))}),
    "bf16_odd_byte_count": build({"a": entry(dtype="BF16", shape=(1,), offsets=(0, 3))}, b"\x00" * 3),
    "metadata_string": build({"__metadata__": "pt", "a": entry()}, ONE),
    "metadata_list": build({"__metadata__": ["format", "pt"], "a": entry()}, ONE),
    "metadata_number_value": build({"__metadata__": {"epoch": 3}, "a": entry()}, ONE),
    "metadata_null_value": build({"__metadata__": {"k": None}, "a": entry()}, ONE),
    "metadata_nested_value": build({"__metadata__": {"k": {"a": "b"}}, "a": entry()}, ONE),
    "metadata_list_value": build({"__metadata__": {"k": ["v"]}, "a": entry()}, ONE),
}


def load_expecting_value_error(path, max_traced_bytes=16 * 2**20):
    """load_safetensors must raise ValueError naming `path`, allocating little (tracemalloc sees Python objects,
    including any bytes read from the file)."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            load_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value), f"message does not name the file: {info.value}"
    assert peak < max_traced_bytes, f"peak Python allocation {peak} bytes"
    return info.value


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_file_raises_value_error_naming_it(tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(MALFORMED[name])
    load_expecting_value_error(str(path))


def test_malformed_file_given_as_path_object(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED["offsets_overlap"])
    load_expecting_value_error(path)


def test_header_over_100_mb_is_refused_without_reading_it(tmp_path):
    """Header length above the 100 MB bound but inside the file: refuse before reading (the file is sparse)."""
    n = 110_000_000
    path = tmp_path / "big_header.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{}")
        f.truncate(8 + n)  # the rest reads as zeros and takes no disk space on sparse-capable file systems
    load_expecting_value_error(str(path), max_traced_bytes=16 * 2**20)


def test_truncated_copies_of_a_valid_file(tmp_path):
    """Every strict prefix of a valid file is malformed (cut in the length, the header or the data)."""
    good = tmp_path / "good.safetensors"
    save_safetensors({"a": torch.arange(5, dtype=torch.int64), "b": torch.ones(3, dtype=torch.float16)}, good,
                     metadata={"format": "pt"})
    blob = good.read_bytes()
    for cut in sorted({0, 1, 7, 8, 9, 20, len(blob) // 2, len(blob) - 8, len(blob) - 1}):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(blob[:cut])
        load_expecting_value_error(str(path))
