"""Speed / memory benchmarks of the adapter library against full fine-tuning and PEFT.

* ``python -m benchmarks.run``   — whole-model training steps (ViT-B, CLIP ViT-B/32, LLaMA-width
  block stack), all methods interleaved in one process, peak memory per configuration.
* ``python -m benchmarks.layer`` — one adapted linear layer, RandLoRA compute paths vs LoRA, with
  a FLOP / byte model printed next to the times.
* ``python -m benchmarks.loop`` — framework overhead vs a bare loop (written by the framework's authors).
* ``python -m benchmarks.ops`` — operators per training step (the cost of a launch-bound GPU step).
* ``python -m benchmarks.attn_path`` — CLIP's adapted attention: self-attention path vs the fallback.
* ``python -m benchmarks.sparse_bases`` — dense vs sparse products with the ternary bases.
* ``python -m benchmarks.ddp`` — two data-parallel ranks: DDP's buffer broadcast; ``--fsdp`` adds the FSDP plan.
* ``python -m benchmarks.profile`` / ``benchmarks.probe_fw_memory`` — profiler tables, memory breakdowns.
* ``bash benchmarks/gpu_session.sh <stage> ...`` — the GPU measurements, in stages of one 10-minute call.

The models are the framework's (``benchmarks/models.py`` builds the shipped model configs through
``randlora.training.build.model_network``): a benchmark times what ``train.py`` trains.

Current numbers, with the commit and command behind each: ``benchmarks/RESULTS.md``; raw reports:
``benchmarks/results/``. The history (earlier sessions, superseded runs, derivations, the applied
randlora.py patch) is ``benchmarks/ARCHIVE.md``, its superseded raw reports ``benchmarks/results/archive/``.
"""
