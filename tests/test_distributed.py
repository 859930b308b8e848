"""Training from prepared data, and data-parallel training with torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from charlstm.corpus import Corpus
from charlstm.errors import CharLSTMError
from charlstm.prepare import PrepareConfig, PreparedData, prepare
from charlstm.train import fit
from conftest import REPO

TINY = ["--layers", "1", "--units", "32", "--embedding-dim", "8", "--bptt", "25", "--batch-size", "8",
        "--threads", "1", "--precision", "fp32", "--seed", "3", "--val-chars", "3000"]
NO_DROPOUT = ["--dropout", "0", "--weight-drop", "0", "--input-dropout", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, pg11):
    """Two documents (the start and the end of Alice), prepared: every document's end is validation."""
    text = Corpus.from_files(pg11).text
    folder = tmp_path_factory.mktemp("docs")
    (folder / "a.txt").write_text(text[:20000], encoding="utf-8")
    (folder / "b.txt").write_text(text[-20000:], encoding="utf-8")
    out = tmp_path_factory.mktemp("prepared")
    prepare(PrepareConfig(inputs=(str(folder),), output_dir=out, val_fraction=0.1), progress=False)
    return out


def _cli(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, "-m", "charlstm", "train", "--no-progress", *args], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run


def _weights(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


def _val_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows]


def test_prepared_data_is_memory_mapped_and_resumes_exactly_mid_epoch(data_dir, tmp_path):
    quiet = dict(log=lambda *_: None, progress=False, layers=1, units=32, embedding_dim=8, bptt=25,
                 batch_size=8, threads=1, precision="fp32", seed=5, epochs=2, eval_every=70, val_chars=2000)
    whole = fit(data=data_dir, output_dir=str(tmp_path / "whole"), **quiet)
    first = fit(data=data_dir, output_dir=str(tmp_path / "parts"), max_steps=7, **quiet)  # stops mid-epoch 1
    assert not first.interrupted and first.resume_path.name == "last.safetensors"
    rest = fit(data=data_dir, resume=first.resume_path, output_dir=str(tmp_path / "parts"), max_steps=0, **quiet)
    assert [r.val_loss for r in rest.history] == [r.val_loss for r in whole.history]
    assert [r.batch for r in whole.history if r.batch] and whole.history[-1].batch == 0  # --eval-every rows
    for key, value in _weights(tmp_path / "whole" / "last.safetensors").items():
        assert torch.equal(value, _weights(tmp_path / "parts" / "last.safetensors")[key]), key
    data = PreparedData.open(data_dir)
    assert isinstance(data.train_ids, np.memmap)
    assert whole.trained.training.data.val_characters == 2000  # the fixed --val-chars part
    assert whole.trained.training.data.sources == data.sources


@pytest.mark.parametrize("gradient_sum, how", [("auto", "(DDP, gloo, gradients summed in shared memory)"),
                                               ("gloo", "(DDP, gloo)")])
def test_two_processes_compute_what_one_process_computes(data_dir, tmp_path, gradient_sum, how):
    """Without dropout, 2 ranks x 4 streams take the same steps as 1 process x 8 streams."""
    common = ["--data", str(data_dir), *TINY, *NO_DROPOUT, "--max-steps", "6", "--eval-every", "3"]
    _cli([*common, "-o", str(tmp_path / "one")])
    two = _cli([*common, "--gradient-sum", gradient_sum, "-o", str(tmp_path / "two")], processes=2)
    assert f"processes: 2 {how}" in two.stdout  # one machine: shared memory unless gloo is asked for
    assert two.stdout.count("Total Vocab") == 1  # rank 0 prints
    a, b = load_file(str(tmp_path / "one" / "last.safetensors")), load_file(str(tmp_path / "two" / "last.safetensors"))
    for key in a:
        if key.startswith(("model.", "carry.")):  # the 2 ranks' carried states form the 8-stream batch
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert np.allclose(_val_losses(tmp_path / "two"), _val_losses(tmp_path / "one"), rtol=1e-5)


@pytest.mark.slow
def test_ddp_with_weight_drop_and_variational_dropout_resumes_exactly(data_dir, tmp_path):
    """The default recipe's regularisation under DDP; a same-world-size resume continues exactly."""
    common = ["--data", str(data_dir), *TINY, "--dropout", "0.3", "--weight-drop", "0.3", "--variational",
              "--epochs", "2"]
    _cli([*common, "--max-steps", "8", "-o", str(tmp_path / "whole")], processes=2)
    _cli([*common, "--max-steps", "5", "-o", str(tmp_path / "parts")], processes=2)
    _cli([*common, "--max-steps", "8", "--resume", str(tmp_path / "parts" / "last.safetensors"),
          "-o", str(tmp_path / "parts")], processes=2)
    whole, parts = tmp_path / "whole" / "last.safetensors", tmp_path / "parts" / "last.safetensors"
    for key, value in _weights(whole).items():
        assert torch.equal(value, _weights(parts)[key]), key
    trained = load_file(str(whole))
    assert any(k.startswith("rank1.") for k in trained)  # rank 1's random generators are kept


def test_huge_prepared_data_refuses_the_batchings_that_index_every_example(data_dir, tmp_path, monkeypatch):
    train_module = importlib.import_module("charlstm.train")  # the package's `train` is the function
    monkeypatch.setattr(train_module, "MAX_INDEXED_TEXT", 1000)
    with pytest.raises(CharLSTMError, match="use --batching streams"):
        fit(data=data_dir, preset="tutorial-small", output_dir=str(tmp_path), log=lambda *_: None, progress=False)


def test_a_long_prepared_validation_text_is_scored_in_a_fixed_part(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("charlstm.train"), "PREPARED_VAL_CHARS", 1000)
    lines = []
    result = fit(data=data_dir, output_dir=str(tmp_path), log=lines.append, progress=False, layers=1, units=16,
                 embedding_dim=8, batch_size=4, bptt=20, max_steps=1, eval_every=1, threads=1)
    assert result.trained.training.data.val_characters == 1000
    assert any("--val-chars N to change" in line for line in lines)
