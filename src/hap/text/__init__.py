"""Text side of hap: attention-head pruning of local Hugging Face encoders on labelled text.

    data = load_text_data("tweets")                       # or a CSV; splits train/val/score/test
    tm = load_text_model("minilm", data.label_names)      # or a local model directory; never downloads
    small, plan, sens, metrics = prune_heads_and_finetune(tm.model, tm.tokenizer, data, HeadsConfig(heads=0.5))

The same steps as a command: ``hap heads --model minilm --data tweets --target heads=0.5``.
Nothing here imports ``transformers`` until a model is loaded.
"""

from .cli_heads import load_run
from .data import SPLITS, TWEETS, TextData, TextLoader, load_text_data, read_csv, tweets_path
from .finetune import TextTrainConfig, TextTrainResult, accuracy_on, evaluate_text, train_text
from .models import MINILM, TextModel, classifier_labels, load_text_model, load_tokenizer, resolve_model_dir
from .pipeline import HeadsConfig, classifier_loss, prune_heads_and_finetune, score_heads

__all__ = [
    "SPLITS",
    "TWEETS",
    "MINILM",
    "TextData",
    "TextLoader",
    "load_text_data",
    "read_csv",
    "tweets_path",
    "TextModel",
    "classifier_labels",
    "load_text_model",
    "load_tokenizer",
    "resolve_model_dir",
    "TextTrainConfig",
    "TextTrainResult",
    "accuracy_on",
    "evaluate_text",
    "train_text",
    "HeadsConfig",
    "classifier_loss",
    "prune_heads_and_finetune",
    "score_heads",
    "load_run",
]
