"""Save and load models (.npz, .safetensors) and import PyTorch / Keras weights.

Both file formats hold the architecture (layer sizes, activations, which layers are
frozen, where the Dropout layers stand and their rates) and the weights under the keys
``layers.{i}.weight`` (in, out) and ``layers.{i}.bias`` (``i`` counting Dense layers), so
:func:`load` rebuilds the model. ``.npz`` files are written and
read without pickle. Writes are atomic: a temporary file in the same folder, synced to
disk, renamed over the target, then the folder synced, so a crash leaves the old file or
the new one; the file keeps the permissions of the one it replaces (a new one gets those
``open()`` gives), and a symlink is written through. Loading checks the whole file (its
framing, every shape and dtype, finite weights, no missing or extra tensors) before it builds
anything, and names the file and the problem in a ValueError otherwise; a header is read
first, within the safetensors format's 100 MB, and says which tensors the file may hold before
any is read; an .npz entry is inflated only once the header has said that it belongs in the
file and how large it can be, and all of them together no further than weights compress.

>>> import os, tempfile, numpy as np, gpubp as gb
>>> model = gb.Sequential([gb.Dense(3, 4, "relu"), gb.Dense(4, 2)], device="cpu")
>>> path = os.path.join(tempfile.mkdtemp(), "m.npz")
>>> model.save(path)
>>> all(np.array_equal(a, b) for a, b in zip(gb.load(path).get_weights(), model.get_weights()))
True
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import secrets
import stat
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from gpubp import _checks, _safetensors
from gpubp._safetensors import echo
from gpubp import activations as _activations
from gpubp import backends
from gpubp.backends import PRECISIONS
from gpubp.layers import Dense, Dropout, Sequential, checked_model, parameter_names

log = logging.getLogger("gpubp")

FORMAT_VERSION = 1
SUFFIXES = (".npz", ".safetensors")
MODEL_SUFFIXES = SUFFIXES + (".onnx",)  # a model alone (gb.load) may also be an ONNX inference graph
WEIGHT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# A checkpoint's header section; it lists the tensors it adds beside the model's.
CHECKPOINT_KEY = "checkpoint"

NPZ_UNREADABLE = "not a readable .npz archive, truncated or corrupt"
# A zip archive starts with its first entry's local header, or, empty, with its end record.
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# How np.savez and np.savez_compressed store entries; other methods are refused rather than
# handed to more decompressors (bzip2, lzma) and their own errors.
NPZ_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# The longest .npy header dictionary read (NumPy's own default limit), and the most bytes an entry
# may hold before its array data: the 12-byte preamble of a version 2.0 header (magic, version,
# length) and the dictionary.
NPY_MAX_HEADER = 10_000
NPY_HEADER_ALLOWANCE = 12 + NPY_MAX_HEADER
# The widest dtype a tensor of a gpubp file holds (float64), which bounds an entry's array data.
MAX_ITEMSIZE = max(dtype.itemsize for dtype in WEIGHT_DTYPES)
# The most bytes the '__architecture__' entry may hold, before anything says what it should hold:
# the cap the safetensors format puts on its header (100 MB). Its JSON text is stored as UTF-32,
# so this is 25 million characters, far more than a model's or a long run's header takes.
ARCHITECTURE_ENTRY_LIMIT = _safetensors.HEADER_LIMIT
# How far an .npz archive's tensor entries may inflate, all together: to NPZ_INFLATION times the
# file's size, plus NPZ_INFLATION_ALLOWANCE bytes. np.savez_compressed shrinks random float32 or
# float64 weights 1.0 to 1.1-fold, float32 values held in float64 1.8-fold, weights quantized to
# 4 bits 5-fold, to +-1 17-fold, with 90% of them zero 7-fold and with 99% 58-fold; zeros shrink
# a thousandfold (the most deflate does), so the allowance takes the zero biases and optimizer
# state of any model (4 Mi float32 zeros, say, in some 16 KB) and a zero-initialised layer of up to
# 16 Mi float32 weights. (1024 x 1024 tensors measured with NumPy 2.4 and zlib; np.savez stores
# entries uncompressed, and gpubp writes with it.)
NPZ_INFLATION = 100
NPZ_INFLATION_ALLOWANCE = 64 * 2**20
# What NumPy's .npy header parser raises, besides ValueError, on a damaged or forged header: it
# evaluates the header with ast.literal_eval, retries one that is no Python literal after passing it
# through tokenize (tokenize.TokenError), and builds a dtype from whatever literal it finds.
NPY_HEADER_ERRORS = (SyntaxError, tokenize.TokenError, TypeError, KeyError, IndexError, OverflowError,
                     MemoryError, RecursionError)
# What zipfile raises, besides BadZipFile, on a damaged or forged archive: EOFError and zlib.error
# from an entry's data, and NotImplementedError for a "version needed to extract" past the 6.3 it
# reads, or an entry flagged as patched data or strongly encrypted. A forged directory's offsets can
# also lead it to seek before the file's start, an OSError EINVAL (:func:`_zip_errors`).
ZIP_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError)


def _path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):  # Path's own TypeError names no argument
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _suffix(path) -> str:
    suffix = _path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"path: expected a file ending in {' or '.join(SUFFIXES)}, got {str(path)!r}")
    return suffix


def _architecture(model: Sequential) -> dict:
    """The Dense layers' sizes, activations, names and trainable flags (the weights' keys count
    Dense layers only) and, where the model has any, ``"dropout"``: ``[position, rate, name]`` of
    each Dropout, its position in the whole model. A reader that knows no Dropout loads the same
    inference model."""
    dense = [layer for layer in model if isinstance(layer, Dense)]
    header = {
        "format_version": FORMAT_VERSION,
        "sizes": [model.in_features] + [layer.out_features for layer in dense],
        "activations": [layer.activation for layer in dense],
        "names": [layer.name for layer in dense],
        "trainable": [_trainable_entry(layer) for layer in dense],
        "precision": model.precision,
    }
    dropouts = [[i, layer.rate, layer.name] for i, layer in enumerate(model) if isinstance(layer, Dropout)]
    if dropouts:
        header["dropout"] = dropouts
    return header


def _trainable_entry(layer: Dense) -> bool | list[bool]:
    """A Dense layer's entry in the header's ``"trainable"``: one flag where its weight and bias
    agree, else ``[weight's, bias's]`` (a frozen bias alone, say)."""
    flags = [layer.weight.trainable, layer.bias.trainable]
    return flags[0] if flags[0] == flags[1] else flags


def _trainable_flags(path: Path, entry, i: int) -> tuple[bool, bool]:
    """(weight's, bias's) flag from a header's ``"trainable"`` entry for layer ``i``."""
    if isinstance(entry, bool):
        return entry, entry
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(flag, bool) for flag in entry):
        return entry[0], entry[1]
    raise ValueError(f"{path}: the header's trainable[{i}] must be true, false or [weight's, bias's], "
                     f"got {echo(entry)}")


