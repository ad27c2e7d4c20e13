"""Peak CUDA memory of the framework's CLIP task per adapter: a training step (bf16 autocast over fp32
master weights, as Lightning's bf16-mixed) and a batch-256 evaluation forward. A diagnostic (GPU only):

    python -m benchmarks.probe_fw_memory lora randlora
"""
from __future__ import annotations

import sys

import torch

from benchmarks.loop import build_job


def probe(adapter: str, model: str = "clip_vitb32", batch: int = 128) -> str:
    over = [f"model={model}", f"adapter={adapter}", "trainer=cpu", "model.pretrained=null", "data=synthetic",
            "data.synthetic.size=224", "data.synthetic.per_class=30", f"data.batch_size={batch}"]
    _, _, task = build_job(over)
    task = task.cuda()
    task.log = lambda *a, **k: None  # no Trainer attached
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.arange(batch, device="cuda") % 10
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        m0 = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = task.training_step((x, y), 0)
        m1 = torch.cuda.memory_allocated()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    paths: dict[str, int] = {}
    for _, m in task.named_modules():
        p = getattr(getattr(m, "update", None), "last_path", None)
        if p:
            paths[p] = paths.get(p, 0) + 1
    torch.cuda.reset_peak_memory_stats()
    e0 = torch.cuda.memory_allocated()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        task(torch.randn(256, 3, 224, 224, device="cuda"))
    torch.cuda.synchronize()
    eval_peak = torch.cuda.max_memory_allocated()
    mb = 2**20
    return (f"{adapter}: held {m0 / mb:.0f} MB; train fwd +{(m1 - m0) / mb:.0f} MB, peak +{(peak - m0) / mb:.0f} MB; "
            f"eval b256 peak +{(eval_peak - e0) / mb:.0f} MB; paths {paths}")


def main(argv=None):
    for adapter in (argv if argv is not None else sys.argv[1:]) or ["lora", "randlora"]:
        print(probe(adapter), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
