"""Saving and loading: bit-exact round trips, no pickle, atomic writes, clear errors."""

import json
import os
import stat
import subprocess
import sys
import threading
from io import BytesIO

import numpy as np
import pytest

import gpubp as gb
from gpubp import io

SUFFIXES = [".npz", ".safetensors"]


def trained_model(dtype="float32"):
    gb.seed(3)
    model = gb.Sequential([gb.Dense(4, 6, "gelu"), gb.Dense(6, 5, "tanh"), gb.Dense(5, 3, "sigmoid")],
                          device="cpu", dtype=dtype)
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    model.fit(x, np.arange(32) % 3, optimizer=gb.optim.Adam(model.parameters(), lr=0.01), epochs=2,
              batch_size=8, verbose=0)
    return model


def suffix_or_skip(suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="the .safetensors format needs: pip install safetensors")
    return suffix


@pytest.fixture(params=SUFFIXES)
def suffix(request):
    return suffix_or_skip(request.param)


def write_npz(path, arch, tensors):
    np.savez(path, __architecture__=np.array(json.dumps(arch)), **tensors)


def arch_for(sizes, acts):
    return {"format_version": io.FORMAT_VERSION, "sizes": sizes, "activations": acts,
            "names": [f"dense_{i}" for i in range(len(acts))], "trainable": [True] * len(acts)}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_restores_weights_bit_for_bit(tmp_path, suffix, dtype):
    model = trained_model(dtype)
    path = tmp_path / f"model{suffix}"
    model.save(path)
    loaded = gb.load(path, device="cpu")
    assert loaded.dtype == model.dtype
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_round_trip_restores_the_architecture(tmp_path, suffix):
    model = trained_model()
    model.save(tmp_path / f"m{suffix}")
    loaded = gb.load(tmp_path / f"m{suffix}", device="cpu")
    assert [(l.in_features, l.out_features, l.activation, l.name) for l in loaded] == \
        [(l.in_features, l.out_features, l.activation, l.name) for l in model]


def test_round_trip_restores_frozen_flags(tmp_path, suffix):
    model = trained_model()
    model[0].freeze()
    model[2].freeze()
    model.save(tmp_path / f"m{suffix}")
    loaded = gb.load(tmp_path / f"m{suffix}", device="cpu")
    assert [layer.trainable for layer in loaded] == [False, True, False]


def test_round_trip_restores_a_frozen_bias_alone(tmp_path, suffix):
    """Parameter.trainable is per parameter: a layer whose bias alone is frozen comes back so."""
    model = trained_model()
    model[1].bias.trainable = False
    model.save(tmp_path / f"m{suffix}")
    header, _ = io.read_file(tmp_path / f"m{suffix}")
    assert header["trainable"] == [True, [True, False], True]
    loaded = gb.load(tmp_path / f"m{suffix}", device="cpu")
    assert [(layer.weight.trainable, layer.bias.trainable) for layer in loaded] == \
        [(True, True), (True, False), (True, True)]


@pytest.mark.parametrize("entry", ["yes", 1, [True], [True, 0], None])
def test_a_trainable_entry_that_is_not_flags_is_rejected(tmp_path, entry):
    path = tmp_path / "m.npz"
    arch = {**arch_for([3, 4], ["relu"]), "trainable": [entry]}
    write_npz(path, arch, {"layers.0.weight": np.ones((3, 4)), "layers.0.bias": np.ones(4)})
    with pytest.raises(ValueError, match=r"the header's trainable\[0\] must be true, false or \[weight's, bias's\]"):
        gb.load(path, device="cpu")


def test_a_loaded_model_predicts_exactly_what_the_saved_one_did(tmp_path, suffix):
    model = trained_model()
    x = np.random.default_rng(1).normal(size=(17, 4)).astype(np.float32)
    model.save(tmp_path / f"m{suffix}")
    np.testing.assert_array_equal(gb.load(tmp_path / f"m{suffix}", device="cpu").predict(x), model.predict(x))


def stacked_dropouts(count):
    """A model of one Dense layer with ``count`` Dropouts stacked below it (a model file holds 8)."""
    return gb.Sequential([*(gb.Dropout(0.1) for _ in range(count)), gb.Dense(3, 2)], device="cpu")


