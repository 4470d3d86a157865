"""A weights file checked before anything loads it.

ultralytics loads a `.pt` with `torch.load(weights_only=False)`: unpickling runs whatever the pickle calls. So
runner first unpickles the checkpoint's `data.pkl` itself, with an unpickler that admits an allow-list:
- layers: the `torch.nn.Module` classes of `torch.nn.modules.*` and `ultralytics.nn.modules.*`, and the `*Model`
  classes of `ultralytics.nn.tasks`, each named exactly (no dotted name), made as pickle makes them (`__new__`,
  then their saved state), never called;
- tensors: torch's `_rebuild_tensor_v2`, `_rebuild_parameter` and the storage types, read as `meta` storages
  (no tensor bytes are loaded);
- plain data: OrderedDict, set, torch.Size, numpy scalars and dtypes (with `_codecs.encode` as protocol 2
  pickles their bytes, latin-1 only), ultralytics' IterableSimpleNamespace, PosixPath;
- the bound `forward` / `forward_fuse` of a layer, the one `getattr` a fused model's pickle makes.
Anything else, or a trusted class called as a function (a model's `__init__` evaluates its yaml), is refused
in one line naming it. The exporters check the very copy they hand to ultralytics.
"""
from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import pathlib
import pickle
import shutil
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

from runner import heads
from runner.config import ConfigError
from runner.results import StageError

EXPECTED = "expected an ultralytics detection checkpoint (.pt from training or export), or a model preset"
TRUSTED = "it trusts only torch and ultralytics layers and models, tensors and plain data"
LAYER_MODULES = ("torch.nn.modules.", "ultralytics.nn.modules.")
MODEL_MODULE = "ultralytics.nn.tasks"
STORAGES = {"Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "Double": "float64", "Long": "int64",
            "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8", "Bool": "bool", "Untyped": "uint8"}
FORWARDS = ("forward", "forward_fuse")


class Untrusted(pickle.UnpicklingError):
    """What the pickle refers to or calls outside the allow-list, e.g. "refers to posix.system"."""


def _qualified(obj) -> str:
    """module.name of a class or function; of its type for anything else."""
    named = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{named.__module__}.{named.__qualname__}"


def _latin1(text, encoding):
    """`_codecs.encode` as protocol 2 pickles bytes: a str to latin-1 bytes, nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise Untrusted(f"calls _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _forward(obj, name):
    """`getattr` as a fused layer's pickled `forward` needs it: that layer's own forward or forward_fuse, bound."""
    import torch

    if isinstance(obj, torch.nn.Module) and name in FORWARDS:
        return getattr(type(obj), name).__get__(obj)
    raise Untrusted(f"calls builtins.getattr({obj.__name__ if isinstance(obj, type) else type(obj).__name__}, "
                    f"{name!r})")


@functools.cache
def _callables() -> dict[tuple[str, str], object]:
    """The globals a pickle may call (REDUCE) or make (NEWOBJ), by their pickled (module, name)."""
    import numpy as np
    import torch
    from ultralytics.utils import IterableSimpleNamespace

    scalar = np.float64(0).__reduce__()[0]
    return {("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
            ("torch", "Size"): torch.Size, ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
            ("numpy", "dtype"): np.dtype, ("numpy.core.multiarray", "scalar"): scalar,
            ("numpy._core.multiarray", "scalar"): scalar, ("_codecs", "encode"): _latin1,
            ("ultralytics.utils", "IterableSimpleNamespace"): IterableSimpleNamespace,
            ("pathlib", "PosixPath"): pathlib.PosixPath, ("builtins", "getattr"): _forward}


@functools.cache
def _storages() -> dict[tuple[str, str], object]:
    """The storage types a tensor's persistent id names, as their dtypes (as torch.load reads them)."""
    import torch

    return {("torch", f"{kind}Storage"): getattr(torch, dtype) for kind, dtype in STORAGES.items()}


def _layer(module: str, name: str) -> type | None:
    """The torch or ultralytics layer class, or ultralytics `*Model`, pickled as (module, name); None for
    anything else (a dotted name, a function, a class that is no `torch.nn.Module`)."""
    if "." in name or not (module.startswith(LAYER_MODULES) or (module == MODEL_MODULE and name.endswith("Model"))):
        return None
    import torch
    import ultralytics.nn.tasks  # noqa: F401  (imports every ultralytics.nn.modules.* module)

    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) and issubclass(found, torch.nn.Module) else None


def _callable(func):
    if any(func is f for f in _callables().values()):
        return func
    raise Untrusted(f"calls {_qualified(func)}")


def _constructible(cls):
    import torch

    if isinstance(cls, type) and (issubclass(cls, torch.nn.Module) or any(cls is f for f in _callables().values())):
        return cls
    raise Untrusted(f"makes {_qualified(cls)}")


def _held(obj, kind: type, doing: str):
    """`obj` when it is a `kind`: a list, set or dict is all pickle's append, add and setitem opcodes may fill."""
    if isinstance(obj, kind):
        return obj
    raise Untrusted(f"{doing} {_qualified(obj)}")


