"""Broken and forged files: gb.load and gb.load_checkpoint raise a ValueError that names the
file and the problem, and load nothing, not even the random state, for every case."""

import errno
import json
import re
import tracemalloc
import zipfile
from io import BytesIO

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpubp as gb
from gpubp import _random, io
from gpubp.checkpoint import save_checkpoint
from gpubp.optim.lr_scheduler import StepLR

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


def checkpoint_parts(tmp_path, suffix, sizes=(4, 6, 3), scheduled=False):
    """(header, tensors) of a valid checkpoint, ``scheduled`` with a StepLR's state: the material each test spoils."""
    path = tmp_path / f"valid{suffix}"
    model, optimizer, history = trained(sizes)
    scheduler = StepLR(optimizer, step_size=1) if scheduled else None
    save_checkpoint(path, model, optimizer, epoch=2, history=history, scheduler=scheduler)
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


@pytest.mark.parametrize("rate, problem", [
    ({"float": "nan"}, "expected a finite number >= 0, got nan"),
    (-5.0, "expected a finite number >= 0, got -5.0"),
    ("0.1", "expected a number >= 0, got str '0.1'"),
], ids=["nan", "negative", "str"])
def test_a_scheduler_rate_the_optimizer_would_refuse(tmp_path, suffix, rate, problem):
    """Loading the scheduler's state puts its ``_last_lr`` into the restored optimizer."""
    header, tensors = checkpoint_parts(tmp_path, suffix, scheduled=True)
    header["checkpoint"]["scheduler"]["state"]["_last_lr"] = [rate]
    expect_rejected(LOADERS["load_checkpoint"], written(tmp_path, suffix, header, tensors),
                    r"the scheduler's state\['_last_lr'\]\[0\]: " + problem)


OPTIMIZER_FORGERIES = {
    "class_a_list": (lambda saved: saved.__setitem__("class", ["Adam"]),
                     r"unknown optimizer \['Adam'\]; expected one of \['Adam', 'AdamW', 'RMSprop', 'SGD'\]"),
    "positions_bools": (lambda saved: saved.__setitem__("params", [False, True, 2, 3]),
                        r"the optimizer's parameters \[False, True, 2, 3\] are not distinct positions in the "
                        r"model's 4 parameters"),
    "group_indices_floats": (lambda saved: saved["param_groups"][0].__setitem__("params", [0.0, 1.0, 2.0, 3.0]),
                             r"the optimizer's param_groups\[0\] must be an object whose 'params' lists parameter "
                             r"indices \(ints >= 0\), got 'params' \[0.0, 1.0, 2.0, 3.0\]"),
    "state_key_a_word": (lambda saved: saved["state"].__setitem__("x", saved["state"]["0"]),
                         r"the optimizer's state key 'x' is not a parameter index; expected an int from '0' to '3'"),
    "state_key_spaced": (lambda saved: saved["state"].__setitem__(" 0", saved["state"].pop("0")),
                         r"the optimizer's state key ' 0' is not a parameter index"),
    "state_key_zero_padded": (lambda saved: saved["state"].__setitem__("01", saved["state"]["1"]),
                              r"the optimizer's state key '01' is not a parameter index"),
    "tensor_reference_a_list": (lambda saved: saved["state"]["0"].__setitem__("m", {"tensor": [1]}),
                                r"the optimizer's state refers to \{'tensor': \[1\]\}; expected \{'tensor': name\} "
                                r"naming one of the checkpoint's tensors"),
    "tensor_reference_to_a_weight": (lambda saved: saved["state"]["0"].__setitem__("m", {"tensor": "layers.0.weight"}),
                                     r"the optimizer's state refers to \{'tensor': 'layers.0.weight'\}"),
}


@pytest.mark.parametrize("forge, problem", OPTIMIZER_FORGERIES.values(), ids=OPTIMIZER_FORGERIES.keys())
def test_a_forged_optimizer_entry_is_named_with_what_was_expected(tmp_path, suffix, forge, problem):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    forge(header["checkpoint"]["optimizer"])
    expect_rejected(LOADERS["load_checkpoint"], written(tmp_path, suffix, header, tensors), problem)


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


def forge_zip_field(path, signature, offset, width, value):
    """``path`` with the ``width``-byte field at ``offset`` in its first zip record of ``signature``
    set to ``value(what it held)``."""
    blob = bytearray(path.read_bytes())
    at = blob.find(signature) + offset
    blob[at:at + width] = value(int.from_bytes(blob[at:at + width], "little")).to_bytes(width, "little")
    path.write_bytes(bytes(blob))


