"""Plans without weights: models built on the ``meta`` device, captured and costed on fake tensors.

``ringify report`` answers "how many devices for 1M tokens of my 8B model" without the 16 GB of weights:

- a HuggingFace-style directory that holds only ``config.json`` is built with the architecture its config
  names inside ``torch.device("meta")``: parameters and buffers have shapes and dtypes but no storage, so
  nothing is read from disk or allocated, whatever the model's size;
- a ``package.module:factory`` may build its model on ``meta`` itself (``with torch.device("meta"): ...``);
- the example inputs are moved to ``meta`` too, and everything after that runs on fake or meta tensors:
  ``torch.export`` traces on fake tensors anyway, the passes look at shapes, and the cost model's
  memory profile runs the graph under ``FakeTensorMode`` (``ringify.cost.profile_model``).

What cannot work on ``meta``: Python that reads tensor *values* while the model is built or traced
(``.item()``, ``.tolist()``, ``bool(tensor)``, a buffer read by the symbolic-trace fallback). Those fail
with a message that says so (:func:`explain_meta_failure`) and that real weights are needed for that model.
"""

from __future__ import annotations

import json
import pathlib

import torch
from torch.utils._pytree import tree_map

from .sources import ModelSource, ModelSourceError, _token_inputs, input_spec

__all__ = ["DTYPES", "config_dtype", "explain_meta_failure", "from_config_directory", "is_meta", "to_meta",
           "weightless_directory"]

#: ``--dtype`` names (HF configs write the same names, and ``bf16``-style shorthands)
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def weightless_directory(target: str) -> bool:
    """A directory with ``config.json`` and no ``*.safetensors``: planned on ``meta`` instead of refused."""
    path = pathlib.Path(target)
    return path.is_dir() and (path / "config.json").is_file() and not list(path.glob("*.safetensors"))


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``"bf16"`` -> ``torch.bfloat16``; None stays None."""
    if name is None:
        return None
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise ModelSourceError(f"unknown dtype {name!r}; one of: bfloat16, float16, float32")
    return DTYPES[key]


def config_dtype(config) -> torch.dtype | None:
    """The dtype a HF config names (``dtype`` in transformers 5, ``torch_dtype`` before), or None."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value != "auto":
            return parse_dtype(value)
    return None


def from_config_directory(path: pathlib.Path, seq_len: int, seed: int, trust_remote_code: bool,
                          dtype: torch.dtype | None = None) -> ModelSource:
    """The architecture ``path/config.json`` names, built on ``meta`` in ``dtype`` (default: the config's, else
    float32), with random token ids (and labels) of ``seq_len`` on ``meta``."""
    try:
        import transformers
    except ImportError as err:
        raise ModelSourceError("a model directory needs the transformers package: pip install transformers") from err
    path = pathlib.Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("auto_map") and not trust_remote_code:
        raise ModelSourceError(f"{path / 'config.json'} maps to custom code (auto_map); pass --trust-remote-code "
                               "to run it")
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    names = raw.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None and not raw.get("auto_map"):
        raise ModelSourceError(f"{path / 'config.json'} names no architecture transformers knows ({names or 'none'}); "
                               "add \"architectures\": [\"LlamaForCausalLM\"]-style to it")
    dtype = dtype or config_dtype(raw) or torch.float32
    try:
        with torch.device("meta"):
            if cls is None:
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=True)
            else:
                model = cls._from_config(config, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - e.g. init code that reads values
        name = cls.__name__ if cls is not None else type(config).__name__
        raise explain_meta_failure(name, err, "building it") or ModelSourceError(
            f"cannot build {name} from {path / 'config.json'}: {type(err).__name__}: {err}") from err
    model.eval()
    kwargs = _token_inputs(model, model.config.vocab_size, seq_len, seed)
    spec = input_spec((), kwargs, 1, model.config.vocab_size)
    return ModelSource(model, (), to_meta(kwargs), f"{type(model).__name__} (meta: config only)", 1, spec)


def is_meta(model: torch.nn.Module) -> bool:
    """Whether the model's parameters (or, without any, its buffers) live on ``meta``."""
    tensors = list(model.parameters()) or list(model.buffers())
    return bool(tensors) and all(t.is_meta for t in tensors)


def to_meta(tree):
    """Every tensor of a pytree (inputs) moved to ``meta``: shapes and dtypes kept, no storage."""
    return tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, tree)


def explain_meta_failure(name: str, err: BaseException, doing: str) -> ModelSourceError | None:
    """When a model on ``meta`` fails because it reads tensor values (the error names meta tensors): an error
    that says so and what to do. None for other failures (they are not about meta and keep their own message)."""
    chain, seen = [], err
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if not any("meta" in str(e).lower() for e in chain):
        return None
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return ModelSourceError(
        f"planning {name} without weights (on the meta device) failed while {doing}: {type(err).__name__}: {first}. "
        "Meta tensors have shapes but no values, so code that reads values (.item(), .tolist(), bool(tensor), a "
        "table of data) cannot run on them; plan it with its weights (a directory with *.safetensors, or a "
        "factory that builds on the CPU)")
