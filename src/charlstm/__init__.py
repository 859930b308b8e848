"""charlstm: character-level LSTM language models, from the Keras tutorial to a real tool.

Five lines in a notebook::

    from charlstm import Corpus, train, generate
    corpus = Corpus.gutenberg(11)
    model = train(corpus, preset="tutorial-small", epochs=1)
    print(generate(model, length=200))
"""

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
