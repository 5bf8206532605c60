"""Read a pickle from other people without running its code: numpy arrays are rebuilt, pandas objects become
inert stubs, every other global is refused (used for the Taichi GT pickle, :mod:`pipeline.data.layouts.taichi`)."""
from __future__ import annotations

import pickle
from typing import Any

import numpy as np


class _Stub:
    """Inert stand-in for a class or function named in a pickle: records what it was called with.

    Pickle "executes" a global by calling it; a stub only stores the arguments and the state, so a
    pickle can name pandas classes (or anything we map to a stub) without any of their code running.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Stub":
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub {self.qualname}>"


def _numpy_globals() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    allowed = {}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = core.numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("builtins", "slice")] = slice
    allowed[("builtins", "object")] = object
    allowed[("collections", "OrderedDict")] = dict
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for GT files from other people: numpy arrays are rebuilt, pandas objects become stubs,
    every other global is refused.

    ``pickle.load`` runs whatever callable a file names (``os.system`` included); these files come
    from third parties, so we allow only numpy's array/dtype/scalar reconstruction (which allocate and
    fill arrays, nothing else) and replace pandas' classes by :class:`_Stub`, then read the columns
    out of the stubs ourselves. pandas is therefore not needed either.
    """

    _allowed = None

    def find_class(self, module: str, name: str) -> Any:
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _numpy_globals()
        hit = self._allowed.get((module, name))
        if hit is not None:
            return hit
        if module == "copyreg" and name == "_reconstructor":
            return _copyreg_reconstructor
        if module == "pandas" or module.startswith("pandas."):
            return type(name, (_Stub,), {"qualname": f"{module}.{name}"})
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays and pandas "
                                     f"tables are allowed in annotation pickles)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in annotation pickles")


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # protocol 0/1 pickles build objects this way; only stubs may be built
    if isinstance(cls, type) and issubclass(cls, _Stub):
        return cls.__new__(cls)
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")


def _index_values(idx: Any) -> list:
    """Labels of a pickled pandas Index (a stub of ``_new_Index(cls, {"data": ...})`` or RangeIndex)."""
    if isinstance(idx, np.ndarray):
        return idx.tolist()
    if isinstance(idx, (list, tuple)):
        return list(idx)
    if isinstance(idx, _Stub):
        d = None
        for a in idx.args:
            if isinstance(a, dict):
                d = a
        if d is None and isinstance(idx.state, dict):
            d = idx.state
        if d is not None:
            if "data" in d:
                return _index_values(d["data"])
            if "start" in d or "stop" in d:
                return list(range(d.get("start", 0) or 0, d["stop"], d.get("step", 1) or 1))
        if idx.args and isinstance(idx.args[0], (np.ndarray, list)):
            return _index_values(idx.args[0])
    raise ValueError(f"cannot read a pandas index from {idx!r}")


def _locs(x: Any) -> list[int]:
    """Column positions of a block: an int array, a slice, or a BlockPlacement stub around either."""
    if isinstance(x, slice):
        return list(range(x.start or 0, x.stop, x.step or 1))
    if isinstance(x, np.ndarray):
        return [int(i) for i in x.ravel()]
    if isinstance(x, _Stub) and x.args:
        return _locs(x.args[0])
    if isinstance(x, (list, tuple)):
        return [int(i) for i in x]
    raise ValueError(f"cannot read block positions from {x!r}")


def dataframe_columns(obj: Any) -> dict[str, np.ndarray]:
    """Column name -> 1-D array, from an unpickled dict of columns or a stubbed pandas DataFrame."""
    if isinstance(obj, dict):
        return {str(k): np.asarray(v, dtype=object) if not isinstance(v, np.ndarray) else v for k, v in obj.items()}
    if not isinstance(obj, _Stub) or not isinstance(obj.state, dict):
        raise ValueError(f"expected a pandas DataFrame or a dict of columns, got {obj!r}")
    mgr = obj.state.get("_mgr", obj.state.get("_data"))
    if not isinstance(mgr, _Stub):
        raise ValueError("DataFrame without a block manager")
    blocks: list[tuple[Any, Any]] = []
    st = mgr.state
    if isinstance(st, tuple) and len(st) == 4 and isinstance(st[3], dict) and "0.14.1" in st[3]:
        # pandas >= 0.14: (axes, values, items, {"0.14.1": {"axes": [...], "blocks": [{values, mgr_locs}]}})
        s = st[3]["0.14.1"]
        axes = s["axes"]
        blocks = [(b["values"], b["mgr_locs"]) for b in s["blocks"]]
        items = _index_values(axes[0])
    elif isinstance(st, tuple) and len(st) >= 3:
        # older pandas: (axes, block values, block items)
        axes = st[0]
        items = _index_values(axes[0])
        blocks = [(v, np.asarray([items.index(x) for x in _index_values(it)])) for v, it in zip(st[1], st[2])]
    elif mgr.args and len(mgr.args) >= 2:
        # pandas >= 1.3 (Cython BlockManager.__reduce__): (blocks, axes); blocks = stubs of (values, placement, ndim)
        items = _index_values(mgr.args[1][0])
        blocks = [(b.args[0], b.args[1]) for b in mgr.args[0]]
    else:
        raise ValueError("unrecognised pandas block manager layout")
    cols: dict[str, np.ndarray] = {}
    for values, locs in blocks:
        values = np.asarray(values)
        values = values.reshape(1, -1) if values.ndim == 1 else values  # (n_block_columns, n_rows)
        for j, loc in enumerate(_locs(locs)):
            cols[str(items[loc])] = values[j]
    return cols
