"""What a ``MODEL`` argument of the CLI names, turned into a module and example inputs.

Three kinds, told apart by their look:

- ``path/to/model.pt2``: a saved ``torch.export`` program (ringify's own or anyone's); its stored
  example inputs are the example, re-drawn at the requested sequence length where ringify saved a spec.
- ``path/to/dir/`` holding ``config.json`` and safetensors weights: a HuggingFace-style checkpoint,
  built offline with the architecture its config names; inputs are random token ids (and labels).
- ``package.module:factory``: a function returning a module, ``(module, args)``,
  ``(module, args, kwargs)`` or ``(module, kwargs)``; with a module alone, a model with
  ``config.vocab_size`` gets random token ids.

Nothing here unpickles: ``.pt2`` files go through :func:`ringify.saved.load_program`, which checks
that every pickle in the archive holds only tensors and containers unless the user consents.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pathlib
import sys
from dataclasses import dataclass, field

import torch

from .errors import UnsupportedModelError


class ModelSourceError(ValueError):
    """The MODEL argument names nothing ringify can load; the message says what was expected."""


@dataclass
class ModelSource:
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    name: str
    seq_dim: int = 1
    inputs: list[dict] = field(default_factory=list)  # how to draw fresh inputs (see input_spec)


def input_spec(args, kwargs, seq_dim: int, int_high: int | None = None) -> list[dict]:
    """Enough to draw fresh inputs of another sequence length: name, shape, dtype, integer range."""
    named = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    tensors = [v for _, v in named if isinstance(v, torch.Tensor) and v.dim() > seq_dim]
    seq_len = tensors[0].size(seq_dim) if tensors else None
    spec = []
    for name, value in named:
        if isinstance(value, torch.Tensor):
            entry = {"name": name, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                     "sequence": value.dim() > seq_dim and value.size(seq_dim) == seq_len}
            if not value.is_floating_point():
                valid = value[value >= 0]
                entry["high"] = int_high or (int(valid.max()) + 1 if valid.numel() else 2)
            spec.append(entry)
        else:
            spec.append({"name": name, "constant": value})
    return spec


def draw_inputs(spec: list[dict], seq_len: int, seq_dim: int, seed: int) -> tuple[tuple, dict]:
    """Fresh random inputs following ``spec`` with ``seq_len`` tokens (the same on every rank for one seed)."""
    g = torch.Generator().manual_seed(seed)
    args, kwargs = [], {}
    for entry in spec:
        if "constant" in entry:
            value = entry["constant"]
        else:
            shape = list(entry["shape"])
            if entry.get("sequence", len(shape) > seq_dim):
                shape[seq_dim] = seq_len
            dtype = getattr(torch, entry["dtype"])
            if dtype.is_floating_point:
                value = torch.randn(shape, generator=g, dtype=dtype)
            elif dtype == torch.bool:
                value = torch.ones(shape, dtype=torch.bool)
            else:
                value = torch.randint(0, entry.get("high", 2), shape, generator=g, dtype=dtype)
        if entry["name"].startswith("arg") and entry["name"][3:].isdigit():
            args.append(value)
        else:
            kwargs[entry["name"]] = value
    return tuple(args), kwargs


def _token_inputs(model: torch.nn.Module, vocab: int, seq_len: int, seed: int) -> dict:
    """``input_ids`` (and ``labels`` when forward takes them: a loss to train on) for a token model."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    params = inspect.signature(model.forward).parameters
    kwargs = {"input_ids": ids}
    if "labels" in params:
        kwargs["labels"] = ids.clone()
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def from_hf_directory(path: pathlib.Path, seq_len: int, seed: int, trust_remote_code: bool) -> ModelSource:
    """A HuggingFace-style checkpoint directory, offline: the class its config names, its safetensors weights."""
    try:
        import transformers
    except ImportError as err:
        raise ModelSourceError("a model directory needs the transformers package: pip install transformers") from err
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ModelSourceError(f"{config_path} maps to custom code (auto_map); pass --trust-remote-code to run it")
    if not list(path.glob("*.safetensors")):
        raise ModelSourceError(f"{path} has a config.json but no *.safetensors weights (only safetensors are loaded: "
                               "they cannot run code)")
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ModelSourceError(f"{config_path} names no architecture transformers knows ({names or 'none'}); "
                               "add \"architectures\": [\"LlamaForCausalLM\"]-style to it")
    model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                trust_remote_code=trust_remote_code).eval()
    kwargs = _token_inputs(model, model.config.vocab_size, seq_len, seed)
    return ModelSource(model, (), kwargs, cls.__name__, 1, input_spec((), kwargs, 1, model.config.vocab_size))


