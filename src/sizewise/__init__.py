"""sizewise: compress a causal LM to the size you choose, and measure what it cost."""

__version__ = "0.1.0"

import sys  # noqa: E402
import types  # noqa: E402

# The public names load on first use (PEP 562): `import sizewise.cli` stays light, so the CLI's
# signal handling is in place before torch and transformers load (a Ctrl-C during those imports
# is then one line, not a traceback).
_EXPORTS = {
    "compress": "api", "run": "api", "evaluate": "api", "info": "api", "Recipe": "api", "CompressConfig": "api",
    "CalibConfig": "api", "Result": "api", "Plan": "plan", "QuantFormat": "quant.uniform",
    "FloatFormat": "quant.formats", "SizewiseError": "errors",
}

__all__ = ["compress", "run", "evaluate", "info", "Recipe", "CompressConfig", "CalibConfig", "Result", "Plan",
           "QuantFormat", "FloatFormat", "SizewiseError", "__version__"]


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name not in _EXPORTS:   # a subpackage used as an attribute (`sizewise.api.compare`) imports on first use
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'sizewise' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule `sizewise.evaluate` binds its name on the package; the public name
    `sizewise.evaluate` is the API function, so that binding is left out."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