def test_a_model_with_as_many_stacked_dropouts_as_a_file_holds_round_trips(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    stacked_dropouts(io.max_dropouts(1)).save(path)
    assert len(gb.load(path, device="cpu")) == io.max_dropouts(1) + 1


def test_a_model_with_more_stacked_dropouts_than_a_file_holds_is_refused_before_writing(tmp_path, suffix):
    """Loading refuses a header that lists more (a forged one could list millions, each a layer to
    build), so saving does: every file written loads."""
    with pytest.raises(ValueError, match=r"^model: 9 Dropout layers for 1 Dense layers; a model file holds at most 8 "
                                         r"\(4 stacked in each place, .*merge stacked ones into one Dropout"):
        stacked_dropouts(9).save(tmp_path / f"m{suffix}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("backend", ["numba"], indirect=True)
def test_a_float64_file_loaded_on_a_float32_backend_names_the_callers_argument(tmp_path, suffix, backend):
    """The file is fine; the backend chosen cannot compute in its dtype. The error says which
    argument to change, and how, before anything is built."""
    path = tmp_path / f"m{suffix}"
    trained_model("float64").save(path)
    with pytest.raises(ValueError, match=r"^backend: the 'numba' backend computes in float32 only, and .*m\.\w+ holds "
                                         r"float64 weights; load it with device='cpu' \(the NumPy backend computes "
                                         r"in float64\)$"):
        gb.load(path, backend=backend)


def test_npz_files_load_without_pickle_under_documented_keys(tmp_path):
    trained_model().save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["__architecture__", "layers.0.bias", "layers.0.weight", "layers.1.bias",
                                      "layers.1.weight", "layers.2.bias", "layers.2.weight"]
        assert data["layers.1.weight"].shape == (6, 5)
        assert json.loads(str(data["__architecture__"]))["activations"] == ["gelu", "tanh", "sigmoid"]


def test_the_same_seed_gives_the_same_training_run():
    first, second = trained_model(), trained_model()
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_save_overwrites_an_existing_file(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    gb.Sequential([gb.Dense(2, 2)], device="cpu").save(path)
    model = trained_model()
    model.save(path)
    assert len(gb.load(path, device="cpu")) == 3


@pytest.mark.parametrize("file_suffix", [*SUFFIXES, ".onnx"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_before_anything_is_written(tmp_path, file_suffix, value):
    """Loading refuses a file holding NaN or inf (gb.load, the ONNX reader too), so saving does: every
    file written loads, and a diverged model does not replace the good file at its path."""
    if file_suffix == ".onnx":
        pytest.importorskip("onnx", reason="writing .onnx needs: pip install onnx")
    path = tmp_path / f"m{suffix_or_skip(file_suffix)}"
    model = trained_model()
    model.save(path)
    written = path.read_bytes()
    model[1].weight.data[2, 3] = value
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"^model: 'layers\.1\.weight' contains NaN or inf, which a gpubp file "
                                         r"cannot hold"):
        model.save(path)
    assert path.read_bytes() == written
    assert os.listdir(tmp_path) == [path.name]
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, model.get_weights()))


def test_save_creates_missing_folders(tmp_path, suffix):
    path = tmp_path / "a" / "b" / f"m{suffix}"
    trained_model().save(path)
    assert path.exists()


# ----------------------------------------------------------------------------- atomic writes


def test_save_leaves_no_temporary_files(tmp_path, suffix):
    trained_model().save(tmp_path / f"m{suffix}")
    assert os.listdir(tmp_path) == [f"m{suffix}"]


def test_a_write_that_fails_midway_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    original = trained_model()
    original.save(path)
    before = path.read_bytes()

    def fail_midway(file, **arrays):
        file.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        gb.Sequential([gb.Dense(2, 2)], device="cpu").save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]


def test_a_failing_rename_leaves_the_existing_file_intact(tmp_path, suffix, monkeypatch):
    path = tmp_path / f"m{suffix}"
    trained_model().save(path)
    before = path.read_bytes()

    def refuse(src, dst):
        raise PermissionError("read-only folder")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(PermissionError):
        gb.Sequential([gb.Dense(2, 2)], device="cpu").save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


posix_only = pytest.mark.skipif(os.name != "posix", reason="permission bits are POSIX's")


@posix_only
@pytest.mark.parametrize("where", ["beside_the_link", "in_another_folder"])
def test_saving_to_a_symlink_writes_through_it(tmp_path, suffix, where):
    """As open(path, "wb") and np.save write through a link (latest.safetensors -> run-7.safetensors):
    the file it points to holds the new model, the link stays, and the temporary file was beside
    that file (a rename within its folder), gone after."""
    folder = tmp_path / "runs" if where == "in_another_folder" else tmp_path
    folder.mkdir(exist_ok=True)
    target, link = folder / f"run-7{suffix}", tmp_path / f"latest{suffix}"
    trained_model().save(target)
    os.symlink(os.path.relpath(target, tmp_path), link)
    new = trained_model()
    new.set_weights([w + 1 for w in new.get_weights()])
    new.save(link)
    assert link.is_symlink()
    for saved, loaded in zip(new.get_weights(), gb.load(target, device="cpu").get_weights()):
        np.testing.assert_array_equal(saved, loaded)
    assert sorted(tmp_path.rglob("*")) == sorted({link, target, folder} - {tmp_path})


@pytest.fixture
def umask_022():
    """The common umask 0o022 (new files 0o644) for one test; the process's own is restored after it."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@posix_only
def test_a_new_file_gets_the_permissions_open_gives_one(tmp_path, suffix, umask_022):
    """0o666 less the umask, as np.save and open() give, not the 0o600 of a temporary file."""
    path, reference = tmp_path / f"m{suffix}", tmp_path / "made_by_open"
    reference.touch()
    trained_model().save(path)
    assert mode(path) == mode(reference) == 0o644


@posix_only
@pytest.mark.parametrize("permissions", [0o664, 0o640, 0o444], ids=oct)
def test_overwriting_a_file_keeps_its_permissions(tmp_path, suffix, umask_022, permissions):
    path = tmp_path / f"m{suffix}"
    path.touch()
    path.chmod(permissions)
    trained_model().save(path)
    assert mode(path) == permissions


@pytest.mark.parametrize("value", [float("nan"), float("inf"), np.float32("-inf")], ids=["nan", "inf", "float32_-inf"])
def test_a_header_that_is_not_plain_json_is_refused_before_anything_is_written(tmp_path, suffix, value):
    """gpubp's own headers are plain JSON (``allow_nan=False``): a NaN that slipped in is an error,
    not a bare NaN token that strict JSON readers refuse."""
    path = tmp_path / f"m{suffix}"
    header, tensors = io.model_contents(trained_model())
    with pytest.raises(ValueError, match=r"^header: not plain JSON \("):
        io.write_file(path, {**header, "extra": [value]}, tensors, allow_nan=False)
    assert os.listdir(tmp_path) == []


def longest_name(folder, suffix):
    """A file name as long as the filesystem of ``folder`` allows, ending in ``suffix``."""
    limit = os.pathconf(folder, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    return "m" * (limit - len(suffix)) + suffix


WRITERS = {
    "save": lambda model, path: model.save(path),
    "save_checkpoint": lambda model, path: gb.checkpoint.save_checkpoint(path, model, gb.optim.SGD(model), epoch=1),
    "model_checkpoint": lambda model, path: model.fit(np.ones((4, 4), np.float32), np.zeros((4, 3), np.float32),
                                                      loss="mse", optimizer="sgd", epochs=1, verbose=0,
                                                      callbacks=[gb.ModelCheckpoint(path)]),
}


@pytest.mark.parametrize("write", WRITERS.values(), ids=WRITERS.keys())
def test_a_file_name_as_long_as_the_filesystem_allows_is_written_atomically(tmp_path, suffix, write):
    """The temporary file's name is as long for any target, so it fits wherever the target's does."""
    path = tmp_path / longest_name(tmp_path, suffix)
    path.write_bytes(b"an older file")  # the filesystem takes the name
    model = trained_model()
    write(model, path)
    assert os.listdir(tmp_path) == [path.name]
    for saved, loaded in zip(model.get_weights(), gb.load(path, device="cpu").get_weights()):
        np.testing.assert_array_equal(saved, loaded)


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@posix_only
def test_a_save_clears_the_leftovers_of_dead_writers_of_its_own_file_only(tmp_path, monkeypatch, dead_pid):
    """A killed writer's temporary file goes at the next save of the same file (the pid in its name
    is gone); a live writer's, and those of other files beside it, stay."""
    long, short = tmp_path / longest_name(tmp_path, ".npz"), tmp_path / "m.npz"

    def leftover(path, pid):
        with monkeypatch.context() as patch:
            patch.setattr(io.os, "getpid", lambda: pid)
            fd, tmp = io._new_temp(path)
        os.close(fd)
        return tmp.name

    long_dead, long_live = leftover(long, dead_pid), leftover(long, os.getpid())
    short_dead = leftover(short, dead_pid)
    # What a gpubp version before the hashed names left behind.
    short_dead_old_form = f".{short.name}.{dead_pid}.{'0' * 16}.tmp"
    (tmp_path / short_dead_old_form).touch()
    assert sorted(os.listdir(tmp_path)) == sorted([long_dead, long_live, short_dead, short_dead_old_form])
    model = trained_model()
    model.save(short)
    assert sorted(os.listdir(tmp_path)) == sorted([short.name, long_dead, long_live])
    model.save(long)
    assert sorted(os.listdir(tmp_path)) == sorted([short.name, long.name, long_live])


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"),
                    reason="process start times come from Linux's /proc")
