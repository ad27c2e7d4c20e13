"""torch.compile of adapted models (randlora/compile.py): compiled training computes what eager
training computes, for every method, on the three model families; names and files do not change."""
import copy

import pytest
import torch
from torch import nn

from randlora.adapters import adapter_state_dict, adapted_layers, inject, merge, unmerge
from randlora.compile import compile_model, is_compiled, normalise_options, repeated_blocks

from tests.helpers import FAST, results, train_cli
from tests.tiny_models import tiny_clip, tiny_llama, tiny_vit


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_options_normalised_and_checked():
    assert normalise_options(None) is None and normalise_options(False) is None
    assert normalise_options({"enabled": False, "scope": "model"}) is None
    assert normalise_options(True) == {"scope": "blocks", "mode": None, "backend": "inductor", "fullgraph": False,
                                       "dynamic": None}
    o = normalise_options({"scope": "model", "mode": "reduce-overhead", "dynamic": False})
    assert (o["scope"], o["mode"], o["dynamic"]) == ("model", "reduce-overhead", False)
    for bad, msg in [({"scope": "layer"}, "compile.scope='layer'"), ({"mode": "turbo"}, "compile.mode='turbo'"),
                     ({"backend": "nope"}, "compile.backend='nope'"), ({"fullgraph": "yes"}, "compile.fullgraph"),
                     ({"dynamic": 1}, "compile.dynamic=1"), ({"speed": 3}, "compile.speed is not an option"),
                     ("fast", "must be true, false or a mapping")]:
        with pytest.raises(ValueError, match=msg.replace(".", r"\.").replace("(", r"\(")):
            normalise_options(bad)


def test_block_stacks_found_in_each_family():
    names = [n for n, _ in repeated_blocks(tiny_vit())]
    assert names == ["blocks.0", "blocks.1"]
    names = [n for n, _ in repeated_blocks(tiny_clip())]
    assert names == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1",
                     "transformer.resblocks.0", "transformer.resblocks.1"]
    assert [n for n, _ in repeated_blocks(tiny_llama())] == ["model.layers.0", "model.layers.1"]
    # an MLP is a stack of layers, not of blocks: nothing to compile, and a clear error
    mlp = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    assert repeated_blocks(mlp) == [] and repeated_blocks(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))) == []
    with pytest.raises(ValueError, match="use compile.scope=model"):
        compile_model(mlp, True)
    assert not is_compiled(mlp)
    info = compile_model(mlp, {"scope": "model", "backend": "eager"})
    assert info["compiled"] == ["<model>"] and is_compiled(mlp)


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn, self.mlp = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.mlp(self.attn(x))


class _Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_Block(), _Block())
        self.down = nn.Linear(8, 8)

    def forward(self, x):
        return self.down(self.blocks(x))


def test_innermost_stacks_identity_padding_and_single_projection_lists():
    # hierarchical (Swin / ConvNeXt style): the blocks inside each stage, not the stages
    staged = nn.Sequential(_Stage(), _Stage())
    assert [n for n, _ in repeated_blocks(staged)] == ["0.blocks.0", "0.blocks.1", "1.blocks.0", "1.blocks.1"]
    # DINOv2's chunked layout pads each chunk with nn.Identity
    chunked = nn.ModuleList([nn.Sequential(_Block(), _Block(), nn.Identity(), nn.Identity()),
                             nn.Sequential(nn.Identity(), nn.Identity(), _Block(), _Block())])
    assert [n for n, _ in repeated_blocks(chunked)] == ["0.0", "0.1", "1.2", "1.3"]
    # an attention module with one projection is a layer, not a block
    assert repeated_blocks(nn.ModuleList([nn.MultiheadAttention(8, 2)])) == []


def test_adapted_layers_outside_the_blocks_are_reported():
    model = tiny_vit()
    inject(model, "lora", target_modules=["qkv", "head"], r=2)
    info = compile_model(model, {"backend": "eager"})
    assert info["adapted_layers_not_compiled"] == ["head"]


def test_uninstalled_backend_is_refused_up_front():
    import importlib.util
    if importlib.util.find_spec("tvm") is None:
        with pytest.raises(ValueError, match="needs the package 'tvm'"):
            normalise_options({"backend": "tvm"})
    assert normalise_options({"backend": "aot_eager"})["backend"] == "aot_eager"


