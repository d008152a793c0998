"""Training driver for a parameter-golf record-class model (``python3 -m train``).

Modules: ``model`` (GPT + GPTConfig), ``data`` (challenge shard format, distributed loader),
``artifact`` (int6/int8/fp16 quantized, zstd-compressed artifact), ``config`` (env/CLI settings),
``fixture`` (offline tokenizer + shards from the standard library's text), ``synthetic``
(official-size synthetic validation set), ``train_gpt`` (the training loop).

Eval (``python3 -m train.eval``): ``eval`` (CLI and ``evaluate``), ``ledger`` (score ledger), ``rows``
(row planning), ``forward`` (scoring forward, regional compile), ``scoring`` (taking scores),
``ttt_config``, ``adapters`` (per-document LoRA), ``ttt_optim`` (batched Adam), ``schedules``
(per-document TTT step and schedules), ``doc_queue`` (batches across ranks, deadline), ``phased``
(global passes on the base between phases), ``chunked`` (chunked TTT), ``warmup``.
"""
