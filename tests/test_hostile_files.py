"""Broken and forged files: gb.load and gb.load_checkpoint raise a ValueError that names the
file and the problem, and load nothing, not even the random state, for every case."""

import json
import re
import zipfile
from io import BytesIO

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpubp as gb
from gpubp import _random, io
from gpubp.checkpoint import save_checkpoint

SUFFIXES = [".npz", ".safetensors"]
LOADERS = {
    "load": lambda path: gb.load(path, device="cpu"),
    "load_checkpoint": lambda path: gb.load_checkpoint(path, device="cpu"),
}


@pytest.fixture(params=SUFFIXES)
def suffix(request):
    return request.param


@pytest.fixture(params=LOADERS.values(), ids=LOADERS.keys())
def loader(request):
    return request.param


def trained(sizes=(4, 6, 3)):
    gb.seed(11)
    model = gb.Sequential([gb.Dense(a, b, "relu") for a, b in zip(sizes[:-2], sizes[1:-1])]
                          + [gb.Dense(sizes[-2], sizes[-1])], device="cpu")
    opt = gb.optim.Adam(model.parameters(), lr=0.01)
    x = np.random.default_rng(0).normal(size=(24, sizes[0])).astype(np.float32)
    history = model.fit(x, np.arange(24) % sizes[-1], optimizer=opt, epochs=2, batch_size=8, verbose=0)
    return model, opt, history


def checkpoint_parts(tmp_path, suffix, sizes=(4, 6, 3)):
    """(header, tensors) of a valid checkpoint: the material each test spoils."""
    path = tmp_path / f"valid{suffix}"
    model, optimizer, history = trained(sizes)
    save_checkpoint(path, model, optimizer, epoch=2, history=history)
    return io.read_file(path)


def written(tmp_path, suffix, header, tensors):
    path = tmp_path / f"spoiled{suffix}"
    io.write_file(path, header, tensors)
    return path


def expect_rejected(loader, path, problem):
    """A ValueError naming ``path`` and matching ``problem``, with the random state untouched."""
    state = _random.get_state()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + problem):
        loader(path)
    assert _random.get_state() == state


# ----------------------------------------------------------------------------- framing


def test_a_valid_checkpoint_loads_with_both_loaders(tmp_path, suffix, loader):
    path = written(tmp_path, suffix, *checkpoint_parts(tmp_path, suffix))
    loaded = loader(path)
    model = loaded if isinstance(loaded, gb.Sequential) else loaded.model
    assert [(l.in_features, l.out_features) for l in model] == [(4, 6), (6, 3)]


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_file(tmp_path, suffix, loader, keep):
    path = written(tmp_path, suffix, *checkpoint_parts(tmp_path, suffix))
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * keep)])
    problem = "not a readable .npz archive, truncated or corrupt" if suffix == ".npz" else ".*truncated"
    expect_rejected(loader, path, problem)


def test_a_file_shorter_than_the_header_length(tmp_path, loader):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x10\x00")
    expect_rejected(loader, path, r"truncated: 2 bytes, fewer than the 8-byte header length")


def test_a_safetensors_header_length_beyond_the_end_of_the_file(tmp_path, loader):
    path = written(tmp_path, ".safetensors", *checkpoint_parts(tmp_path, ".safetensors"))
    blob = path.read_bytes()
    path.write_bytes((10 ** 9).to_bytes(8, "little") + blob[8:])
    expect_rejected(loader, path, r"the header length \(1000000000 bytes\) runs past the end of the file")


def test_an_npy_header_length_beyond_the_end_of_its_entry(tmp_path, loader):
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    rewrite_npz_entry(path, "layers.0.weight.npy", lambda raw: raw[:8] + b"\xff\xff" + raw[10:])
    expect_rejected(loader, path, "entry 'layers.0.weight': EOF: reading array header, expected 65535 bytes")


def test_safetensors_header_shapes_that_do_not_match_the_data(tmp_path, loader):
    path = written(tmp_path, ".safetensors", *checkpoint_parts(tmp_path, ".safetensors"))
    rewrite_safetensors_header(path, lambda header: header["layers.0.weight"].update(shape=[4, 7]))
    expect_rejected(loader, path, r"tensor 'layers.0.weight': the header's shape \(4, 7\) of F32 needs 112 bytes, "
                                  r"but its data_offsets span 96")