def test_framework_compile_record_reset_and_static_image_shapes(monkeypatch, tmp_path):
    """Each job starts from an empty dynamo cache (a sweep's earlier jobs would fill the recompile
    limit); image tasks compile with static shapes, language models with automatic ones."""
    from randlora.models import build_model
    from randlora.training.build import build_datamodule, build_task, compile_task as _compile
    from tests.helpers import compose_cfg
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    seen = {}
    for model, extra in (("tiny_vit_digits", []), ("tiny_llama", ["data=commonsense_tiny"])):
        for enabled in ("true", "false"):
            cfg = compose_cfg([f"model={model}", *extra, f"compile.enabled={enabled}", "compile.backend=eager"], tmp_path)
            dm = build_datamodule(cfg)
            dm.setup("fit")
            task = build_task(cfg, build_model(cfg.model), dm)
            resets.clear()
            seen[model, enabled] = _compile(cfg, task, verbose=False)
            assert len(resets) == (1 if enabled == "true" else 0)
    assert seen["tiny_vit_digits", "true"]["dynamic"] is False
    assert seen["tiny_llama", "true"]["dynamic"] is None
    assert seen["tiny_vit_digits", "false"] == {"enabled": False}
    assert seen["tiny_vit_digits", "true"]["adapted_layers_not_compiled"] == 0


def _adapted(family, method, **opts):
    model = {"vit": tiny_vit, "clip": tiny_clip, "llama": tiny_llama}[family]().double()
    targets = {"vit": ["qkv", "fc1", "fc2"], "clip": ["in_proj", "c_fc", "c_proj"],
               "llama": ["q_proj", "v_proj", "up_proj", "down_proj"]}[family]
    if method in ("vera", "randlora", "nola"):
        opts.setdefault("seed", 3)
    inject(model, method, target_modules=targets, r=4, **opts)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move the adapters off their (identity) init, so the update matters
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _loss(family, model):
    if family == "vit":
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return model(x).square().mean()
    if family == "clip":
        img = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        txt = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))
        f_img, f_txt, scale = model(img, txt)
        return nn.functional.cross_entropy(scale * f_img @ f_txt.t(), torch.arange(3))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, labels=ids).loss


def _loss_and_grads(family, model):
    model.zero_grad(set_to_none=True)
    loss = _loss(family, model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


CASES = [("vit", "lora", {}), ("vit", "vera", {}), ("vit", "randlora", {"path": "factorised"}),
         ("vit", "randlora", {"path": "merged"}), ("vit", "dora", {}), ("vit", "nola", {}),
         ("clip", "randlora", {}), ("clip", "vera", {}), ("llama", "randlora", {}), ("llama", "lora", {})]


@pytest.mark.parametrize("family,method,opts", CASES, ids=[f"{f}-{m}-{o.get('path', '')}" for f, m, o in CASES])
def test_compiled_blocks_compute_what_eager_computes(family, method, opts):
    """Traced through dynamo and AOT autograd (the aot_eager backend: the same graphs inductor gets,
    run by eager kernels), in float64: the same loss and gradients, the same parameter names."""
    eager = _adapted(family, method, **opts)
    comp = copy.deepcopy(eager)
    keys = list(comp.state_dict())
    info = compile_model(comp, {"backend": "aot_eager", "fullgraph": True})  # a break would raise
    assert info["enabled"] and len(info["compiled"]) >= 1 and is_compiled(comp)
    assert list(comp.state_dict()) == keys  # in place: checkpoints and adapter files keep their names
    l0, g0 = _loss_and_grads(family, eager)
    l1, g1 = _loss_and_grads(family, comp)
    assert g0.keys() == g1.keys() and len(g0) > 0
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-12, msg=k)
    if method == "randlora":  # the path each layer ran is still recorded when compiled
        assert [lay.update.last_path for _, lay in adapted_layers(comp)] == \
               [lay.update.last_path for _, lay in adapted_layers(eager)]


def test_compiled_model_merges_and_saves_like_eager():
    model = _adapted("vit", "randlora")
    ref = copy.deepcopy(model)
    compile_model(model, {"backend": "aot_eager"})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.eval(), ref.eval()
    with torch.no_grad():
        before = model(x)
        torch.testing.assert_close(before, ref(x), rtol=1e-12, atol=1e-12)
        merge(model)  # merged weights change the traced code path: dynamo recompiles, not reuses
        merge(ref)
        merged = model(x)
        torch.testing.assert_close(merged, ref(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-7)  # dW is built in fp32
        unmerge(model)
        unmerge(ref)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)
    sd, sd_ref = adapter_state_dict(model), adapter_state_dict(ref)
    assert sd.keys() == sd_ref.keys()
    assert sd.pop("__adapter_meta__") == sd_ref.pop("__adapter_meta__")
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k


