"""CPU-scale reproduction of the RandLoRA paper's central claims (E1, E2, E4, E6 of the method note).

Run ``python -m experiments.cpu_repro`` (full, ~15 min on 2 cores) or add ``--quick`` (seconds).
Numbers and plots go to ``<out>/results/``, the claim-by-claim report to ``<out>/REPORT.md``.
"""