def test_npy_header_shapes_that_do_not_match_the_data(tmp_path, loader):
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    rewrite_npz_entry(path, "layers.0.weight.npy", lambda raw: raw.replace(b"(4, 6)", b"(4, 9)"))
    expect_rejected(loader, path, r"entry 'layers.0.weight': EOF: reading array data, expected 144 bytes got 96")


def test_safetensors_tensors_whose_data_overlap(tmp_path, loader):
    path = written(tmp_path, ".safetensors", *checkpoint_parts(tmp_path, ".safetensors"))

    def overlap(header):
        begin, end = header["layers.0.weight"]["data_offsets"]
        header["layers.0.weight"]["data_offsets"] = [begin - 4, end - 4]

    rewrite_safetensors_header(path, overlap)
    expect_rejected(loader, path, r"tensor .* starts at data byte \d+, expected \d+")


@pytest.mark.parametrize("forge, problem", [
    (lambda header: header["layers.0.weight"].update(dtype=["F32"]), r"tensor 'layers.0.weight': unsupported dtype"),
    (lambda header: header.update(__metadata__=[]), r"the header's '__metadata__' must map names to strings"),
], ids=["dtype that is a list", "metadata that is an empty list"])
def test_safetensors_header_entries_of_the_wrong_json_type(tmp_path, loader, forge, problem):
    path = written(tmp_path, ".safetensors", *checkpoint_parts(tmp_path, ".safetensors"))
    rewrite_safetensors_header(path, forge)
    expect_rejected(loader, path, problem)


DEEP = 100_000  # arrays nested past Python's recursion limit: json raises RecursionError, not ValueError


def test_a_safetensors_header_nested_past_the_recursion_limit(tmp_path, loader):
    path = tmp_path / "deep.safetensors"
    text = ("[" * DEEP + "]" * DEEP).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    expect_rejected(loader, path, "the header is not valid JSON")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_gpubp_header_nested_past_the_recursion_limit(tmp_path, loader, suffix):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    header["deep"] = "SPOT"
    path = written(tmp_path, suffix, header, tensors)
    spot = json.dumps("SPOT").encode()
    if suffix == ".safetensors":
        rewrite_safetensors_header(path, lambda framing: framing["__metadata__"].update(
            gpubp=framing["__metadata__"]["gpubp"].replace(spot.decode(), "[" * DEEP + "]" * DEEP)))
    else:
        rewrite_npz_entry(path, "__architecture__.npy", lambda raw: npy_text_replaced(raw, spot, DEEP))
    expect_rejected(loader, path, "the gpubp header is not valid JSON")


def npy_text_replaced(raw, spot, depth):
    """An npy entry of one unicode string (the gpubp header) with ``spot`` replaced by ``depth``
    nested arrays, written again with a header of its new length."""
    text = str(np.load(BytesIO(raw)))
    text = text.replace(spot.decode(), "[" * depth + "]" * depth)
    buffer = BytesIO()
    np.save(buffer, np.array(text))
    return buffer.getvalue()


# ----------------------------------------------------------------------------- contents


@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.float64])
def test_a_weight_of_the_wrong_dtype(tmp_path, suffix, loader, dtype):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    tensors["layers.1.bias"] = tensors["layers.1.bias"].astype(dtype)
    expected = "float32, as the other weights"
    expect_rejected(loader, written(tmp_path, suffix, header, tensors),
                    f"'layers.1.bias' has dtype {np.dtype(dtype)}, expected {expected}")


def test_a_model_of_integers(tmp_path, suffix):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    tensors = {k: v.astype(np.int64) for k, v in tensors.items()}
    expect_rejected(LOADERS["load"], written(tmp_path, suffix, header, tensors),
                    "'layers.0.weight' has dtype int64, expected float32 or float64")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(tmp_path, suffix, loader, bad):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    tensors["layers.1.weight"][2, 1] = bad
    expect_rejected(loader, written(tmp_path, suffix, header, tensors), "'layers.1.weight' contains NaN or inf")


