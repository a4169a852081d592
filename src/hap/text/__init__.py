"""Text side of hap: the text "zoo" (labelled data, local Hugging Face encoders) for attention-head pruning.

    data = load_text_data("tweets")                       # or a CSV; splits train/val/score/test
    tm = load_text_model("minilm", data.label_names)      # or a local model directory; never downloads
    task = hap.train.TextTask(tm.tokenizer)
    small, plan, sens, metrics = hap.pipeline.run(tm.model, task, data, RunConfig.for_units("heads"))

Training, the pipeline and the CLI are shared with vision (:mod:`hap.train`, :mod:`hap.pipeline`,
``hap prune --units heads`` = ``hap heads``). Nothing here imports ``transformers`` until a model is loaded.
"""

from .data import SPLITS, TWEETS, TextData, TextLoader, load_text_data, read_csv, tweets_path
from .models import MINILM, TextModel, classifier_labels, load_text_model, load_tokenizer, resolve_model_dir
from .run import load_run

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
    "load_run",
]
