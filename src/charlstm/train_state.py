"""What an exact resume needs beyond the weights, as safetensors tensors plus JSON scalars.

Optimiser moments, random-number-generator states and the recurrent state carried between
batches all become named tensors in the checkpoint (no pickle anywhere); their scalar settings
(optimiser hyper-parameters, generator positions) go into the JSON metadata. Everything read
back is checked against the model it is restored into.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from .errors import CharLSTMError

OPTIM_PREFIX = "optim."
RNG_TORCH = "rng.torch"
RNG_NUMPY = "rng.numpy"
RNG_PYTHON = "rng.python"
CARRY_PREFIX = "carry."


# ----------------------------------------------------------------------- optimiser


def pack_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-parameter state as tensors ``optim.<index>.<name>``; param groups as JSON."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{OPTIM_PREFIX}{index}.{name}"] = tensor.detach().cpu().clone()
    groups = [{k: v for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"type": type(optimizer).__name__, "param_groups": groups}


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what ``pack_optimizer`` wrote, after checking it fits this optimiser's parameters."""
    if meta.get("type") != type(optimizer).__name__:
        raise CharLSTMError(f"the checkpoint's optimiser is {meta.get('type')}, this run uses "
                            f"{type(optimizer).__name__}: resume with the same --optimizer")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_groups = meta.get("param_groups", [])
    if [len(g.get("params", [])) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CharLSTMError("the checkpoint's optimiser state does not match this model's parameters")
    groups = [_checked_group(saved, current) for saved, current in zip(saved_groups, optimizer.param_groups)]
    per_param: dict[int, dict] = {}
    for key, tensor in tensors.items():
        if not key.startswith(OPTIM_PREFIX):
            continue
        index_text, _, name = key[len(OPTIM_PREFIX):].partition(".")
        if not index_text.isdigit() or int(index_text) >= len(params):
            raise CharLSTMError(f"optimiser state {key!r} names no parameter of this model")
        index = int(index_text)
        if (tensor.dim() and tensor.shape != params[index].shape) or not tensor.is_floating_point():
            raise CharLSTMError(f"optimiser state {key} is a {tensor.dtype} of shape {tuple(tensor.shape)}, "
                                f"the parameter a float of shape {tuple(params[index].shape)}")
        per_param.setdefault(index, {})[name] = tensor.to(params[index].device)
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise CharLSTMError(f"the checkpoint's optimiser state does not load ({err})") from None


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _checked_group(saved: dict, current: dict) -> dict:
    """A saved parameter group with every setting of the type this optimiser uses (a string
    learning rate would only fail at the first step, mid-run)."""
    group = {"params": saved["params"]}
    for key, now in current.items():
        if key == "params":
            continue
        if key in IMPLEMENTATION_KEYS:  # how this run computes the step, not a setting to restore
            group[key] = now
            continue
        value = saved.get(key, now)
        if isinstance(now, bool) or now is None or isinstance(now, str):
            ok = type(value) is type(now)
        elif isinstance(now, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(now, (tuple, list)):
            ok = (isinstance(value, (tuple, list)) and len(value) == len(now)
                  and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value))
            value = tuple(value) if ok else value
        else:
            ok, value = True, now
        if not ok:
            raise CharLSTMError(f"the checkpoint's optimiser setting {key} is {value!r}, not a valid value")
        group[key] = value
    return group


# ----------------------------------------------------------------------- random generators


def pack_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """torch's CPU generator (a uint8 tensor), numpy's and Python's global generators."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    tensors = {
        RNG_TORCH: torch.get_rng_state().clone(),
        RNG_NUMPY: torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        RNG_PYTHON: torch.tensor(py_state, dtype=torch.int64),
    }
    meta = {"numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                      "cached_gaussian": float(np_gauss)},
            "python": {"version": py_version, "gauss_next": py_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state.clone()
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Set the generators to the saved states; a malformed state is one clear error."""
    try:
        _restore_rng(tensors, meta)
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError, IndexError) as err:
        raise CharLSTMError(f"the checkpoint's random-generator states are malformed ({err})") from None


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if RNG_TORCH in tensors:
        state = tensors[RNG_TORCH]
        if state.dtype != torch.uint8 or state.dim() != 1:
            raise CharLSTMError("the checkpoint's torch RNG state is not a uint8 vector")
        torch.set_rng_state(state.clone())
    numpy_meta = meta.get("numpy")
    if RNG_NUMPY in tensors and numpy_meta:
        keys = tensors[RNG_NUMPY].numpy().astype(np.uint32)
        np.random.set_state((numpy_meta["name"], keys, numpy_meta["pos"], numpy_meta["has_gauss"],
                             numpy_meta["cached_gaussian"]))
    python_meta = meta.get("python")
    if RNG_PYTHON in tensors and python_meta:
        values = tuple(int(v) for v in tensors[RNG_PYTHON].tolist())
        random.setstate((python_meta["version"], values, python_meta["gauss_next"]))
    cuda_states = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda_states][:torch.cuda.device_count()])


# ----------------------------------------------------------------------- carried state


def pack_carry(state) -> dict[str, torch.Tensor]:
    """The recurrent state carried into the next batch (``None`` between epochs)."""
    if state is None:
        return {}
    tensors = {}
    for layer, (h, c) in enumerate(state):
        tensors[f"{CARRY_PREFIX}{layer}.h"] = h.detach().cpu().clone()
        tensors[f"{CARRY_PREFIX}{layer}.c"] = c.detach().cpu().clone()
    return tensors


def unpack_carry(tensors: dict[str, torch.Tensor], layers: int, batch_size: int, units: int,
                 device: torch.device):
    keys = [k for k in tensors if k.startswith(CARRY_PREFIX)]
    if not keys:
        return None
    state = []
    for layer in range(layers):
        pair = []
        for part in ("h", "c"):
            tensor = tensors.get(f"{CARRY_PREFIX}{layer}.{part}")
            if tensor is None or tuple(tensor.shape) != (1, batch_size, units) or not tensor.is_floating_point():
                raise CharLSTMError(f"the checkpoint's carried state does not fit {layers} layers of "
                                    f"{units} units and batch size {batch_size}: resume with the same "
                                    f"--batch-size")
            pair.append(tensor.to(device))
        state.append((pair[0], pair[1]))
    return state