def tensor_names(model: Sequential) -> list[str]:
    """The name a model file gives each of ``model.parameters()``, in order: ``layers.{i}.weight``
    and ``layers.{i}.bias``, ``i`` counting Dense layers (a Dropout holds no tensor)."""
    return parameter_names(len(model.parameters()))


def _tensors(model: Sequential) -> dict[str, np.ndarray]:
    return dict(zip(tensor_names(model), model.get_weights()))


# A temporary file's name: '.gpubp-' and a hash of the target's name (so that the name is as long
# for any target, and a target as long as the filesystem allows still gets one), the writer's pid
# (so that a later save can tell a killed writer's leftover from a live one's) and a random token.
TEMP_HASH_CHARS = 16
TEMP_TOKEN_CHARS = 16
# How much older than the process now holding its pid a temporary file must be to count as a
# killed writer's (:func:`_orphaned`): the start time read from /proc is up to a second early
# (the boot time is given in whole seconds), and some filesystems keep modification times in
# whole seconds (ext3) or two (FAT); the rest allows for the clock being set forward meanwhile.
ORPHAN_AGE_MARGIN_S = 2.0


def _temp_prefix(path: Path) -> str:
    """The start of the names of ``path``'s temporary files: no other target's begin so."""
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:TEMP_HASH_CHARS]
    return f".gpubp-{digest}."


def _temp_prefixes(path: Path) -> tuple[str, str]:
    """The starts of the names of ``path``'s temporary files: the current form (:func:`_temp_prefix`),
    and the ``.{target's name}.`` of gpubp versions before it, whose leftovers are cleared too."""
    return _temp_prefix(path), f".{path.name}."