def test_non_finite_optimizer_state(tmp_path, suffix):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    tensors["optimizer.state.0.v"][0, 0] = np.nan
    expect_rejected(LOADERS["load_checkpoint"], written(tmp_path, suffix, header, tensors),
                    "'optimizer.state.0.v' contains NaN or inf")


@pytest.mark.parametrize("key", ["layers.1.bias", "layers.0.weight"])
def test_a_missing_weight(tmp_path, suffix, loader, key):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    del tensors[key]
    expect_rejected(loader, written(tmp_path, suffix, header, tensors), f"missing key '{key}'")


def test_a_missing_optimizer_tensor(tmp_path, suffix):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    del tensors["optimizer.state.3.m"]
    expect_rejected(LOADERS["load_checkpoint"], written(tmp_path, suffix, header, tensors),
                    "missing key 'optimizer.state.3.m'")


def test_an_extra_tensor(tmp_path, suffix, loader):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    tensors["layers.2.weight"] = np.ones((3, 3), np.float32)
    expect_rejected(loader, written(tmp_path, suffix, header, tensors), r"unexpected keys \['layers.2.weight'\]")


def test_weights_of_another_architecture(tmp_path, suffix, loader):
    header, _ = checkpoint_parts(tmp_path, suffix)
    _, tensors = checkpoint_parts(tmp_path, suffix, sizes=(4, 8, 3))
    expect_rejected(loader, written(tmp_path, suffix, header, tensors),
                    r"'layers.0.weight' has shape \(4, 8\), expected \(4, 6\) \(the header's architecture\)")


def test_optimizer_state_of_another_architecture(tmp_path, suffix):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    _, other = checkpoint_parts(tmp_path, suffix, sizes=(4, 8, 3))
    tensors.update({k: v for k, v in other.items() if k.startswith("optimizer.")})
    expect_rejected(LOADERS["load_checkpoint"], written(tmp_path, suffix, header, tensors),
                    r"optimizer state: state_dict: state\[0\]\['m'\] has shape \(4, 8\), but the parameter "
                    r"'weight' has \(4, 6\)")


def test_a_header_with_fewer_layers_than_the_tensors(tmp_path, suffix, loader):
    header, tensors = checkpoint_parts(tmp_path, suffix, sizes=(4, 6, 5, 3))
    header.update(sizes=[4, 6], activations=["relu"], names=["dense_0"], trainable=[True])
    expect_rejected(loader, written(tmp_path, suffix, header, tensors), r"unexpected keys \['layers.1.bias'")


def test_a_model_file_is_not_a_checkpoint(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    trained()[0].save(path)
    expect_rejected(LOADERS["load_checkpoint"], path, "a model file, not a checkpoint .*; load it with gb.load")


def test_a_forged_random_state(tmp_path, suffix):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    header["checkpoint"]["random_state"] = {"bit_generator": "MT19937", "state": {}}
    expect_rejected(LOADERS["load_checkpoint"], written(tmp_path, suffix, header, tensors),
                    "random state: expected the state of a PCG64 generator")


def test_a_history_with_ragged_columns(tmp_path, suffix):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    header["checkpoint"]["history"]["history"]["loss"].pop()
    expect_rejected(LOADERS["load_checkpoint"], written(tmp_path, suffix, header, tensors),
                    "the History must list one epoch")


def test_a_header_that_is_not_json(tmp_path, loader):
    path = tmp_path / "m.safetensors"
    path.write_bytes(io._safetensors.dumps({"layers.0.weight": np.ones((2, 2), np.float32)}, {"gpubp": "{sizes: [2"}))
    expect_rejected(loader, path, r"the gpubp header is not valid JSON")


def test_a_history_of_words(tmp_path, suffix):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    header["checkpoint"]["history"]["history"]["loss"][0] = "low"
    expect_rejected(LOADERS["load_checkpoint"], written(tmp_path, suffix, header, tensors),
                    "the History must hold numbers only")


@pytest.mark.parametrize("names", [[1, 2], [["x"], "y"], [None, "y"]])
def test_layer_names_in_the_header_that_are_not_strings(tmp_path, suffix, loader, names):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    header["names"] = names
    expect_rejected(loader, written(tmp_path, suffix, header, tensors), r"the header's 'names' must be strings")


def test_an_unknown_activation_in_the_header(tmp_path, suffix, loader):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    header["activations"][0] = "swish9"
    expect_rejected(loader, written(tmp_path, suffix, header, tensors), r"activations\[0\]: ")


# ----------------------------------------------------------------------------- byte-level forgeries


def rewrite_safetensors_header(path, mutate):
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + length])
    mutate(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + length:])