class _Unpickler(pickle._Unpickler):
    """pickle's own (Python) unpickler, its globals, calls and object creations held to the allow-list and its
    tensors' storages made on `meta` from their persistent ids."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, payload: bytes, records: set[str]):
        super().__init__(io.BytesIO(payload), encoding="utf-8")  # as torch.load reads it
        self.records = records

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:  # as pickle resolves a protocol 2 name (__builtin__ -> builtins)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _callables().get((module, name)) or _storages().get((module, name)) or _layer(module, name)
        if found is None:
            raise Untrusted(f"refers to {module}.{name}")
        return found

    def persistent_load(self, pid):
        import torch

        kind, dtype, key, _location, numel = pid if isinstance(pid, tuple) and len(pid) == 5 else (None,) * 5
        if (kind != "storage" or not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0
                or f"data/{key}" not in self.records):
            raise pickle.UnpicklingError(f"unknown tensor storage {pid!r}")
        untyped = torch.UntypedStorage(numel * torch._utils._element_size(dtype), device="meta")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = _callable(self.stack[-1])(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = _constructible(self.stack.pop())
        self.append(cls.__new__(cls, *args))

    def load_newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        cls = _constructible(self.stack.pop())
        self.append(cls.__new__(cls, *args, **kwargs))

    def _instantiate(self, klass, args):  # INST and OBJ, which torch.save does not write
        self.append(_callable(klass)(*args))

    def load_build(self):  # the state of an instance, never of a class or function
        import torch

        if callable(self.stack[-2]) and not isinstance(self.stack[-2], torch.nn.Module):
            raise Untrusted(f"sets the state of {_qualified(self.stack[-2])}")
        pickle._Unpickler.load_build(self)

    def load_append(self):
        value = self.stack.pop()
        _held(self.stack[-1], list, "appends to").append(value)

    def load_appends(self):
        items = self.pop_mark()
        _held(self.stack[-1], list, "appends to").extend(items)

    def load_additems(self):
        items = self.pop_mark()
        _held(self.stack[-1], set, "adds to").update(items)

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        _held(self.stack[-1], dict, "sets items of")[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        _held(self.stack[-1], dict, "sets items of").update(zip(items[::2], items[1::2]))

    dispatch.update({pickle.REDUCE[0]: load_reduce, pickle.NEWOBJ[0]: load_newobj, pickle.NEWOBJ_EX[0]: load_newobj_ex,
                     pickle.BUILD[0]: load_build, pickle.APPEND[0]: load_append, pickle.APPENDS[0]: load_appends,
                     pickle.ADDITEMS[0]: load_additems, pickle.SETITEM[0]: load_setitem,
                     pickle.SETITEMS[0]: load_setitems})


def _unpickled(file: Path, shown: str):
    """The checkpoint's object, its tensors on `meta`. Raises ConfigError."""
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            payload = archive.read(pickles[0]) if pickles else None
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise ConfigError(f"model.weights: {shown} is a damaged checkpoint ({exc}); {EXPECTED}") from None
    if payload is None:
        raise ConfigError(f"model.weights: {shown} is a zip archive without data.pkl, not a torch.save "
                          f"checkpoint; {EXPECTED}")
    prefix = pickles[0][:-len("data.pkl")]
    try:
        return _Unpickler(payload, {n[len(prefix):] for n in names if n.startswith(prefix)}).load()
    except Untrusted as exc:
        raise ConfigError(f"model.weights: {shown} {exc}, which runner does not load: {TRUSTED}") from None
    except Exception as exc:  # whatever the allowed pickle does wrong, the file cannot be loaded
        reason = " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(":")[:200]
        raise ConfigError(f"model.weights: {shown} is a damaged checkpoint ({reason}); {EXPECTED}") from None


class Verified(NamedTuple):
    head: str  # the class name of the model's last module (Detect, v10Detect, RTDETRDecoder)
    names: list[str]  # the class names by id ([] where the checkpoint names none)


def verify(path: str | Path, shown: str | None = None) -> Verified:
    """The head and class names of the file at `path` (`shown` in messages), an ultralytics detection checkpoint
    that refers to nothing outside the allow-list and whose head runner decodes (`heads.check_model`); else
    ConfigError of one line saying what it is instead."""
    import torch

    file, shown = Path(path), shown or str(path)
    if file.stat().st_size == 0:
        raise ConfigError(f"model.weights: {shown} is empty; {EXPECTED}")
    if not zipfile.is_zipfile(file):
        raise ConfigError(f"model.weights: {shown} is not a PyTorch checkpoint (not a zip archive); {EXPECTED}")
    ckpt = _unpickled(file, shown)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    model = next((m for m in (ckpt.get("ema"), ckpt.get("model")) if isinstance(m, torch.nn.Module)), None)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model.weights: {shown} holds no ultralytics model (a bare state_dict?); {EXPECTED}")
    try:
        head = heads.check_model(model)
    except heads.UnsupportedHead as exc:
        raise ConfigError(f"model.weights: {shown} {exc}") from None
    names = getattr(model, "names", None)
    return Verified(head, [str(names[i]) for i in range(len(names))] if isinstance(names, (dict, list)) else [])


def head_of(path: str | Path) -> str:
    """`verify(path).head`, checked once per file content (path, size, modification time) in this process."""
    stat = Path(path).stat()
    return _head(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _head(path: str, size: int, mtime_ns: int) -> str:
    return verify(path).head


def verified_copy(source: str, local: Path, stage: str) -> Path:
    """`source` copied to `local` and that copy verified, for a stage to hand to ultralytics: the bytes loaded
    are the bytes checked, whatever became of `source` since preflight. Raises StageError of `stage`."""
    shutil.copyfile(source, local)
    try:
        verify(local, source)
    except ConfigError as exc:
        raise StageError(stage, str(exc)) from None
    return local