CENTRAL_DIRECTORY, END_RECORD = b"PK\x01\x02", b"PK\x05\x06"
ZIP_FORGERIES = {
    # The directory placed a byte later than it is: zipfile reckons every entry a byte earlier, the
    # first one before the file's start, and the seek there fails (OSError EINVAL).
    "directory_offset": ((END_RECORD, 16, 4, lambda offset: offset + 1),
                         r"\[Errno 22\] Invalid argument; in entry '__architecture__'"),
    # A "version needed to extract" past the 6.3 zipfile reads: NotImplementedError.
    "version_needed": ((CENTRAL_DIRECTORY, 6, 2, lambda version: 64), r"zip file version 6\.4"),
    # Flag bit 5, "compressed patched data", which zipfile does not read: NotImplementedError.
    "patched_data": ((CENTRAL_DIRECTORY, 8, 2, lambda flags: flags | 0x20),
                     r"compressed patched data \(flag bit 5\); in entry '__architecture__'"),
}


@pytest.mark.parametrize("field, problem", ZIP_FORGERIES.values(), ids=ZIP_FORGERIES.keys())
def test_a_forged_zip_directory_is_a_value_error_not_zipfiles_own(tmp_path, loader, field, problem):
    """zipfile raises OSError or NotImplementedError for these, not BadZipFile."""
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    forge_zip_field(path, *field)
    expect_rejected(loader, path, rf"not a readable .npz archive, truncated or corrupt \({problem}\)")


