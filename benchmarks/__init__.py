"""Speed / memory benchmarks of the adapter library against full fine-tuning and PEFT.

* ``python -m benchmarks.run``   — whole-model training steps (ViT-B, CLIP ViT-B/32, LLaMA-width
  block stack), all methods interleaved in one process, peak memory per configuration.
* ``python -m benchmarks.layer`` — one adapted linear layer, RandLoRA compute paths vs LoRA, with
  a FLOP / byte model printed next to the times.
* ``results/patch_check.md`` — per-layer evidence for the randlora.py patch (applied; the script that compared
  the two versions was removed once the patch landed).
* ``python -m benchmarks.loop`` — framework overhead vs a bare loop (written by the framework's authors).

Results and their analysis: ``benchmarks/RESULTS.md``; raw reports: ``benchmarks/results/``.
"""
