"""Saved models: ``ringify convert`` writes a ``.pt2``, ``ringify.load(path, mesh)`` runs it on any ring.

The file is a plain ``torch.export`` archive of the *unsharded* model, captured with a symbolic
sequence length, plus ``extra/ringify.json`` (how to call it, how to draw inputs, the report made at
conversion). The ring rewrite happens at load time for the world size of the mesh it meets, so one
file serves 1, 2, 3 or 64 ranks, and ``torch.export.load`` alone still opens it.

``torch.export.load`` unpickles the example inputs and any pickled weights with
``weights_only=False`` (a pickle can run code). :func:`load_program` first opens every pickle in the
archive with ``torch.load(weights_only=True)``, which accepts tensors and containers only, and refuses
custom objects; ``trust_remote_code=True`` skips that check for files the user trusts.
"""

from __future__ import annotations

import importlib
import io
import json
import pathlib
import re
import zipfile
from dataclasses import dataclass

import torch

from .capture import Captured, capture, from_program
from .errors import UnsupportedModelError

FORMAT = "ringify-pt2/1"
META_FILE = "ringify.json"


class UnsafeArchiveError(ValueError):
    """The archive holds a pickle that could run code; the message names it and the flag that allows it."""


def _check_pickles(path: pathlib.Path) -> None:
    """Every pickle in the archive must load with ``weights_only=True`` (tensors and containers only)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a .pt2 archive (not a zip file)") from err
    with archive:
        names = archive.namelist()
        pickled = [n for n in names if "/data/sample_inputs/" in n]
        for config_name in (n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))):
            folder = config_name.rsplit("/", 1)[0]
            for fqn, entry in json.loads(archive.read(config_name)).get("config", {}).items():
                file = entry.get("path_name", "")
                if file.startswith(("custom_obj", "opaque_obj")):
                    raise UnsafeArchiveError(f"{path} holds a custom object ({fqn}) that only a pickle can load; "
                                             "pass --trust-remote-code (trust_remote_code=True) if you trust the file")
                if entry.get("use_pickle"):
                    pickled.append(f"{folder}/{file}")
        for name in pickled:
            try:
                torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except KeyError:
                continue
            except Exception as err:  # noqa: BLE001 - any refusal of the safe unpickler
                raise UnsafeArchiveError(
                    f"{path}: {name} is a pickle that holds more than tensors ({type(err).__name__}); loading it could "
                    "run code. Pass --trust-remote-code (trust_remote_code=True) if you trust the file"
                ) from None


# Packages whose classes a saved program may name as its input/output structure (HF's ModelOutput):
# importing an installed library by name runs no code from the file.
_STRUCTURE_PACKAGES = ("transformers", "ringify")


def _import_output_types(path: pathlib.Path) -> None:
    """Register the pytree types the program's structure names (their packages register them on import)."""
    try:
        with zipfile.ZipFile(path) as archive:
            text = " ".join(archive.read(n).decode("utf-8", "replace") for n in archive.namelist()
                            if "/models/" in n and n.endswith(".json"))
    except (zipfile.BadZipFile, OSError):
        return
    pattern = r"((?:%s)(?:\.\w+)+)\.\w+" % "|".join(_STRUCTURE_PACKAGES)
    for module in set(re.findall(pattern, text)):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # not a module path (or not installed): the load below names the missing type


def load_program(path, *, trust_remote_code: bool = False):
    """``(ExportedProgram, ringify metadata or {})`` from a ``.pt2``, refusing code-carrying pickles."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if not trust_remote_code:
        _check_pickles(path)
    _import_output_types(path)
    extra = {META_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign archive
        raise ValueError(f"{path} is not a loadable torch.export archive: {type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    if program is None or not hasattr(program, "module"):
        raise ValueError(f"{path} holds no exported program")
    meta = json.loads(extra[META_FILE]) if extra.get(META_FILE) else {}
    if meta and meta.get("format") != FORMAT:
        raise ValueError(f"{path} was written by another ringify format ({meta.get('format')}); convert it again")
    return program, meta


def convert(source, out, *, world_size: int = 2, layout: str = "zigzag") -> dict:
    """Capture ``source`` (a :class:`ringify.sources.ModelSource`), prove it can be ringified on
    ``world_size`` ranks (or raise :class:`UnsupportedModelError`), save the program. Returns the metadata."""
    from .api import rewrite

    captured = capture(source.model, source.args, source.kwargs, source.seq_dim)
    if captured.program is None:
        raise UnsupportedModelError(f"{source.name} was captured without torch.export; only exported programs "
                                    "can be saved")
    if not captured.symbols:
        raise UnsupportedModelError(f"the sequence length of {source.name} was specialised during capture; "
                                    "ringify cannot save a model that works for one length only")
    world = max(1, min(world_size, captured.seq_len))
    _, report = rewrite(source.model, captured, world_size=world, layout=layout)
    meta = {
        "format": FORMAT,
        "model": source.name,
        "seq_dim": source.seq_dim,
        "seq_len": captured.seq_len,
        "flat": captured.flat,
        "inputs": source.inputs,
        "report": json.loads(report.to_json()),
    }
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial.pt2")  # never leave half a file under the requested name
    try:
        torch.export.save(captured.program, str(partial), extra_files={META_FILE: json.dumps(meta, default=str)})
    except NotImplementedError as err:  # e.g. an output type torch's pytree cannot name
        partial.unlink(missing_ok=True)
        raise UnsupportedModelError(f"torch.export.save cannot save {source.name}: {err}") from err
    partial.replace(out)
    return meta


@dataclass
class _SavedCaptured(Captured):
    """A loaded program's graph, called the way it was exported: keyword tensors in the saved order."""

    names: tuple = ()

    def __call__(self, gm, args, kwargs):
        if self.flat:  # positional after flattening: the saved order, whatever order the caller used
            order = {name: i for i, name in enumerate(self.names)}
            kwargs = dict(sorted(kwargs.items(), key=lambda item: order.get(item[0], len(order))))
        return super().__call__(gm, args, kwargs)


def load(path, mesh=None, *, trust_remote_code: bool = False, **options):
    """A :class:`ringify.api.RingModule` for the model saved at ``path``, on ``mesh`` (any world size).

    Options are :func:`ringify.ringify`'s. The graph is the saved one (no re-tracing); the ring rewrite is
    done on the first call, for the inputs' length and the mesh's size.
    """
    from .api import RingModule

    program, meta = load_program(path, trust_remote_code=trust_remote_code)
    seq_dim = meta.get("seq_dim", options.pop("seq_dim", 1))
    flat = bool(meta.get("flat", False))
    names = [entry["name"] for entry in meta.get("inputs", []) if "constant" not in entry]

    class LoadedRingModule(RingModule):
        def _capture(self, args, kwargs):
            from .capture import sequence_length

            captured = from_program(program, sequence_length(args, kwargs, seq_dim), seq_dim, flat)
            return _SavedCaptured(**vars(captured), names=tuple(names))

    module = LoadedRingModule(program.module(), mesh, seq_dim=seq_dim, **options)
    module.meta = meta
    return module


__all__ = ["FORMAT", "UnsafeArchiveError", "convert", "load", "load_program"]