def test_training_steps_compiled_change_only_adapter_parameters():
    model = _adapted("vit", "randlora")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    compile_model(model, {"backend": "aot_eager"})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        _loss("vit", model).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trained[n]), n


@pytest.mark.slow
def test_inductor_training_matches_eager_fp32():
    """The real backend (inductor: generated C++ kernels on the CPU), fp32, three AdamW steps."""
    torch.manual_seed(0)
    eager = _adapted("vit", "randlora").float()
    comp = copy.deepcopy(eager)
    compile_model(comp, True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, m in (("eager", eager), ("inductor", comp)):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["inductor"] == pytest.approx(losses["eager"], rel=1e-4)
    for (n, p), q in zip(eager.named_parameters(), comp.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
def test_train_py_with_compile_writes_the_same_files(tmp_path):
    """`train.py compile.enabled=true`: the record says what was compiled; the adapter file has the
    same tensors (names and shapes) as an eager run's, and the run trains."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["compile.enabled=true"])):
        out = tmp_path / name
        proc = train_cli([*FAST, "trainer.limit_train_batches=4", f"paths.output_dir={out}", *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = results(out)
    c = runs["compiled"]["compile"]
    assert c["enabled"] and c["scope"] == "blocks" and c["classes"] == ["Block"] and c["modules"] >= 2
    assert runs["eager"]["compile"] == {"enabled": False}
    from safetensors.torch import load_file
    files = {k: load_file(tmp_path / k / "checkpoints" / "adapter.safetensors") for k in runs}
    assert {k: v.shape for k, v in files["compiled"].items()} == {k: v.shape for k, v in files["eager"].items()}
    for k in files["eager"]:  # same data order and init: fp32 reassociation only
        torch.testing.assert_close(files["compiled"][k], files["eager"][k], rtol=1e-3, atol=1e-4, msg=k)
    assert runs["compiled"]["metrics"]["train/loss"] == pytest.approx(runs["eager"]["metrics"]["train/loss"],
                                                                      rel=1e-3)


@pytest.mark.slow
def test_ddp_two_processes_compiled_equals_eager(tmp_path):
    """Compiled blocks inside Lightning's DDP wrapper (2 gloo processes): gradients still reach DDP's
    all-reduce, so the run ends where the eager DDP run ends."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["compile.enabled=true"])):
        proc = train_cli(["trainer=ddp_cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
                          "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", f"hydra.run.dir={tmp_path / name}",
                          *extra], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = results(tmp_path / name)
    assert runs["compiled"]["compile"]["enabled"] and not runs["eager"]["compile"]["enabled"]
    for k in ("train/loss", "val/loss", "test/loss"):
        assert runs["compiled"]["metrics"][k] == pytest.approx(runs["eager"]["metrics"][k], rel=1e-4), k


def test_cuda_graph_modes_open_a_new_graph_generation_every_step(monkeypatch, tmp_path):
    """With compile.mode=reduce-overhead each train / val / test step is marked for CUDA-graph trees
    (the CudaGraphSteps callback); without it, none is."""
    from randlora.models import build_model
    from randlora.train import _trainer
    from randlora.training.build import build_datamodule, build_task, compile_task as _compile
    from randlora.training.callbacks import CudaGraphSteps
    from tests.helpers import compose_cfg
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    for mode, expect in (("reduce-overhead", True), ("max-autotune", True), ("null", False)):
        cfg = compose_cfg(["compile.enabled=true", f"compile.mode={mode}", "compile.backend=inductor"], tmp_path)
        dm = build_datamodule(cfg)
        dm.setup("fit")
        task = build_task(cfg, build_model(cfg.model), dm)
        info = _compile(cfg, task, verbose=False)
        assert info["modules"] >= 2 and info["cudagraphs"] is expect
        trainer, _ = _trainer(cfg, task, tmp_path, [], {}, info)
        marks = [cb for cb in trainer.callbacks if isinstance(cb, CudaGraphSteps)]
        assert len(marks) == (1 if expect else 0)
        calls.clear()
        for cb in marks:
            cb.on_train_batch_start(trainer, task, None, 0), cb.on_validation_batch_start(trainer, task, None, 0)
            cb.on_test_batch_start(trainer, task, None, 0)
        assert len(calls) == (3 if expect else 0)