def from_factory(target: str, seq_len: int | None, seed: int) -> ModelSource:
    """``package.module:factory``: the user's own code, imported as ``python -m`` would."""
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:  # like `python -m` (and uvicorn): modules next to the caller import
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ModelSourceError(f"cannot import {target}: {err}") from err
    made = factory()
    args, kwargs = (), {}
    if isinstance(made, tuple):
        model, *rest = made
        for part in rest:
            if isinstance(part, dict):
                kwargs = dict(part)
            else:
                args = tuple(part) if isinstance(part, (tuple, list)) else (part,)
    else:
        model = made
    if not isinstance(model, torch.nn.Module):
        raise ModelSourceError(f"{target}() returned {type(model).__name__}, not a torch.nn.Module "
                               "(or a (module, args[, kwargs]) tuple)")
    if not args and not kwargs:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or getattr(model, "vocab", None)
        if vocab is None:
            raise ModelSourceError(f"{target}() returned a model without example inputs; return "
                                   "(model, example_args) or (model, example_args, example_kwargs)")
        kwargs = _token_inputs(model, vocab, seq_len or 128, seed)
        params = list(inspect.signature(model.forward).parameters)
        if "input_ids" not in params:  # nanoGPT-style forward(idx, targets)
            ids = kwargs["input_ids"]
            kwargs = {params[0]: ids, **({"targets": ids.clone()} if "targets" in params else {})}
        return ModelSource(model, (), kwargs, type(model).__name__, 1, input_spec((), kwargs, 1, int(vocab)))
    spec = input_spec(args, kwargs, 1)
    if seq_len is not None:  # the factory's own inputs, re-drawn at the requested length
        args, kwargs = draw_inputs(spec, seq_len, 1, seed)
    return ModelSource(model, args, kwargs, type(model).__name__, 1, spec)


def resolve(target: str, *, seq_len: int | None = None, seed: int = 0, trust_remote_code: bool = False,
            seq_dim: int = 1) -> ModelSource:
    """The model and example inputs ``target`` names (see the module docstring)."""
    path = pathlib.Path(target)
    if target.endswith(".pt2") or path.is_file():
        if not path.is_file():
            raise ModelSourceError(f"no such file: {target}")
        from .saved import load_program

        program, meta = load_program(path, trust_remote_code=trust_remote_code)
        seq_dim = meta.get("seq_dim", seq_dim)
        if meta.get("inputs"):
            length = seq_len or meta.get("seq_len", 0)
            args, kwargs = draw_inputs(meta["inputs"], length, seq_dim, seed)
            spec = meta["inputs"]
        else:
            if program.example_inputs is None:
                raise ModelSourceError(f"{target} holds no example inputs; re-export it with example inputs saved")
            args, kwargs = program.example_inputs
            spec = input_spec(args, kwargs, seq_dim)
            if seq_len:
                args, kwargs = draw_inputs(spec, seq_len, seq_dim, seed)
        module = program.module()
        module.ringify_program, module.ringify_meta = program, meta
        return ModelSource(module, tuple(args), dict(kwargs), meta.get("model", path.stem), seq_dim, spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{target} is a directory without config.json (expected a HuggingFace-style "
                                   "checkpoint: config.json + *.safetensors)")
        return from_hf_directory(path, seq_len or 128, seed, trust_remote_code)
    if ":" in target and not path.exists():
        return from_factory(target, seq_len, seed)
    raise ModelSourceError(f"{target}: no such file or directory (MODEL is a .pt2 file, a model directory with "
                           "config.json, or package.module:factory)")


__all__ = ["ModelSource", "ModelSourceError", "UnsupportedModelError", "draw_inputs", "input_spec", "resolve"]