def rewrite_npz_entry(path, name, mutate):
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    entries[name] = mutate(entries[name])
    with zipfile.ZipFile(path, "w") as archive:
        for entry, raw in entries.items():
            archive.writestr(entry, raw)


def npy_header_replaced(old, new):
    """A mutation for :func:`rewrite_npz_entry`: ``old`` replaced by ``new`` in a (version 1.0) .npy
    header, the header's length field and padding made to match, the data left as it was."""
    def mutate(raw):
        length = int.from_bytes(raw[8:10], "little")
        text = raw[10:10 + length].rstrip().replace(old, new)
        text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
        return raw[:8] + len(text).to_bytes(2, "little") + text + raw[10 + length:]
    return mutate


def entry_data_start(path, name):
    """Where the stored bytes of the archive's entry ``name`` start in the file: after its local
    header (30 bytes, then the name and the extra field)."""
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(name).header_offset
    blob = path.read_bytes()
    return offset + 30 + int.from_bytes(blob[offset + 26:offset + 28], "little") + \
        int.from_bytes(blob[offset + 28:offset + 30], "little")


def damage_npz_entry_in_place(path, name, mutate):
    """Apply ``mutate`` to the stored entry ``name``'s .npy header, same length, leaving its CRC stale."""
    blob = bytearray(path.read_bytes())
    start = entry_data_start(path, name) + 10  # the header follows the magic, the version and its length
    header = bytes(blob[start:start + int.from_bytes(blob[start - 2:start], "little")])
    damaged = mutate(header)
    assert len(damaged) == len(header) and damaged != header
    blob[start:start + len(header)] = damaged
    path.write_bytes(bytes(blob))


def test_an_npz_entry_that_is_not_an_npy_array(tmp_path, loader):
    """NumPy hands back the raw bytes of an entry without the .npy magic, not an array."""
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    rewrite_npz_entry(path, "layers.0.weight.npy", lambda raw: bytes(64))
    expect_rejected(loader, path, "entry 'layers.0.weight': not a .npy array")


def test_a_compressed_npz_entry_whose_data_is_damaged(tmp_path, loader):
    """np.savez_compressed's archives load; a damaged deflate stream is zlib's error, not zipfile's."""
    header, tensors = checkpoint_parts(tmp_path, ".npz")
    path = tmp_path / "compressed.npz"
    np.savez_compressed(path, __architecture__=np.array(json.dumps(header)), **tensors)
    assert loader(path) is not None
    start = entry_data_start(path, "layers.0.weight.npy")
    blob = bytearray(path.read_bytes())
    blob[start:start + 16] = bytes(range(16))
    path.write_bytes(bytes(blob))
    expect_rejected(loader, path, r"not a readable .npz archive, truncated or corrupt \(Error -3")


@pytest.mark.parametrize("damage", [
    lambda header: b"\xb7" + header[1:],  # the '{' opening the header dict: a tokenize error in NumPy's parser
    lambda header: header.replace(b"'shape': ()", b"'shape': (100000000000,)")[:len(header) - 1] + b"\n",
], ids=["a damaged byte", "a forged huge shape"])
def test_a_damaged_npy_header_in_an_entry_longer_than_zipfiles_first_read(tmp_path, loader, damage):
    """np.load parsed an entry's header from zipfile's first read, before the CRC at the entry's
    end was checked: the damage escaped as tokenize.TokenError or MemoryError. Read whole first,
    the entry fails its CRC check."""
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("__architecture__.npy").file_size > zipfile.ZipExtFile.MIN_READ_SIZE
    damage_npz_entry_in_place(path, "__architecture__.npy", damage)
    expect_rejected(loader, path, r"not a readable .npz archive, truncated or corrupt \(Bad CRC-32 for file "
                                  r"'__architecture__.npy'; in entry '__architecture__'\)")


