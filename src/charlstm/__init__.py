"""charlstm: character-level LSTM language models, from the Keras tutorial to a real tool.

Five lines in a notebook::

    from charlstm import Corpus, train, generate
    corpus = Corpus.gutenberg(11)
    model = train(corpus, preset="tutorial-small", epochs=1)
    print(generate(model, length=200))
"""

import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _quiet_start() -> None:
    """Ctrl-C while the command's imports load (torch takes a while) ends it quietly, status 130 as
    the shell reports it, instead of a traceback; ``cli.main`` turns Ctrl-C back into
    KeyboardInterrupt once it can handle it. Only when charlstm is the program being run."""
    argv0 = _sys.argv[0] if _sys.argv else ""
    if (argv0 == "-m" or _os.path.basename(argv0) == "charlstm") and \
            _threading.current_thread() is _threading.main_thread():
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)


_quiet_start()

from .checkpoint import TrainedModel, load, save
from .corpus import Corpus, Normalization
from .errors import CharLSTMError
from .evaluate import evaluate_ids
from .generate import Generator, SamplingConfig, generate
from .model import CharLSTM, ModelConfig
from .prepare import PrepareConfig, PreparedData, prepare
from .recipes import PRESETS, TrainConfig
from .train import Trainer, fit, train
from .vocab import Vocab

__all__ = [
    "CharLSTM", "CharLSTMError", "Corpus", "Generator", "ModelConfig", "Normalization", "PRESETS",
    "PrepareConfig", "PreparedData", "SamplingConfig", "TrainConfig", "TrainedModel", "Trainer", "Vocab",
    "evaluate_ids", "fit", "generate", "load", "save", "prepare", "train",
]
__version__ = "0.1.0"
