"""Hostile and broken files (issue 15, part 2): every one refused in one line that names the file,
nothing executed, nothing allocated because a header claims it. The benchmark
(benchmarks/reliability.py) runs the full sets; these are samples of the same generators."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import hostile
from charlstm import checkpoint
from charlstm.cli import main
from charlstm.keras_import import import_keras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refused_all(cases, load, folder, name):
    outcomes = {}
    for label, data in cases:
        path = folder / name
        path.write_bytes(data)
        outcomes[label] = hostile.load_outcome(load, path)
    bad = {label: out for label, out in outcomes.items() if out[0] != "refused"}
    assert not bad, bad
    return outcomes


def test_crafted_checkpoints_are_refused_in_one_line(tmp_path):
    base = hostile.checkpoint_bytes(hostile.tiny_trained(with_resume=True))
    outcomes = _refused_all(hostile.crafted_checkpoints(base), checkpoint.load, tmp_path, "c.safetensors")
    assert "checksum" in outcomes["a byte of the weights changed"][1]
    assert "NaN or infinite" in outcomes["a weight of NaN"][1]
    assert "version" in outcomes["version a string"][1]
    assert "normalization" in outcomes["normalization a list"][1]


def test_every_truncation_and_bit_flips_are_refused(tmp_path):
    base = hostile.checkpoint_bytes()
    cases = list(hostile.truncations(base, step=3)) + list(hostile.bit_flips(base, 200))
    _refused_all(cases, checkpoint.load, tmp_path, "c.safetensors")


def test_hostile_checkpoint_costs_no_memory_and_one_line(tmp_path):
    """A 10^12-element tensor and a 2^60-byte header claimed: the CLI refuses without allocating."""
    cases = dict(hostile.crafted_checkpoints(hostile.checkpoint_bytes()))
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src")}
    imports = subprocess.run([sys.executable, "-c", "import resource, charlstm.cli; "
                              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                             capture_output=True, text=True, env=env, timeout=120)
    baseline_kib = int(imports.stdout)
    for label in ("a 10^12-element tensor claimed", "2^60-byte header claimed", "100 MB of metadata"):
        path = tmp_path / "evil.safetensors"
        path.write_bytes(cases[label])
        probe = ("import resource, sys; from charlstm.cli import main; code = main(['info', sys.argv[1]]); "
                 "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")
        done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.path.join(REPO, "src")}, timeout=120)
        error, peak_kib = done.stderr.splitlines()
        assert done.returncode == 2 and error.startswith("charlstm: error: ") and str(path) in error, done.stderr
        assert int(peak_kib) < baseline_kib + 100 * 1024, (label, peak_kib, baseline_kib)  # nothing allocated


def test_hostile_keras_files_are_refused(tmp_path, keras_checkpoint, keras_text):
    real = keras_checkpoint.read_bytes()
    outcomes = _refused_all(hostile.hostile_keras_files(real), lambda p: import_keras(p, keras_text),
                            tmp_path, "k.hdf5")
    assert "implausible shape" in outcomes["a kernel of 10^12 elements (chunked, never written)"][1]


@pytest.mark.parametrize("label, data", list(hostile.hostile_texts()))
def test_hostile_texts_train_or_are_refused_in_one_line(tmp_path, capsys, label, data):
    path = tmp_path / "t.txt"
    path.write_bytes(data)
    code = main(["train", "--text", str(path), "--units", "8", "--layers", "1", "--embedding-dim", "4",
                 "--batch-size", "2", "--bptt", "8", "--epochs", "1", "--no-progress", "--time-budget", "5",
                 "-o", str(tmp_path / "out"), "--threads", "1", "--val-fraction", "0.2"])
    err = capsys.readouterr().err
    assert code in (0, 2), (label, code, err)
    if code == 2:
        assert err.startswith("charlstm: error: ") and err.count("\n") == 1, (label, err)


def test_unreadable_inputs_are_one_line(tmp_path, capsys):
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    long_name = tmp_path / ("x" * 300 + ".txt")
    cases = {"a folder": (tmp_path, "folder"), "a FIFO": (fifo, "not a regular file"),
             "a symlink loop": (loop, "cannot read"), "an over-long name": (long_name, "cannot read"),
             "missing": (tmp_path / "gone.txt", "no such")}
    for label, (path, fragment) in cases.items():
        for argv in (["train", "--text", str(path)], ["info", str(path)], ["generate", str(path)],
                     ["import-keras", str(path), "--text", str(path), "-o", str(tmp_path / "k.safetensors")]):
            assert main(argv) == 2, (label, argv)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and fragment in err, (label, argv, err)


def test_file_without_read_permission(tmp_path, capsys):
    """As root every file is readable, so the check runs with an unprivileged effective user."""
    secret = tmp_path / "secret.txt"
    secret.write_text("hello world " * 100)
    secret.chmod(0)
    for parent in (tmp_path, *tmp_path.parents):
        if parent == parent.parent:
            break
        parent.chmod(parent.stat().st_mode | 0o005)
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(65534)
    try:
        code = main(["train", "--text", str(secret)])
    finally:
        if as_root:
            os.seteuid(0)
    err = capsys.readouterr().err
    assert code == 2 and "permission" in err.lower() and err.count("\n") == 1, err
