"""Hugging Face interchange: distlab's GPT as a ``transformers`` GPT-2 directory and back.

- ``gpt2``: the GPT-2 config of a distlab shape and the weight-name mapping both ways;
- ``tokenizer``: the byte tokenizer (token id = byte value) as ``tokenizers`` files;
- ``directory``: writing and reading an exported directory (safetensors, never pickle);
- ``run_weights``: the full weights of a run's newest checkpoint, in one process, from
  any strategy's format.
"""