def _temp_pid(name: str, prefixes: tuple[str, ...]) -> int | None:
    """The writer's pid, where ``name`` is ``{one of prefixes}{pid}.{token}.tmp``; None otherwise."""
    rest = next((name[len(prefix):] for prefix in prefixes if name.startswith(prefix)), None)
    parts = rest.split(".") if rest is not None else []
    if len(parts) == 3 and parts[0].isdigit() and parts[0].isascii() and parts[2] == "tmp" \
            and len(parts[1]) == TEMP_TOKEN_CHARS and all(c in "0123456789abcdef" for c in parts[1]):
        return int(parts[0])
    return None


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` with ``write(file)``: to a temporary file beside it, renamed over it once synced.
    A symlink is written through, as ``open(path, "wb")`` and np.save write through one: the file it
    points to is replaced (the temporary file beside that one, so the rename stays within one
    folder, and so one filesystem), and the link stays."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            _keep_mode(path, tmp)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)
    _remove_orphaned_temps(path)


def _new_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path``, open for writing, with the permissions ``open()`` (and
    np.save) give a new file: 0o666 less the umask.

    The kernel applies the umask to the mode 0o666 asked for here, so the umask is never read:
    reading it means setting it (os.umask), which races with the files other threads create
    meanwhile. (tempfile.mkstemp would create the file 0o600, and the saved file would keep that.)
    The writer's pid is in the name, so a later save can tell a killed writer's leftover from a
    live one's.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f"{_temp_prefix(path)}{os.getpid()}.{secrets.token_hex(TEMP_TOKEN_CHARS // 2)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another thread of this process drew the same name
            continue


def _keep_mode(path: Path, tmp: Path) -> None:
    """Give ``tmp`` the permissions of the file ``path`` that it is to replace, where there is one,
    as overwriting the file in place would have kept them."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:  # a new file: it keeps what the umask gave it
        return
    os.chmod(tmp, mode)


def _sync_folder(folder: Path) -> None:
    """Make the rename durable; folders cannot be opened for syncing on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_orphaned_temps(path: Path) -> None:
    """Delete temporary files that writers of ``path`` killed mid-save left behind (:func:`_orphaned`).

    Only names of the form :func:`_new_temp` gives ``path``'s temporary files are touched
    (:func:`_temp_pid`).
    """
    if os.name != "posix":
        return
    prefixes = _temp_prefixes(path)
    for entry in path.parent.iterdir():
        pid = _temp_pid(entry.name, prefixes)
        if pid is not None and _orphaned(entry, pid):
            entry.unlink(missing_ok=True)


def _orphaned(temp: Path, pid: int) -> bool:
    """Whether the temporary file ``temp``, named for the writer ``pid``, is a killed writer's.

    It is when no process on this machine has that pid; or when the process that has it started
    after the file was last written (by ``ORPHAN_AGE_MARGIN_S``): the writer was killed and its pid
    went to another process, as a container's PID 1 restarted after an OOM kill is PID 1 again.
    A live writer's file, this process's threads' included, was written after its process started,
    so it stays. Where the start time cannot be read (no /proc, or another user's process hidden by
    it) the file stays too.
    """
    if not _process_alive(pid):
        return True
    started = _process_start(pid)
    try:
        written = temp.lstat().st_mtime
    except FileNotFoundError:  # its writer renamed or removed it meanwhile
        return False
    return started is not None and written < started - ORPHAN_AGE_MARGIN_S


def _process_start(pid: int) -> float | None:
    """When the process ``pid`` started, in seconds since the epoch, from Linux's /proc: its start in
    clock ticks after boot (field 22 of /proc/<pid>/stat, after the command name in parentheses,
    which may hold spaces or parentheses itself) and the boot time (``btime`` in /proc/stat).
    None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def write_file(path, header: dict, tensors: dict[str, np.ndarray], allow_nan: bool = True) -> None:
    """Write ``header`` (JSON) and ``tensors`` to ``path`` (.npz or .safetensors), atomically.

    gpubp's own files pass ``allow_nan=False``: their headers are plain JSON, which has no NaN or
    inf (a checkpoint writes those as ``{"float": "nan"}``); a header holding one is then a
    ValueError, before anything is written. The default, as ``json.dumps``'s, writes them as the
    bare ``NaN`` and ``Infinity`` that Python's JSON reader (and so :func:`read_file`) accepts.
    """
    suffix = _suffix(path)
    path = Path(path)
    try:
        text = json.dumps(header, default=_json_scalar, allow_nan=allow_nan)
    except ValueError as exc:  # allow_nan=False and a NaN or inf
        raise ValueError(f"header: not plain JSON ({exc})") from None
    if suffix == ".npz":
        _atomic_write(path, lambda f: np.savez(f, __architecture__=np.array(text), **tensors))
    else:
        _atomic_write(path, lambda f: _safetensors.write(f, tensors, {"gpubp": text}))


def _json_scalar(value):
    """NumPy scalars (a float32 learning rate, a logged metric) as the Python numbers they hold."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write a {type(value).__name__} into a gpubp file header")


def save(model: Sequential, path) -> None:
    """Write ``model`` to ``path`` (.npz, .safetensors, or .onnx: see :mod:`gpubp.onnx`), atomically.
    NaN or inf weights are refused before anything is written (:func:`check_finite`)."""
    if _model_suffix(path) == ".onnx":
        from gpubp import onnx

        if isinstance(model, Sequential):  # gpubp.onnx.load refuses them too (an estimator's graph it does not read)
            check_finite(_tensors(model), "model")
        data = onnx.model_proto(model).SerializeToString()
        _atomic_write(Path(path), lambda f: f.write(data))
        return
    write_file(path, *model_contents(model), allow_nan=False)


def _model_suffix(path) -> str:
    suffix = _path(path).suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise ValueError(f"path: expected a file ending in {', '.join(MODEL_SUFFIXES[:-1])} or {MODEL_SUFFIXES[-1]}, "
                         f"got {str(path)!r}")
    return suffix


def model_contents(model: Sequential) -> tuple[dict, dict[str, np.ndarray]]:
    """``(header, tensors)`` of a saved ``model``: its architecture and its weights on the host,
    which must be finite (:func:`check_finite`). Checkpoints add their own section and tensors to these."""
    check_savable(model)
    tensors = _tensors(model)
    check_finite(tensors, "model")
    return _architecture(model), tensors


def check_finite(named: dict[str, np.ndarray], argname: str) -> None:
    """That no array of ``named`` (a file's tensors, by name) holds NaN or inf, else a ValueError naming
    ``argname`` and the tensor. Loading refuses such a file (:func:`check_weights`), and every file gpubp
    writes loads, so a diverged model is refused here, before a write could replace a good file."""
    for key, array in named.items():
        if not np.isfinite(array).all():
            raise ValueError(f"{argname}: {key!r} contains NaN or inf, which a gpubp file cannot hold (loading "
                             "refuses it)")


def check_savable(model: Sequential) -> None:
    """That a file can hold ``model`` (and so load it again): Dense and Dropout layers, at least one
    Dense, at most :func:`max_dropouts` Dropouts. Nothing is copied from the device."""
    checked_model(model)
    for i, layer in enumerate(model):
        if not isinstance(layer, (Dense, Dropout)):
            raise TypeError(f"model: layers[{i}] is a {type(layer).__name__}; the file format holds Dense and "
                            "Dropout layers only")
    dense_count = sum(isinstance(layer, Dense) for layer in model)
    if not dense_count:
        raise ValueError("model: expected at least one Dense layer")
    if len(model) - dense_count > max_dropouts(dense_count):
        raise ValueError(f"model: {len(model) - dense_count} Dropout layers for {dense_count} Dense layers; a model "
                         f"file holds at most {max_dropouts(dense_count)} ({MAX_STACKED_DROPOUTS} stacked in each "
                         "place, below each Dense layer and above the last): merge stacked ones into one Dropout")


def read_file(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(header, tensors)`` of a gpubp file, after checking its framing; ValueError naming the file otherwise."""
    suffix = _suffix(path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    return _read_npz(path) if suffix == ".npz" else _read_safetensors(path)


@contextlib.contextmanager
def _zip_errors(where: str = ""):
    """zipfile's failure on a damaged or forged archive (``ZIP_ERRORS``, or the OSError EINVAL of a
    seek before the file's start) as a ValueError saying the archive is unreadable; ``where``: what
    to add to its message. Other OSErrors are the system's, not the file's, and pass unchanged."""
    try:
        yield
    except ZIP_ERRORS as exc:
        raise ValueError(f"{NPZ_UNREADABLE} ({exc}{where})") from None
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        raise ValueError(f"{NPZ_UNREADABLE} ({exc}{where})") from None


@contextlib.contextmanager
def _naming(path: Path):
    """A failure to read the file ``path`` as a ValueError naming it."""
    try:
        yield
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:  # zlib: a compressed entry's data is damaged
        raise ValueError(f"{path}: {NPZ_UNREADABLE} ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _header(path: Path, text: str) -> dict:
    try:
        header = json.loads(text, object_pairs_hook=_safetensors.unique_keys)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested past Python's depth limit
        raise ValueError(f"{path}: the gpubp header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the gpubp header is a JSON {type(header).__name__}, expected an object")
    return header


def _read_npz(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and the other arrays of an .npz archive, read without np.load.

    np.load parses an entry's .npy header from the entry's first bytes, before zipfile reaches the
    CRC at the entry's end, and allocates the array the header describes before reading its data:
    a damaged header byte escaped as a tokenize or syntax error, a forged shape as a MemoryError.
    Here every entry is read whole first (zipfile checks its CRC) and its header is checked against
    the bytes actually present before any array is allocated (:func:`_npz_entry`).

    A deflated entry may inflate to a thousand times its stored size, so no entry is read before
    its uncompressed size is known to fit what it should hold: the ``__architecture__`` entry is
    read first, within ``ARCHITECTURE_ENTRY_LIMIT``; then the architecture it describes is checked,
    and says which other entries the archive may hold and how large each array can be. An entry it
    does not call for, or one larger than its array, is refused unread; and so are entries that
    together inflate far beyond what weights compress to (``NPZ_INFLATION``), however large the
    (forged) architecture says they are.
    """
    with _naming(path):
        with open(path, "rb") as f:
            start = f.read(len(ZIP_SIGNATURES[0]))
        if len(start) < len(ZIP_SIGNATURES[0]):
            raise EOFError(f"the file holds {len(start)} bytes, too few for a zip archive")
        if start not in ZIP_SIGNATURES:  # as np.load: a zip archive starts with a zip signature
            raise ValueError("not an .npz archive (it does not start with a zip signature)")
        with _zip_errors():
            archive = zipfile.ZipFile(path)
    with archive:
        with _naming(path):
            entries = _npz_entries(archive)
            text = str(_npz_entry(archive, "__architecture__", entries.pop("__architecture__"),
                                  ARCHITECTURE_ENTRY_LIMIT, "the header entry may hold (the cap the safetensors "
                                  "format puts on its header)"))
        header = _header(path, text)
        limits = _entry_limits(path, header)
        _refuse_unexpected(path, entries, limits)
        with _naming(path):
            _check_inflation(entries, os.fstat(archive.fp.fileno()).st_size)
            return header, {key: _npz_entry(archive, key, info, *limits[key]) for key, info in entries.items()}


def _npz_entries(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's entries by the names np.load gives their arrays, ``__architecture__`` among them."""
    entries = {}
    for info in archive.infolist():
        key = info.filename[:-len(".npy")] if info.filename.endswith(".npy") else info.filename  # as np.load
        if key in entries:  # two entries under one name: which one is the file's is anybody's guess
            raise ValueError(f"entry {echo(key)} appears twice in the archive")
        entries[key] = info
    if "__architecture__" not in entries:
        raise ValueError("not a gpubp model file (no '__architecture__' entry)")
    return entries


def _check_inflation(entries: dict[str, zipfile.ZipInfo], file_size: int) -> None:
    """The tensor entries' uncompressed sizes, as the zip directory gives them (an entry is read
    no further: :func:`_npz_entry`), add up to no more than weights of a file of ``file_size``
    bytes inflate to (``NPZ_INFLATION``)."""
    inflated = sum(info.file_size for info in entries.values())
    if inflated > NPZ_INFLATION * file_size + NPZ_INFLATION_ALLOWANCE:
        raise ValueError(f"the entries inflate to {inflated} bytes, more than {NPZ_INFLATION} times the file's "
                         f"{file_size} bytes plus {NPZ_INFLATION_ALLOWANCE}: weights do not compress that far "
                         "(zeros do, in a deflate bomb)")


def _entry_limits(path: Path, header: dict) -> dict[str, tuple[int, str]]:
    """The tensors ``header`` calls for, and the most bytes each may hold as an .npz entry, with
    what sets that bound: a .npy header and the array, of the shape the architecture gives it, in
    the widest dtype."""
    shapes = _weight_shapes(_layer_specs(path, header))
    counts = {key: (math.prod(shape), f"a float64 array of shape {shape}") for key, shape in shapes.items()}
    largest = max(count for count, _ in counts.values())
    for key in extra_tensor_names(path, header):
        # A checkpoint's optimizer state: arrays each shaped like one of the model's parameters.
        counts.setdefault(key, (largest, f"a float64 array of the model's largest parameter ({largest} elements)"))
    return {key: (NPY_HEADER_ALLOWANCE + count * MAX_ITEMSIZE, f"{array} takes with its .npy header")
            for key, (count, array) in counts.items()}


def _refuse_unexpected(path: Path, keys, expected) -> None:
    unexpected = set(keys) - set(expected)
    if unexpected:
        raise ValueError(f"{path}: unexpected keys {echo(sorted(unexpected))}")


def _npz_entry(archive: zipfile.ZipFile, key: str, info: zipfile.ZipInfo, limit: int, bound: str) -> np.ndarray:
    """The array an .npz entry holds, as np.load(allow_pickle=False) would return it (never unpickled).

    An entry whose uncompressed size exceeds ``limit`` bytes (what ``bound`` says) is refused unread.
    The entry's bytes are read whole, so zipfile checks its CRC before its header is parsed, in
    memory; the header's shape times its itemsize must then be exactly the bytes after the header,
    checked before the array is allocated. Any failure is a ValueError naming the entry.
    """
    if info.flag_bits & 0x1:
        raise ValueError(f"entry {key!r}: encrypted, which no .npz archive is")
    if info.compress_type not in NPZ_COMPRESSIONS:
        raise ValueError(f"entry {key!r}: zip compression method {info.compress_type}, expected stored (0) or "
                         "deflated (8), the ones NumPy writes")
    if info.file_size > limit:
        raise ValueError(f"entry {key!r}: {info.file_size} bytes uncompressed, more than the {limit} bytes {bound}")
    with _zip_errors(f"; in entry {key!r}"):
        # Exactly the size the zip directory gives, checked above: archive.read(info) would inflate
        # the whole deflate stream, however long, before it cut the output to that size.
        with archive.open(info) as entry:
            raw = entry.read(info.file_size)
    if not raw.startswith(np.lib.format.MAGIC_PREFIX):  # np.load returns such an entry as raw bytes
        raise ValueError(f"entry {key!r}: not a .npy array")
    buffer = io.BytesIO(raw)
    try:
        major, minor = np.lib.format.read_magic(buffer)
        if (major, minor) not in NPY_HEADER_READERS:  # 3.0 only for dtypes with non-Latin-1 field names
            raise ValueError(f".npy format version {major}.{minor}, expected 1.0 or 2.0")
        shape, fortran_order, dtype = NPY_HEADER_READERS[major, minor](buffer, max_header_size=NPY_MAX_HEADER)
    except ValueError as exc:
        raise ValueError(f"entry {key!r}: {exc}") from None
    except NPY_HEADER_ERRORS as exc:
        raise ValueError(f"entry {key!r}: the .npy header is not a valid header dictionary "
                         f"({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise ValueError(f"entry {key!r}: Object arrays cannot be loaded when allow_pickle=False")
    if not dtype.itemsize:  # its shape is unbounded by the data, and copies or str() widen it to 1 byte an item
        raise ValueError(f"entry {key!r}: the zero-width dtype {dtype}, which no gpubp tensor has")
    if not all(type(n) is int and n >= 0 for n in shape):  # NumPy's own check lets bools and negatives by
        raise ValueError(f"entry {key!r}: the header's shape {shape} is not a tuple of ints >= 0")
    count = math.prod(shape)
    offset = buffer.tell()
    needed, present = count * dtype.itemsize, len(raw) - offset
    if present < needed:
        raise ValueError(f"entry {key!r}: EOF: reading array data, expected {needed} bytes got {present} "
                         f"(the header's shape {shape} of {dtype})")
    if present > needed:
        raise ValueError(f"entry {key!r}: {present - needed} bytes after the array data (the header's shape "
                         f"{shape} of {dtype} needs {needed} bytes, the entry holds {present})")
    try:
        flat = np.frombuffer(raw, dtype, count, offset)
        return flat.reshape(shape, order="F" if fortran_order else "C").copy(order="K")  # writable, not a view
    except (ValueError, TypeError) as exc:  # e.g. a subarray dtype, whose arrays have more axes than the shape
        raise ValueError(f"entry {key!r}: no array of shape {shape} and dtype {dtype} ({exc})") from None


def _read_safetensors(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and the tensors of a .safetensors file, its header read and checked first (within
    the format's cap, ``_safetensors.HEADER_LIMIT``): a file without gpubp's metadata (another
    program's model) is refused before its entries are looked at, and one whose entries are
    inconsistent, or not the tensors its gpubp header calls for, before any data is read."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        with _naming(path):
            metadata, entries, data_start = _safetensors.read_header(file, size)
            if "gpubp" not in metadata:
                raise ValueError("not a gpubp model file (no 'gpubp' metadata)")
            layout = _safetensors.layout(entries, data_start, size)
        header = _header(path, metadata["gpubp"])
        _refuse_unexpected(path, layout, _entry_limits(path, header))
        with _naming(path):
            return header, _safetensors.read_tensors(file, layout)


def _layer_specs(path: Path, header: dict) -> list[tuple[int, int, str, str, tuple[bool, bool]]]:
    """(in, out, activation, name, (weight trainable, bias trainable)) per layer, from a header
    checked for consistency."""
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {echo(header.get('format_version'))}, expected {FORMAT_VERSION}")
    sizes, acts = header.get("sizes"), header.get("activations")
    if not isinstance(sizes, list) or not isinstance(acts, list) or not acts:
        raise ValueError(f"{path}: the header has no layer 'sizes' and 'activations' lists")
    if len(sizes) != len(acts) + 1:
        raise ValueError(f"{path}: inconsistent architecture ({len(sizes)} sizes for {len(acts)} layers)")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
        raise ValueError(f"{path}: layer sizes must be positive ints, got {echo(sizes)}")
    names = header.get("names", [f"dense_{i}" for i in range(len(acts))])
    trainable = header.get("trainable", [True] * len(acts))
    if not (isinstance(names, list) and isinstance(trainable, list) and len(names) == len(trainable) == len(acts)):
        raise ValueError(f"{path}: the header's 'names' and 'trainable' must list one entry per layer")
    if not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: the header's 'names' must be strings, got {echo(names)}")
    acts = [_activation(path, a, i) for i, a in enumerate(acts)]
    flags = [_trainable_flags(path, entry, i) for i, entry in enumerate(trainable)]
    return [(sizes[i], sizes[i + 1], acts[i], names[i], flags[i]) for i in range(len(acts))]


def _activation(path: Path, name, i: int) -> str:
    """The activation the header's ``activations[i]`` names, checked as ``Dense`` checks it; an error
    shows a name that is no activation's as :func:`echo` cuts it."""
    try:
        return _activations.canonical(name, f"activations[{i}]")
    except (TypeError, ValueError):
        raise ValueError(f"{path}: activations[{i}]: unknown activation {echo(name)}; expected one of "
                         f"{_activations.NAMES} or null") from None


def _weight_shapes(specs: list[tuple]) -> dict[str, tuple[int, ...]]:
    """The name and shape of each tensor of the layers ``specs`` describe (:func:`_layer_specs`)."""
    shapes = {}
    for i, (fan_in, fan_out, *_rest) in enumerate(specs):
        shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"] = (fan_in, fan_out), (fan_out,)
    return shapes


def _dropout_specs(path: Path, header: dict, dense_count: int) -> list[tuple[int, float, str]]:
    """(position, rate, name) of each Dropout the header lists, checked: at most
    :func:`max_dropouts`, positions distinct and within the model that the Dense layers and these
    make."""
    entries = header.get("dropout", [])
    if isinstance(entries, list) and len(entries) > max_dropouts(dense_count):
        raise ValueError(f"{path}: the header's 'dropout' lists {len(entries)} Dropout layers for {dense_count} Dense "
                         f"layers; a model file holds at most {max_dropouts(dense_count)} (see gpubp.io.max_dropouts)")
    total = dense_count + (len(entries) if isinstance(entries, list) else 0)
    specs = []
    for entry in entries if isinstance(entries, list) else [entries]:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
                and not isinstance(entry[0], bool) and isinstance(entry[1], (int, float))
                and not isinstance(entry[1], bool) and isinstance(entry[2], str)):
            raise ValueError(f"{path}: the header's 'dropout' must list [position, rate, name] entries, "
                             f"got {echo(entry)}")
        position, rate, name = entry
        if not 0 <= position < total or not 0 <= rate < 1:
            raise ValueError(f"{path}: dropout entry {echo(entry)}: expected a position in [0, {total}) and a rate "
                             "in [0, 1)")
        specs.append((position, float(rate), name))
    if len({position for position, _, _ in specs}) != len(specs):
        raise ValueError(f"{path}: the header's 'dropout' lists a position twice")
    return sorted(specs)


# The most Dropout layers a model file holds, stacked in each place one can stand (below each Dense
# layer, and above the last): more do nothing a model would want (a Dropout of the combined rate
# does it in one), and a forged header could list millions, each a layer to build.
MAX_STACKED_DROPOUTS = 4


def max_dropouts(dense_count: int) -> int:
    """The most Dropout layers a model file holds beside ``dense_count`` Dense layers:
    ``MAX_STACKED_DROPOUTS`` in each of the ``dense_count + 1`` places one can stand. Saving a
    model with more is refused, so that every saved file loads."""
    return MAX_STACKED_DROPOUTS * (dense_count + 1)


def extra_tensor_names(path: Path, header: dict) -> list[str]:
    """The tensors a checkpoint header declares beside the model's (none for a model file)."""
    section = header.get(CHECKPOINT_KEY)
    names = section.get("tensors", []) if isinstance(section, dict) else []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: the checkpoint's 'tensors' entry must list tensor names")
    return names


def check_weights(path: Path, named: dict[str, np.ndarray], dtype=None) -> np.dtype:
    """Every array float32 or float64, all of one dtype (``dtype`` if given), and finite."""
    for key, array in named.items():
        if dtype is None:
            dtype = array.dtype
        if array.dtype not in WEIGHT_DTYPES or array.dtype != dtype:
            expected = "float32 or float64" if dtype not in WEIGHT_DTYPES else f"{dtype}, as the other weights"
            raise ValueError(f"{path}: {key!r} has dtype {array.dtype}, expected {expected}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{path}: {key!r} contains NaN or inf")
    return np.dtype(dtype)


def model_from(path, header: dict, tensors: dict[str, np.ndarray], device: str = "auto",
               backend: str = "auto") -> Sequential:
    """The model a file's ``header`` and ``tensors`` describe, all checked before it is built."""
    path = Path(path)
    specs = _layer_specs(path, header)
    weights = {}
    for key, shape in _weight_shapes(specs).items():
        if key not in tensors:
            raise ValueError(f"{path}: missing key {key!r}")
        if tensors[key].shape != shape:
            raise ValueError(f"{path}: {key!r} has shape {tensors[key].shape}, expected {shape} "
                             "(the header's architecture)")
        weights[key] = tensors[key]
    _refuse_unexpected(path, tensors, [*weights, *extra_tensor_names(path, header)])
    dtype = check_weights(path, weights)
    dropouts = _dropout_specs(path, header, len(specs))
    precision = header.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"{path}: precision {echo(precision)} in the header, expected one of {PRECISIONS}")
    _check_backend_dtype(path, dtype, device, backend)
    # Zero init: the weights are set from the file, and loading must not draw from gb.seed's stream.
    dense_layers = iter([Dense(fan_in, fan_out, act, init=_zeros, name=name, dtype=dtype)
                         for fan_in, fan_out, act, name, _ in specs])
    dropout_at = {position: Dropout(rate, name=name) for position, rate, name in dropouts}
    layers = [dropout_at[i] if i in dropout_at else next(dense_layers) for i in range(len(specs) + len(dropout_at))]
    try:
        model = Sequential(layers, device=device, backend=backend, dtype=dtype)
    except ValueError as exc:  # an order of layers Sequential refuses (softmax below the top, say)
        raise ValueError(f"{path}: {exc}") from None
    if precision != "fp32":
        try:
            model.precision = precision
        except ValueError as exc:  # e.g. a bf16 model loaded where no fused kernels run
            log.warning("gpubp: %s was saved with precision=%r, which cannot run here (%s); loaded as fp32",
                        path, precision, exc)
    model.set_weights(list(weights.values()))
    for layer, (*_rest, (weight_trainable, bias_trainable)) in zip(
            [layer for layer in model if isinstance(layer, Dense)], specs):
        layer.weight.trainable, layer.bias.trainable = weight_trainable, bias_trainable
    return model


def _check_backend_dtype(path: Path, dtype: np.dtype, device: str, backend: str) -> None:
    """The backend ``device`` and ``backend`` pick computes in ``dtype``, the file's: the GPU backends
    compute in float32 only (as ``Sequential`` checks, here before anything is built, naming the
    caller's argument, which is what to change)."""
    name = backends.resolve(device, backend)  # the caller's arguments: their errors are not the file's
    if not backends.computes_in(name, dtype):
        argument, backend_does = (("backend", f"the {name!r} backend") if backend != "auto" else
                                  ("device", f"device={device!r} runs the {name!r} backend, which"))
        raise ValueError(f"{argument}: {backend_does} computes in float32 only, and {path} holds {dtype} weights; "
                         f"load it with device='cpu' (the NumPy backend computes in {dtype})")


def _zeros(rng, shape) -> np.ndarray:
    return np.zeros(shape)


def load(path, device: str = "auto", backend: str = "auto") -> Sequential:
    """Rebuild a model saved by :meth:`Sequential.save` (or the model of a checkpoint, or an
    ONNX file: see :mod:`gpubp.onnx`).

    A file that is truncated, forged or of another architecture (wrong shapes or dtypes,
    NaN or inf weights, missing or extra tensors) is a ValueError naming the file and the
    problem, raised before anything is built.
    """
    if _model_suffix(path) == ".onnx":
        from gpubp import onnx

        return onnx.load(path, device=device, backend=backend)
    header, tensors = read_file(path)
    return model_from(path, header, tensors, device=device, backend=backend)


# ----------------------------------------------------------------------------- importing weights


def _numpy(value, key: str) -> np.ndarray:
    """A NumPy copy of a torch tensor (on any device) or array-like, without importing torch.
    Floating-point tensors NumPy has no dtype for (bfloat16, the float8s) widen to float32 first,
    which is exact."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        try:
            value = value.numpy()
        except TypeError:
            if not value.is_floating_point():
                raise TypeError(f"state dict: {key!r} has dtype {value.dtype}, which NumPy cannot hold") from None
            value = value.float().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"state dict: {key!r} is not numeric (dtype {array.dtype})")
    return array


def _refuse_with_model(model, activations, model_kwargs: dict) -> None:
    """With ``model``, the weights go into that model as it is: ``activations`` and ``model_kwargs``
    (device, backend, dtype), which only describe a new model, would be ignored, so they are refused."""
    if model is None:
        return
    given = (["activations"] if activations is not None else []) + list(model_kwargs)
    if given:
        raise TypeError(f"{given[0]}: does not apply with model=, whose weights are replaced and whose activations, "
                        "device, backend and dtype stay; pass model= alone, or these arguments without it to build "
                        "a new model")


def _build_or_load(weights: list[np.ndarray], names: list[str], model, activations, source: str,
                   **model_kwargs) -> Sequential:
    """``model`` with ``weights`` loaded, or a new model of them; ``names``: what an error calls each
    array, the caller's argument and key (set_weights would call them ``weights[i]``)."""
    if model is not None and not isinstance(model, Sequential):
        raise TypeError(f"model: expected a gpubp.Sequential, got {type(model).__name__}")
    dtype = model.dtype if model is not None else model_kwargs.get("dtype")
    dtype = _checks.parameter_dtype(np.float32 if dtype is None else dtype, "dtype")
    holder = "the model" if model is not None else "the new model"
    weights = [_checks.weight_values(array, array.shape, dtype, name, name, holder)
               for array, name in zip(weights, names)]
    if model is not None:
        model.set_weights(weights)
        return model
    n_layers = len(weights) // 2
    if activations is None:
        activations = ["relu"] * (n_layers - 1) + [None]
    if len(activations) != n_layers:
        raise ValueError(f"activations: expected {n_layers} entries (one per layer in the {source}), got {len(activations)}")
    acts = [_activations.canonical(a, f"activations[{i}]") for i, a in enumerate(activations)]
    for i in range(1, n_layers):
        if weights[2 * i].shape[0] != weights[2 * i - 2].shape[1]:
            raise ValueError(f"{source}: layer {i} takes {weights[2 * i].shape[0]} inputs but layer {i - 1} "
                             f"gives {weights[2 * i - 2].shape[1]}")
    # Zeros, as load() builds them: the weights come next, and an import draws nothing from gb.seed's stream.
    layers = [Dense(*weights[2 * i].shape, activation=acts[i], init=_zeros) for i in range(n_layers)]
    built = Sequential(layers, **model_kwargs)
    built.set_weights(weights)
    return built


# The key gpubp.torch.MLP's state_dict() sets in its own entry of ``state_dict._metadata`` (which
# torch.save keeps): its weights are (in, out), where nn.Linear's are (out, in).
TORCH_MLP_LAYOUT = "gpubp_weight_layout"


def from_torch_state_dict(state_dict, model: Sequential | None = None, activations=None,
                          **model_kwargs) -> Sequential:
    """Import the nn.Linear layers of a PyTorch ``state_dict`` (tensors or NumPy arrays).

    Linear weights are (out, in) in PyTorch and are transposed to our (in, out). Layers are
    taken in the state dict's order, each ``<prefix>.weight`` with its ``<prefix>.bias``.
    With ``model``, its weights are replaced (every shape checked first, the model unchanged
    on error; ``activations`` and ``model_kwargs``, which describe a new model, are a TypeError
    beside it); otherwise a new Sequential is built with ``activations`` (default: relu between
    layers, identity at the top) and ``model_kwargs`` (device, backend, dtype: float32 unless
    given, as for any Sequential, whatever the tensors' dtype; ``dtype=np.float64`` keeps float64).

    A :class:`gpubp.torch.MLP` keeps gpubp's (in, out) weights, under the keys that an nn.Module
    with its Linear layers in ``layers`` has too (``layers.0.weight``): convert it with
    ``MLP.to_sequential()``, which also keeps its activations, dropout, precision and frozen
    layers. Its state dict is a ValueError saying so: the MLP marks its entry of the dict's
    ``_metadata`` (kept by ``torch.save``); without that (a dict rebuilt by hand), as soon as one
    layer's bias shows the layout (as long as the weight's second axis, where an nn.Linear's
    matches the first). Only an unmarked MLP of square layers would load transposed.
    """
    if not hasattr(state_dict, "keys"):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    _refuse_with_model(model, activations, model_kwargs)
    metadata = getattr(state_dict, "_metadata", None)
    marked = [name for name, entry in (metadata.items() if isinstance(metadata, dict) else ())
              if isinstance(entry, dict) and TORCH_MLP_LAYOUT in entry]
    if marked:
        where = f" (the module at {marked[0]!r})" if marked[0] else ""
        raise ValueError(f"state_dict: the state of a gpubp.torch.MLP{where}, whose weights are stored (in, out) where "
                         "nn.Linear's are (out, in); convert the MLP with MLP.to_sequential()")
    prefixes = [key[: -len(".weight")] for key in state_dict.keys() if key.endswith(".weight")]
    if not prefixes:
        raise ValueError("state_dict: no '<name>.weight' entries found")
    orphans = [key for key in state_dict.keys() if key.endswith(".bias") and key[: -len(".bias")] not in prefixes]
    if orphans:
        raise ValueError(f"state_dict: missing key {orphans[0][: -len('.bias')] + '.weight'!r} (for {orphans[0]!r})")
    # With a model, check against its layers here, so errors name the state dict's keys and (out, in) shapes.
    # The model's Dense layers: a Dropout holds no weights, as an nn.Dropout holds no state.
    layers = [layer for layer in model if isinstance(layer, Dense)] if isinstance(model, Sequential) else None
    if layers is not None and len(layers) != len(prefixes):
        raise ValueError(f"state_dict: {len(prefixes)} Linear layers {prefixes}, but the model has {len(layers)} "
                         "Dense layers")
    weights, names = [], []
    for i, prefix in enumerate(prefixes):
        w = _numpy(state_dict[f"{prefix}.weight"], f"{prefix}.weight")
        if w.ndim != 2:
            raise ValueError(f"state_dict: {prefix + '.weight'!r} has shape {w.shape}; expected a 2-D nn.Linear weight")
        if f"{prefix}.bias" not in state_dict:
            raise ValueError(f"state_dict: missing key {prefix + '.bias'!r} (gpubp Dense layers always have a bias)")
        b = _numpy(state_dict[f"{prefix}.bias"], f"{prefix}.bias")
        if w.shape[0] != w.shape[1] and b.shape == (w.shape[1],):  # before the model's shapes: the cause of their error
            raise ValueError(f"state_dict: {prefix + '.weight'!r} has shape {w.shape} and {prefix + '.bias'!r} "
                             f"{b.shape}: a weight stored (in, out), as gpubp.torch.MLP stores them, where nn.Linear's "
                             "is (out, in); convert an MLP with MLP.to_sequential() (and other (in, out) weights with "
                             "gpubp.io.from_keras_weights)")
        if layers is not None and w.shape != (layers[i].out_features, layers[i].in_features):
            raise ValueError(f"state_dict: {prefix + '.weight'!r} has shape {w.shape}, expected (out, in) = "
                             f"{(layers[i].out_features, layers[i].in_features)} for the model's layer {i}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"state_dict: {prefix + '.bias'!r} has shape {b.shape}, expected ({w.shape[0]},)")
        weights += [np.ascontiguousarray(w.T), b]
        names += [f"state_dict: {prefix + '.weight'!r}", f"state_dict: {prefix + '.bias'!r}"]
    return _build_or_load(weights, names, model, activations, "state dict", **model_kwargs)


# Keras's activation strings that gpubp knows under the same name but computes otherwise, and why.
# The others gpubp takes mean what they mean in Keras 3 (keras.activations): "linear" (and None),
# "relu", "sigmoid", "tanh", "softmax" (over the last axis), "gelu" (exact, erf: approximate=False)
# and "silu" with its alias "swish" (x sigmoid(x)); the names Keras alone has ("elu", "selu",
# "softplus", "hard_sigmoid", "mish", ...) are unknown activations to gpubp, refused as such.
KERAS_MISMATCHES = {
    "leaky_relu": "Keras's 'leaky_relu' (keras.activations.leaky_relu) has a negative slope of 0.2, and "
                  "keras.layers.LeakyReLU's default is 0.3, where gpubp's leaky_relu has a fixed 0.01, so the "
                  "imported model would compute something else; for a Keras slope of 0.01 "
                  "(LeakyReLU(negative_slope=0.01)), build the gb.Sequential with 'leaky_relu' and pass it as model=",
}


def from_keras_weights(weights, model: Sequential | None = None, activations=None, **model_kwargs) -> Sequential:
    """Import Keras Dense weights ``[kernel0 (in, units), bias0, kernel1, bias1, ...]`` (``model.get_weights()``).

    Keras kernels already have our (in, out) layout. ``model``/``activations`` as in
    :func:`from_torch_state_dict`; an activation is named as the Keras layer's ``activation``
    string, and a name gpubp computes otherwise than Keras (``KERAS_MISMATCHES``: "leaky_relu",
    whose slope differs) is a ValueError.
    """
    if not isinstance(weights, (list, tuple)) or not weights or len(weights) % 2:
        raise ValueError("weights: expected a non-empty list [kernel0, bias0, kernel1, bias1, ...]")
    _refuse_with_model(model, activations, model_kwargs)
    for i, name in enumerate(activations if isinstance(activations, (list, tuple)) else []):
        if isinstance(name, str) and name in KERAS_MISMATCHES:
            raise ValueError(f"activations[{i}]: {KERAS_MISMATCHES[name]}")
    arrays = [_numpy(w, f"weights[{i}]") for i, w in enumerate(weights)]
    for i in range(0, len(arrays), 2):
        kernel, bias = arrays[i], arrays[i + 1]
        if kernel.ndim != 2:
            raise ValueError(f"weights[{i}]: expected a 2-D kernel (in, units), got shape {kernel.shape}")
        if bias.shape != (kernel.shape[1],):
            raise ValueError(f"weights[{i + 1}]: expected bias shape ({kernel.shape[1]},), got {bias.shape}")
    return _build_or_load(arrays, [f"weights[{i}]" for i in range(len(arrays))], model, activations, "Keras weights",
                          **model_kwargs)
