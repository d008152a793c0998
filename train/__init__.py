"""Training driver for a parameter-golf record-class model (``python3 -m train``).

Modules: ``model`` (GPT + GPTConfig), ``data`` (challenge shard format, distributed loader),
``artifact`` (int6/int8/fp16 quantized, zstd-compressed artifact), ``config`` (env/CLI settings),
``fixture`` (offline tokenizer + shards from the standard library's text), ``synthetic``
(official-size synthetic validation set), ``train_gpt`` (the training loop).
"""