@pytest.mark.parametrize("entry", ["__architecture__.npy", "layers.0.weight.npy"])
@pytest.mark.parametrize("old, new, error", [
    (b"{", b"\xb7", "TokenError"),  # no Python literal: NumPy re-tokenizes it, which fails
    (b"'descr': '<", b"'descr': '<,", "SyntaxError"),  # a descr that numpy.dtype parses as Python, and fails
    (b"'fortran_order'", b"b'fortran_order'", "TypeError"),  # NumPy sorts the keys to report them
], ids=["tokenize", "syntax", "type"])
def test_an_npy_header_that_numpys_parser_fails_on(tmp_path, loader, entry, old, new, error):
    """Damage that passes the CRC check (the entry rewritten with its CRC fixed up)."""
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    rewrite_npz_entry(path, entry, npy_header_replaced(old, new))
    expect_rejected(loader, path, f"entry '{entry[:-4]}': the .npy header is not a valid header dictionary "
                                  rf"\({error}: ")


@pytest.mark.parametrize("shape, problem", [
    (b"(100000000000000000,)", r"EOF: reading array data, expected 400000000000000000 bytes got 96"),
    (b"(4000000000000000000000000, 6)", r"EOF: reading array data, expected 96000000000000000000000000 bytes "
                                        r"got 96"),  # more elements than an int64 counts
    (b"(4, 6, True)", r"the header's shape \(4, 6, True\) is not a tuple of ints >= 0"),
], ids=["huge", "beyond int64", "a bool"])
def test_npy_header_shapes_that_are_checked_before_allocating(tmp_path, loader, shape, problem):
    """np.load allocated what the header's shape asked for before reading the data (a MemoryError)
    or failed on the count (OverflowError, TypeError); the shape is checked against the bytes first."""
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    rewrite_npz_entry(path, "layers.0.weight.npy", npy_header_replaced(b"(4, 6)", shape))
    expect_rejected(loader, path, "entry 'layers.0.weight': " + problem)


def test_an_npy_entry_with_bytes_after_its_array_data(tmp_path, loader):
    """np.load ignored them; the header's shape must account for every byte of the entry."""
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    rewrite_npz_entry(path, "layers.0.weight.npy", lambda raw: raw + bytes(4))
    expect_rejected(loader, path, r"entry 'layers.0.weight': 4 bytes after the array data \(the header's shape "
                                  r"\(4, 6\) of float32 needs 96 bytes, the entry holds 100\)")


@pytest.mark.parametrize("forge", [
    lambda header: header["activations"].__setitem__(0, "softmax"),
    lambda header: header.__setitem__("dropout", [[2, 0.5, "after_the_head"]]),
], ids=["softmax below the top", "dropout above a softmax head"])
def test_an_order_of_layers_sequential_refuses(tmp_path, suffix, loader, forge):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    header["activations"][-1] = "softmax"
    forge(header)
    expect_rejected(loader, written(tmp_path, suffix, header, tensors),
                    r"layers\[\d\]: activation 'softmax' is allowed on the last layer only")


def test_a_bad_device_is_the_callers_error_not_the_files(tmp_path):
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    with pytest.raises(ValueError, match=r"^device: expected one of"):
        gb.load(path, device="tpu")


# ----------------------------------------------------------------------------- random forgeries of the header

json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False)
                           | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def header_paths(node, prefix=()):
    """Every (path, value) in a JSON tree, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield prefix + (key,)
        yield from header_paths(value, prefix + (key,))


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory):
    return checkpoint_parts(tmp_path_factory.mktemp("valid"), ".safetensors")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), replacement=json_values)
def test_any_forged_header_value_loads_or_is_a_value_error_naming_the_file(tmp_path, valid_checkpoint, data,
                                                                           replacement):
    header, tensors = json.loads(json.dumps(valid_checkpoint[0])), valid_checkpoint[1]
    where = data.draw(st.sampled_from(sorted(header_paths(header), key=str)))
    parent = header
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = replacement
    path = written(tmp_path, ".safetensors", header, tensors)
    state = _random.get_state()
    try:
        gb.load_checkpoint(path, device="cpu")
    except ValueError as exc:
        assert str(exc).startswith(f"{path}: ")
        assert _random.get_state() == state