def test_a_save_clears_the_leftover_of_a_killed_writer_whose_pid_this_process_has_now(tmp_path):
    """A trainer killed mid-save and started again with the same pid (a container's PID 1, restarted
    after an OOM kill): its leftover was written before this process started, so it is the killed
    writer's; one written since (another thread's save, under way) stays."""
    path = tmp_path / "m.safetensors"
    fd, earlier = io._new_temp(path)
    os.write(fd, b"half a file")
    os.close(fd)
    os.utime(earlier, (0, 0))  # 1970: before this process started
    fd, under_way = io._new_temp(path)
    os.close(fd)
    trained_model().save(path)
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, under_way.name])


def test_saves_from_several_threads_at_once_keep_each_others_temporary_files(tmp_path):
    """Each thread's temporary file is this live process's, written after it started: no save
    removes another's before its rename."""
    path, model, failures = tmp_path / "m.npz", trained_model(), []

    def save_repeatedly():
        try:
            for _ in range(20):
                model.save(path)
        except Exception as exc:  # a thread's failure is this test's finding, not the thread's to raise
            failures.append(exc)

    threads = [threading.Thread(target=save_repeatedly) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert os.listdir(tmp_path) == [path.name]


# ----------------------------------------------------------------------------- bad files


def test_a_missing_weight_is_a_value_error_naming_the_key(tmp_path):
    path = tmp_path / "m.npz"
    write_npz(path, arch_for([3, 4, 2], ["relu", "identity"]),
              {"layers.0.weight": np.ones((3, 4)), "layers.0.bias": np.ones(4), "layers.1.weight": np.ones((4, 2))})
    with pytest.raises(ValueError, match="missing key 'layers.1.bias'"):
        gb.load(path, device="cpu")


def test_a_weight_of_the_wrong_shape_is_a_value_error_naming_both_shapes(tmp_path):
    path = tmp_path / "m.npz"
    write_npz(path, arch_for([3, 4], ["relu"]), {"layers.0.weight": np.ones((4, 3)), "layers.0.bias": np.ones(4)})
    with pytest.raises(ValueError, match=r"'layers.0.weight' has shape \(4, 3\), expected \(3, 4\)"):
        gb.load(path, device="cpu")


def test_an_unexpected_key_is_a_value_error(tmp_path):
    path = tmp_path / "m.npz"
    write_npz(path, arch_for([3, 4], ["relu"]),
              {"layers.0.weight": np.ones((3, 4)), "layers.0.bias": np.ones(4), "layers.1.weight": np.ones(2)})
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.1.weight'\]"):
        gb.load(path, device="cpu")


def test_an_npz_without_an_architecture_is_not_a_gpubp_file(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, w=np.ones(3))
    with pytest.raises(ValueError, match="not a gpubp model file"):
        gb.load(path, device="cpu")


def test_an_unknown_format_version_is_rejected(tmp_path):
    path = tmp_path / "m.npz"
    arch = {**arch_for([3, 4], ["relu"]), "format_version": 99}
    write_npz(path, arch, {"layers.0.weight": np.ones((3, 4)), "layers.0.bias": np.ones(4)})
    with pytest.raises(ValueError, match=f"format version 99, expected {io.FORMAT_VERSION}"):
        gb.load(path, device="cpu")


def test_a_safetensors_file_with_a_wrong_shape_is_a_value_error(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="the .safetensors format needs: pip install safetensors")
    path = tmp_path / "m.safetensors"
    arch = arch_for([3, 4], ["relu"])
    st.save_file({"layers.0.weight": np.ones((3, 5), np.float32), "layers.0.bias": np.ones(4, np.float32)},
                 str(path), metadata={"gpubp": json.dumps(arch)})
    with pytest.raises(ValueError, match=r"'layers.0.weight' has shape \(3, 5\), expected \(3, 4\)"):
        gb.load(path, device="cpu")


def test_a_safetensors_file_without_gpubp_metadata_is_not_a_gpubp_file(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="the .safetensors format needs: pip install safetensors")
    path = tmp_path / "m.safetensors"
    st.save_file({"layers.0.weight": np.ones((3, 4), np.float32)}, str(path))
    with pytest.raises(ValueError, match="no 'gpubp' metadata"):
        gb.load(path, device="cpu")


def test_an_unknown_suffix_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"path: expected a file ending in .npz, .safetensors or .onnx, got '.*m.pt'"):
        trained_model().save(tmp_path / "m.pt")


@pytest.mark.parametrize("call, found", [
    (lambda: gb.load(None), "NoneType"),
    (lambda: gb.load(b"m.npz"), "bytes"),
    (lambda: gb.Sequential([gb.Dense(2, 1)], device="cpu").save(123), "int"),
    (lambda: gb.load_checkpoint(BytesIO(), device="cpu"), "BytesIO"),
    (lambda: gb.load_checkpoint(b"run.npz", device="cpu"), "bytes"),
], ids=["load None", "load bytes", "save int", "load_checkpoint BytesIO", "load_checkpoint bytes"])
def test_a_path_that_is_no_path_is_a_type_error_naming_it(call, found):
    with pytest.raises(TypeError, match=f"path: expected a str or os.PathLike, got {found}"):
        call()


def test_loading_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        gb.load(tmp_path / "absent.npz")
