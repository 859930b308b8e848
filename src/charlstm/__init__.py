"""charlstm: character-level LSTM language models, from the Keras tutorial to a real tool.

Five lines in a notebook::

    from charlstm import Corpus, train, generate
    corpus = Corpus.gutenberg(11)
    model = train(corpus, preset="tutorial-small", epochs=1)
    print(generate(model, length=200))
"""

import importlib as _importlib
import os as _os
import signal as _signal
import sys as _sys
import threading as _threading
import types as _types


def _quiet_start() -> None:
    """Ctrl-C while the command's imports load (torch takes a while) ends it quietly, status 130 as
    the shell reports it, instead of a traceback; ``entry.run_command`` turns Ctrl-C back into
    KeyboardInterrupt once it can handle it. Only when charlstm is the program being run."""
    argv0 = _sys.argv[0] if _sys.argv else ""
    if (argv0 == "-m" or _os.path.basename(argv0) == "charlstm") and \
            _threading.current_thread() is _threading.main_thread():
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)


_quiet_start()

# Public names load on first use (PEP 562), so that `charlstm prepare` starts without PyTorch.
_EXPORTS = {
    "TrainedModel": "checkpoint", "load": "checkpoint", "save": "checkpoint",
    "Corpus": "corpus", "Normalization": "corpus",
    "CharLSTMError": "errors",
    "evaluate_ids": "evaluate",
    "Generator": "generate", "SamplingConfig": "generate", "generate": "generate",
    "CharLSTM": "model", "ModelConfig": "model",
    "PrepareConfig": "prepare", "PreparedData": "prepare", "prepare": "prepare",
    "PRESETS": "recipes", "TrainConfig": "recipes",
    "Trainer": "train", "fit": "train", "train": "train",
    "Vocab": "vocab",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(_types.ModuleType):
    """Importing the submodules ``train``, ``generate`` and ``prepare`` binds them on the package,
    which would hide the functions of the same names: the function stays the package's attribute."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, _types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__all__ = [
    "CharLSTM", "CharLSTMError", "Corpus", "Generator", "ModelConfig", "Normalization", "PRESETS",
    "PrepareConfig", "PreparedData", "SamplingConfig", "TrainConfig", "TrainedModel", "Trainer", "Vocab",
    "evaluate_ids", "fit", "generate", "load", "save", "prepare", "train",
]
__version__ = "0.1.0"