def test_an_os_error_of_the_system_is_not_called_a_damaged_file(tmp_path, loader, monkeypatch):
    """Only the EINVAL of a seek before the file's start, which a forged directory causes, is the file's."""
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))

    def failing_disk(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(zipfile, "ZipFile", failing_disk)
    with pytest.raises(OSError, match=r"Input/output error"):
        loader(path)


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


# Zeros deflate about a thousandfold: this many inflate from an entry of some 16 KB.
BOMB_BYTES = 16 * 2**20


def with_deflated_zeros(path, name, size=BOMB_BYTES):
    """Rewrite the archive with its entry ``name`` (added, or in place of the one there) a deflated
    .npy array of ``size`` zero bytes, written in pieces so that the test itself holds few."""
    with zipfile.ZipFile(path) as archive:
        kept = {info.filename: archive.read(info) for info in archive.infolist() if info.filename != name}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry, raw in kept.items():
            archive.writestr(entry, raw)
        with archive.open(name, "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
            piece = bytes(2**20)
            for _ in range(size // len(piece)):
                f.write(piece)
    return path


def understate_size(path, name, size):
    """Write ``size`` as the entry ``name``'s uncompressed size in the zip's central directory, where
    zipfile reads it: byte 24 of the entry's record, whose name starts at byte 46 and whose name,
    extra field and comment lengths are at bytes 28, 30 and 32."""
    with zipfile.ZipFile(path) as archive:
        record = archive.start_dir
    blob = bytearray(path.read_bytes())
    lengths = [int.from_bytes(blob[record + at:record + at + 2], "little") for at in (28, 30, 32)]
    while blob[record + 46:record + 46 + lengths[0]] != name.encode():
        record += 46 + sum(lengths)
        lengths = [int.from_bytes(blob[record + at:record + at + 2], "little") for at in (28, 30, 32)]
    blob[record + 24:record + 28] = size.to_bytes(4, "little")
    path.write_bytes(bytes(blob))


def rejected_within(limit, loader, path, problem):
    """:func:`expect_rejected`, with the memory allocated meanwhile peaking below ``limit`` bytes."""
    tracemalloc.start()
    try:
        expect_rejected(loader, path, problem)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"{peak} bytes allocated to refuse the file"


def test_an_unexpected_deflated_entry_is_refused_unread(tmp_path, loader):
    """A deflate bomb beside the model: the header, read first, calls for no such entry."""
    path = with_deflated_zeros(written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz")), "junk.npy")
    rejected_within(BOMB_BYTES // 8, loader, path, r"unexpected keys \['junk'\]")


def test_an_entry_larger_than_its_array_is_refused_unread(tmp_path, loader):
    """Its size in the zip directory exceeds what the header's shape holds in float64, the widest
    dtype, with a .npy header of NumPy's longest (10,000 bytes, and a 12-byte preamble)."""
    path = with_deflated_zeros(written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz")), "layers.0.weight.npy")
    rejected_within(BOMB_BYTES // 8, loader, path, rf"entry 'layers.0.weight': {BOMB_BYTES + 128} bytes "
                    r"uncompressed, more than the 10204 bytes a float64 array of shape \(4, 6\) takes with its "
                    r".npy header")


def test_an_optimizer_entry_larger_than_the_largest_parameter_is_refused_unread(tmp_path):
    """The optimizer's state arrays are shaped like the model's parameters, the largest of 4 x 6 here."""
    path = written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz"))
    with_deflated_zeros(path, "optimizer.state.0.m.npy")
    rejected_within(BOMB_BYTES // 8, LOADERS["load_checkpoint"], path,
                    rf"entry 'optimizer.state.0.m': {BOMB_BYTES + 128} bytes uncompressed, more than the 10204 "
                    r"bytes a float64 array of the model's largest parameter \(24 elements\) takes")


def test_an_entry_that_inflates_past_the_size_in_the_zip_directory_is_read_no_further(tmp_path, loader):
    """zipfile's read() would inflate the whole deflate stream before cutting it to the size the
    directory gives; the entry is read to that size, where its CRC fails."""
    path = with_deflated_zeros(written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz")), "layers.0.weight.npy")
    understate_size(path, "layers.0.weight.npy", 224)
    rejected_within(BOMB_BYTES // 8, loader, path, r"not a readable .npz archive, truncated or corrupt \(Bad CRC-32 "
                                                   r"for file 'layers.0.weight.npy'; in entry 'layers.0.weight'\)")


def test_a_header_entry_past_its_cap_is_refused_unread(tmp_path, loader, monkeypatch):
    """Before the header is read nothing says how large it should be: it has a cap of its own."""
    monkeypatch.setattr(io, "ARCHITECTURE_ENTRY_LIMIT", BOMB_BYTES // 16)
    path = with_deflated_zeros(written(tmp_path, ".npz", *checkpoint_parts(tmp_path, ".npz")), "__architecture__.npy")
    rejected_within(BOMB_BYTES // 8, loader, path, rf"entry '__architecture__': {BOMB_BYTES + 128} bytes "
                    rf"uncompressed, more than the {BOMB_BYTES // 16} bytes the header entry may hold")


def zeros_archive(path, width):
    """np.savez_compressed of a model file whose header describes one 1 -> ``width`` layer, all zeros:
    some 1 KB a MiB of weights."""
    header = {"format_version": io.FORMAT_VERSION, "sizes": [1, width], "activations": ["identity"]}
    np.savez_compressed(path, __architecture__=np.array(json.dumps(header)),
                        **{"layers.0.weight": np.zeros((1, width), np.float32),
                           "layers.0.bias": np.zeros(width, np.float32)})
    return path


def test_entries_that_inflate_far_beyond_what_weights_compress_to_are_refused_unread(tmp_path):
    """A forged header may describe a layer as wide as it likes, each entry within its array's size:
    128 MiB of zeros in 0.13 MB. The entries together may inflate to 100 times the file's size
    plus 64 MiB, which weights stay far below."""
    path = zeros_archive(tmp_path / "bomb.npz", 2**24)
    rejected_within(BOMB_BYTES // 8, LOADERS["load"], path,
                    rf"the entries inflate to {2 * 2**26 + 256} bytes, more than 100 times the file's "
                    rf"{path.stat().st_size} bytes plus 67108864: weights do not compress that far")


def test_a_zero_initialised_layer_saved_compressed_loads(tmp_path):
    """Zeros deflate a thousandfold, past any ratio weights reach; the 64 MiB allowance takes them."""
    model = gb.load(zeros_archive(tmp_path / "zeros.npz", 2**20), device="cpu")
    assert model[0].out_features == 2**20 and not model.get_weights()[0].any()


def safetensors_file(path, header, data_bytes):
    """A safetensors file of ``header`` (a dict, or JSON text) and ``data_bytes`` zero bytes of data,
    written sparse, so that the test itself holds few."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + data_bytes)
    return path


def test_a_safetensors_file_of_another_program_is_refused_before_its_data_is_read(tmp_path, loader):
    """A Hugging Face model, say, in bfloat16 (which gpubp does not read): its header alone is read,
    and says it is not gpubp's."""
    entry = {"dtype": "BF16", "shape": [BOMB_BYTES // 2], "data_offsets": [0, BOMB_BYTES]}
    path = safetensors_file(tmp_path / "foreign.safetensors", {"encoder.weight": entry}, BOMB_BYTES)
    rejected_within(BOMB_BYTES // 8, loader, path, r"not a gpubp model file \(no 'gpubp' metadata\)$")


def test_a_tensor_the_gpubp_header_does_not_call_for_is_refused_before_the_data_is_read(tmp_path, loader):
    header, tensors = checkpoint_parts(tmp_path, ".safetensors")
    path = written(tmp_path, ".safetensors", header, {**tensors, "junk": np.zeros(BOMB_BYTES // 4, np.float32)})
    rejected_within(BOMB_BYTES // 8, loader, path, r"unexpected keys \['junk'\]")


def test_a_safetensors_header_past_the_formats_cap_is_refused_unread(tmp_path, loader, monkeypatch):
    """The format caps its header at 100 MB (the safetensors package refuses longer ones), as the
    .npz header entry is capped: before the header is read nothing says how large it should be."""
    assert io._safetensors.HEADER_LIMIT == io.ARCHITECTURE_ENTRY_LIMIT == 100_000_000
    monkeypatch.setattr(io._safetensors, "HEADER_LIMIT", BOMB_BYTES // 16)
    path = safetensors_file(tmp_path / "long_header.safetensors", "{}" + " " * BOMB_BYTES, 0)
    rejected_within(BOMB_BYTES // 8, loader, path, rf"the header length \({BOMB_BYTES + 8} bytes\) is more than the "
                                                   rf"{BOMB_BYTES // 16} bytes the safetensors format allows$")


LONG = 100_000  # items of a forged value, which an error shows cut short


def forged_entry(header):
    header["layers.0.weight"] = [0] * LONG


def forged_shape(header):
    header["layers.0.weight"]["shape"] = [0] * LONG


def forged_name(header):
    header["x" * LONG] = {"dtype": "BF16", "shape": [0], "data_offsets": [0, 0]}


@pytest.mark.parametrize("forge", [forged_entry, forged_shape, forged_name])
def test_a_forged_safetensors_entry_is_shown_cut_short(tmp_path, loader, forge):
    path = written(tmp_path, ".safetensors", *checkpoint_parts(tmp_path, ".safetensors"))
    rewrite_safetensors_header(path, forge)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ")) as error:
        loader(path)
    assert len(str(error.value)) < len(str(path)) + 300


@pytest.mark.parametrize("forge", [
    lambda header: header.update(format_version="x" * LONG),
    lambda header: header["sizes"].__setitem__(1, "x" * LONG),
    lambda header: header["activations"].__setitem__(0, "x" * LONG),
    lambda header: header["names"].__setitem__(0, [0] * LONG),
    lambda header: header["trainable"].__setitem__(0, [0] * LONG),
    lambda header: header.update(dropout=[[0] * LONG]),
    lambda header: header.update(precision="x" * LONG),
    lambda header: header["checkpoint"]["optimizer"].update(params=list(range(LONG))),
    lambda header: header["checkpoint"]["optimizer"]["state"].update({"x" * LONG: {}}),
], ids=["format_version", "sizes", "activation", "names", "trainable", "dropout", "precision", "optimizer_params",
        "optimizer_state_key"])
def test_a_forged_header_value_is_shown_cut_short(tmp_path, suffix, forge):
    """The error names the problem and shows the value, some 100 characters of it, not megabytes."""
    header, tensors = checkpoint_parts(tmp_path, suffix)
    forge(header)
    path = written(tmp_path, suffix, header, tensors)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ")) as error:
        gb.load_checkpoint(path, device="cpu")
    assert len(str(error.value)) < len(str(path)) + 300


def with_key_twice(text, key, value):
    """JSON object ``text`` with ``"key": value`` added at its end, where ``key`` is in it already."""
    assert f'"{key}"' in text
    return text.rstrip()[:-1] + f', "{key}": {json.dumps(value)}}}'


@pytest.mark.parametrize("key", ["__metadata__", "layers.0.bias"])
def test_a_key_twice_in_a_safetensors_header_is_refused(tmp_path, loader, key):
    """The safetensors package refuses it ('duplicate field'); taking the last one, gpubp would load
    another model from the file than it does."""
    path = written(tmp_path, ".safetensors", *checkpoint_parts(tmp_path, ".safetensors"))
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    framing = json.loads(blob[8:8 + length])
    text = with_key_twice(blob[8:8 + length].decode(), key, framing[key]).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + length:])
    expect_rejected(loader, path, rf"the header is not valid JSON \(the key '{key}' appears twice in one object\)")


@pytest.mark.parametrize("key, value", [("activations", ["tanh", "sigmoid"]), ("checkpoint", {})])
def test_a_key_twice_in_the_gpubp_header_is_refused(tmp_path, suffix, loader, key, value):
    header, tensors = checkpoint_parts(tmp_path, suffix)
    text = with_key_twice(json.dumps(header), key, value)
    path = tmp_path / f"twice{suffix}"
    if suffix == ".npz":
        np.savez(path, __architecture__=np.array(text), **tensors)
    else:
        path.write_bytes(io._safetensors.dumps(tensors, {"gpubp": text}))
    expect_rejected(loader, path,
                    rf"the gpubp header is not valid JSON \(the key '{key}' appears twice in one object\)")


def test_a_header_listing_more_dropouts_than_a_model_file_holds(tmp_path, suffix, loader):
    """Each entry is a layer to build: a forged header of a few MB could list a hundred thousand."""
    header, tensors = checkpoint_parts(tmp_path, suffix)  # two Dense layers: 4 Dropouts in each of 3 places
    header["dropout"] = [[i, 0.1, f"dropout_{i}"] for i in range(13)]
    expect_rejected(loader, written(tmp_path, suffix, header, tensors),
                    r"the header's 'dropout' lists 13 Dropout layers for 2 Dense layers; a model file holds at most 12")


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
