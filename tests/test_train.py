"""The training framework end to end: composition, every method on the tiny models, resume,
DDP on CPU, offline behaviour and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from randlora.models import build_model
from randlora.train import run
from randlora.training.build import build_datamodule, build_task
from tests.helpers import FAST, ROOT, compose_cfg, results, train_cli

METHODS = ["full", "lora", "vera", "randlora", "randlora_sparse", "dora", "nola"]


def test_plain_train_equals_quickstart_experiment():
    from omegaconf import OmegaConf
    a = OmegaConf.to_container(compose_cfg([]), resolve=False)
    b = OmegaConf.to_container(compose_cfg(["experiment=quickstart"]), resolve=False)
    for key in ("model", "data", "adapter", "trainer", "logger", "optim", "task"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("model", ["clip_vitb32", "clip_vitl14", "clip_vith14", "dinov2_vitb14", "vit_b16",
                                   "llama3_8b", "qwen2_0_5b", "phi3_mini", "tiny_clip", "tiny_vit", "tiny_llama"])
def test_every_model_config_composes(model):
    cfg = compose_cfg([f"model={model}"])
    assert cfg.model.targets and cfg.task.kind == cfg.model.task


def test_every_data_config_composes():
    names = sorted(p.stem for p in (ROOT / "configs" / "data").glob("*.yaml"))
    paper = ["caltech101", "caltech256", "cars", "cifar10", "cifar100", "country211", "cub200", "dtd", "eurosat",
             "fgvc_aircraft", "flowers102", "food101", "gtsrb", "imagenet", "mnist", "oxford_pets", "pascal_voc",
             "resisc45", "stl10", "sun397", "svhn", "ucf101"]
    assert set(paper) <= set(names)
    for n in paper:
        cfg = compose_cfg([f"data={n}", "model=clip_vitb32"])
        assert cfg.data.num_classes > 1 and cfg.data.epochs > 0 and (cfg.data.hub_id or cfg.data.source != "hf")


def test_used_by_command_builds_clip_vitb32_on_meta_with_paper_counts():
    """`adapter=randlora model=clip_vitb32 data=food101` composes; the architecture built on the meta
    device gets the paper's parameter counts (RandLoRA-6 ~5.2M vs LoRA-32 ~6.9M, randlora-method §1.7)."""
    import open_clip

    from randlora.adapters import count_trainable, inject
    counts = {}
    for method, r in (("randlora", 6), ("lora", 32)):
        cfg = compose_cfg([f"adapter={method}", "model=clip_vitb32", "data=food101"])
        assert cfg.adapter.method == method and cfg.data.num_classes == 101 and cfg.data.epochs == 15
        with torch.device("meta"):
            model = open_clip.CLIP(**open_clip.get_model_config(cfg.model.arch))
        inject(model, method, target_modules=list(cfg.model.targets), r=r)
        counts[method] = count_trainable(model)
    assert 5.0e6 < counts["randlora"] < 5.4e6
    assert 6.7e6 < counts["lora"] < 7.1e6


def test_cfg_job_prints_composed_config():
    out = train_cli(["adapter=randlora", "model=clip_vitb32", "data=food101", "--cfg", "job"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "method: randlora" in out.stdout and "arch: ViT-B-32" in out.stdout


@pytest.mark.parametrize("method", METHODS)
def test_tiny_clip_digits_trains_and_only_expected_params_change(method, tmp_path):
    cfg = compose_cfg(["model=tiny_clip", "data=digits", f"adapter={method}", *FAST], tmp_path)
    from omegaconf import open_dict
    with open_dict(cfg):
        cfg.optim.lr = 1e-3
    import lightning as L
    dm = build_datamodule(cfg)
    dm.setup("fit")
    task = build_task(cfg, build_model(cfg.model), dm)
    before = {k: v.detach().clone() for k, v in task.net.state_dict().items()}
    trainable = {n for n, p in task.net.named_parameters() if p.requires_grad}
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    changed = {k for k, v in task.net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert changed <= trainable
    if method == "full":
        assert len(changed) > 20
    else:
        assert all(".update." not in k or k.split(".update.")[0] for k in changed)
        assert all(".update." in k for k in changed), changed - {k for k in changed if ".update." in k}
        # both towers' attention in_proj adapters trained
        assert any(k.startswith("visual.") and k.split(".update.")[0].endswith(".attn") for k in changed)
        assert any(k.startswith("transformer.") and k.split(".update.")[0].endswith(".attn") for k in changed)
    loss = trainer.callback_metrics["train/loss_step"]
    assert math.isfinite(float(loss))


def test_run_writes_results_checkpoints_and_adapter(tmp_path):
    cfg = compose_cfg(["model=tiny_vit", "adapter=lora", "adapter.r=4", *FAST], tmp_path)
    res = run(cfg)
    assert res["status"] == "completed"
    on_disk = results(tmp_path)
    assert on_disk["status"] == "completed" and on_disk["r"] == 4
    p = on_disk["params"]
    assert p["trainable"] == p["adapter"] + 64 * 10 + 10  # adapters + head
    assert 0 < p["ratio"] < 1 and p["lora_equivalent_rank"] == pytest.approx(4.0)
    assert 0 <= on_disk["metrics"]["test/acc"] <= 1 and "val/acc" in on_disk["metrics"]
    assert on_disk["perf"]["samples_per_s"] > 0 and on_disk["perf"]["peak_memory_mb"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "adapter.safetensors").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(".update." in k or k.startswith("head.") for k in
               [k.removeprefix("net.") for k in ckpt["state_dict"]]), "frozen weights leaked into the checkpoint"


def test_randlora_bases_storage_follows_training_precision(tmp_path):
    dtype = lambda *o: compose_cfg(["adapter=randlora", *o]).adapter.bases_dtype
    assert dtype() == "float32" and dtype("trainer=gpu") == "bfloat16"
    assert dtype("trainer.precision=bf16-true") == "bfloat16" and dtype("trainer.precision=16-mixed") == "float16"
    assert dtype("trainer=gpu", "adapter.bases_dtype=float32") == "float32"  # an explicit choice wins
    assert compose_cfg(["adapter=randlora_sparse", "trainer=gpu"]).adapter.bases_dtype == "bfloat16"
    assert compose_cfg(["adapter=paper/randlora10", "trainer=gpu"]).adapter.bases_dtype == "bfloat16"
    # a bf16-mixed run (CPU autocast) stores the bases in bf16 and its adapter file rebuilds exactly those
    cfg = compose_cfg(["model=tiny_vit", "adapter=randlora", "trainer.precision=bf16-mixed", *FAST], tmp_path)
    res = run(cfg)
    assert res["status"] == "completed" and math.isfinite(res["metrics"]["test/loss"])
    assert results(tmp_path)["config"]["adapter"]["bases_dtype"] == "bfloat16"  # results.json: resolved config
    assert results(tmp_path)["config"]["adapter"]["seed"] == cfg.seed
    from randlora.adapters import load_adapter, shared_bases
    from randlora.adapters import adapted_layers
    from randlora.adapters.randlora import make_randlora_bases
    from randlora.adapters import bases_checksum
    from randlora.tasks.classification import Classifier
    bundle = build_model(cfg.model)
    net = load_adapter(Classifier(bundle.backbone, bundle.feature_dim, 10),
                       tmp_path / "checkpoints" / "adapter.safetensors")
    bases = shared_bases(net)
    assert bases.storage_dtype == torch.bfloat16 and bases.B.dtype == torch.bfloat16
    assert bases_checksum(net) == res["bases_checksum"]
    shapes = [(layer.out_features, layer.in_features) for _, layer in adapted_layers(net)]
    fp32 = make_randlora_bases(shapes, int(cfg.adapter.r), int(cfg.seed))  # the float32 draw, rounded once
    for name in ("A", "B"):
        assert torch.equal(getattr(bases, name), getattr(fp32, name).bfloat16())
    # evaluating it at another precision names the setting that changed the bases, before anything is
    # written: the finished run's results.json stays as it was (a resume keeps the run's precision)
    before = (tmp_path / "results.json").read_text()
    ck = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="stored as bfloat16, this run stores them as float32 .* "
                                         "adapter.bases_dtype=bfloat16"):
        run(compose_cfg(["model=tiny_vit", "adapter=randlora", *FAST, "train=false", f"ckpt_path={ck}"],
                        tmp_path / "again"))
    assert (tmp_path / "results.json").read_text() == before
    res = run(compose_cfg(["model=tiny_vit", "adapter=randlora", *FAST, "adapter.bases_dtype=bfloat16",
                           "train=false", f"ckpt_path={ck}"], tmp_path / "again2"))
    assert res["status"] == "completed"


def test_train_false_with_a_checkpoint_tests_that_checkpoint(tmp_path):
    """train=false ckpt_path=... evaluates the checkpoint's weights (it once tested the untrained model:
    chance accuracy); train=false resume=... is refused and leaves the run's results as they were."""
    first = tmp_path / "a"
    res = run(compose_cfg(["model=tiny_vit", "adapter=randlora", *FAST], first))
    ck = first / "checkpoints" / "last.ckpt"
    ev = run(compose_cfg(["model=tiny_vit", "adapter=randlora", *FAST, "train=false", f"ckpt_path={ck}"],
                         tmp_path / "b"))
    assert ev["metrics"]["test/acc"] == res["metrics"]["test/acc"]
    assert ev["metrics"]["test/loss"] == pytest.approx(res["metrics"]["test/loss"], rel=1e-6)
    untrained = run(compose_cfg(["model=tiny_vit", "adapter=randlora", *FAST, "train=false"], tmp_path / "c"))
    assert untrained["metrics"]["test/loss"] != pytest.approx(res["metrics"]["test/loss"], rel=1e-3)
    before = (first / "results.json").read_bytes()
    with pytest.raises(ValueError, match="train=false with resume=.* use ckpt_path="):
        run(compose_cfg(["model=tiny_vit", "adapter=randlora", *FAST, "train=false", f"resume={first}"],
                        tmp_path / "d"))
    assert (first / "results.json").read_bytes() == before


def test_budget_picks_rank(tmp_path):
    cfg = compose_cfg(["model=tiny_vit", "adapter=randlora", "adapter.budget=20000", *FAST], tmp_path)
    res = run(cfg)
    from randlora.adapters import match_budget
    assert res["r"] == match_budget(build_model(cfg.model).backbone, "randlora", 20000,
                                    target_modules=list(cfg.model.targets))["r"]
    assert abs(res["params"]["adapter"] - 20000) / 20000 < 0.25


@pytest.mark.parametrize("change,msg,setting", [
    (["adapter.r=3"], "another adapter: options.r: model has 3, file has 6", "adapter.r: 3 here, 6 in the run"),
    (["adapter.alpha=40"], "another adapter: options.alpha: model has 40, file has 10.0",  # scaling 4x
     "adapter.alpha: 40 here, 10.0 in the run"),
    (["adapter=lora"], "another adapter: method: model has 'lora', file has 'randlora'",
     "adapter.method: 'lora' here, 'randlora' in the run"),
    (["adapter.seed=5"], "other random bases", "adapter.seed: 5 here, 42 in the run"),
])
def test_another_adapter_is_refused_and_keeps_the_run(change, msg, setting, tmp_path):
    """Evaluating a checkpoint with another adapter names the adapter difference; resuming with it is
    refused by the run's recorded settings. Neither writes into the run."""
    run(compose_cfg(["model=tiny_vit", "adapter=randlora", *FAST], tmp_path))
    files = [tmp_path / "results.json", tmp_path / "checkpoints" / "last.ckpt"]
    before = {p.name: p.read_bytes() for p in files}
    with pytest.raises(ValueError, match=msg):
        run(compose_cfg(["model=tiny_vit", "adapter=randlora", *FAST, *change, "train=false",
                         f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"], tmp_path / "eval"))
    with pytest.raises(ValueError, match=setting):
        run(compose_cfg(["model=tiny_vit", "adapter=randlora", *FAST, *change, f"resume={tmp_path}"],
                        tmp_path / "other"))
    assert {p.name: p.read_bytes() for p in files} == before
    assert results(tmp_path)["status"] == "completed"


def test_resume_from_run_folder_continues(tmp_path, monkeypatch):
    from randlora.training.callbacks import KillAtStep

    def stop(self, trainer, *_):
        if trainer.global_step >= self.step:
            raise RuntimeError("interrupted")
    monkeypatch.setattr(KillAtStep, "on_train_batch_end", stop)
    over = ["model=tiny_vit", "adapter=randlora", *[o for o in FAST if "max_epochs" not in o], "trainer.max_epochs=2"]
    first = tmp_path / "a"
    with pytest.raises(RuntimeError, match="interrupted"):
        run(compose_cfg([*over, "callbacks.kill_at_step=4"], first))
    ck = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 3
    second = tmp_path / "b"
    res = run(compose_cfg([*over, f"resume={first}"], second))
    # resume=<run dir> continues inside that run's folder
    assert res["run_dir"] == str(first.resolve()) and not second.exists()
    ck2 = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert res["status"] == "completed" and ck2["epoch"] == ck["epoch"] + 1 and ck2["global_step"] == 6


@pytest.mark.slow
def test_randlora_compute_paths_are_reported(tmp_path, capsys):
    """Which RandLoRA path each layer ran goes to the log and results.json; CLIP's attention in_proj
    layers run RandLoRA's own paths (the self-attention path), never the materialised fallback."""
    cfg = compose_cfg(["model=tiny_clip", "data=digits", "adapter=randlora", *FAST], tmp_path)
    res = run(cfg)
    assert res["status"] == "completed"
    paths = results(tmp_path)["perf"]["compute_paths"]
    n_layers = sum(paths["first_step"].values())  # every adapted layer ran and is counted once
    assert set(paths["first_step"]) <= {"factorised", "merged"} and n_layers > 0
    assert set(paths["last_step"]) <= {"factorised", "merged"}
    assert sum(paths["last_step"].values()) == n_layers
    out = capsys.readouterr().out
    assert "compute paths at the first training step: " in out and "compute paths      " in out
    lora = run(compose_cfg(["model=tiny_clip", "data=digits", "adapter=lora", *FAST], tmp_path / "lora"))
    assert "compute_paths" not in lora["perf"]  # a method without a path choice reports none


def test_default_command_runs_quickstart(tmp_path):
    out = train_cli([f"hydra.run.dir={tmp_path}"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test accuracy" in out.stdout and "trainable params" in out.stdout
    res = results(tmp_path)
    assert res["status"] == "completed" and res["model"] == "tiny_vit_digits"
    assert res["metrics"]["test/acc"] > 0.6  # the pretrained backbone adapts to all ten digits


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path):
    out = train_cli(["model=tiny_vit", "adapter=randlora", "trainer=ddp_cpu", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                     f"hydra.run.dir={tmp_path}"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = results(tmp_path)
    assert res["status"] == "completed" and res["bases_checksum"]
    assert "val/acc" in res["metrics"] and "test/acc" in res["metrics"]
    assert "MEMBER: 2/2" in out.stderr + out.stdout  # two ranks joined the process group
    # test accuracy is a multiple of 1/|test set| (no sample counted twice across the two shards)
    dm = build_datamodule(compose_cfg(["model=tiny_vit"]))
    dm.setup()
    n_test = len(dm.test_set)
    assert abs(res["metrics"]["test/acc"] * n_test - round(res["metrics"]["test/acc"] * n_test)) < 1e-3


@pytest.mark.slow
def test_ddp_evaluation_loss_is_the_mean_over_every_sample(tmp_path):
    """359 test images on 2 ranks (180 / 179) in batches of 7: the test loss equals the one-process
    value. Logging batch means with sync_dist averaged the integer sample counter (359 / 2 -> 179)
    and gave 2.5952 for 2.5880."""
    args = ["model=tiny_vit", "adapter=randlora", "train=false", "data.eval_batch_size=7"]
    out = train_cli([*args, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one = run(compose_cfg([*args, "trainer=cpu"], tmp_path / "one"))["metrics"]
    two = results(tmp_path / "ddp")["metrics"]
    assert two["test/acc"] == pytest.approx(one["test/acc"], abs=1e-9)
    assert two["test/loss"] == pytest.approx(one["test/loss"], rel=1e-5)


# ------------------------------------------------------------------------------- bad input / offline
@pytest.mark.parametrize("args,msg", [
    (["adapter=dora_nope"], "Could not find 'adapter/dora_nope'"),
    (["adapter.r=0"], "r must be a positive integer"),
    (["data.shots=0"], "must be a positive integer (images per class)"),  # k above a class's size uses all (paper)
    (["model=clip_vitb32", "data=digits"], "weights of clip_vitb32 (open_clip ViT-B-32 tag 'openai'"),
])
def test_bad_input_one_clear_message(args, msg, tmp_path):
    out = train_cli([*args, "trainer=cpu", f"hydra.run.dir={tmp_path}"], timeout=300)
    assert out.returncode != 0
    assert msg in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_dataset_without_labels_is_refused(tmp_path):
    import datasets
    from PIL import Image
    img = Image.new("RGB", (8, 8))
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"image": [img] * 4, "caption": ["x"] * 4})
                               for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = compose_cfg(["model=tiny_vit", "data=cifar10", f"data.path={tmp_path / 'ds'}", *FAST], tmp_path / "run")
    with pytest.raises(ValueError, match="no label column 'label'"):
        run(cfg)
    assert results(tmp_path / "run")["status"] == "failed"


def test_hf_save_to_disk_and_image_folder_sources(tmp_path):
    import datasets
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()) for _ in range(12)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "owl"])})
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(12)]},
                                                             features=feats) for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "ds"))
    for split in ("train", "test"):
        for i, im in enumerate(imgs):
            d = tmp_path / "folder" / split / ["cat", "dog", "owl"][i % 3]
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{i}.png")
    for extra in ([f"data.path={tmp_path / 'ds'}", "data.num_classes=3"],
                  [f"data.path={tmp_path / 'folder'}", "data.source=imagefolder", "data.num_classes=3"]):
        cfg = compose_cfg(["model=tiny_clip", "data=cifar10", "data.image_key=image", "data.label_key=label",
                           "data.num_workers=0", "data.batch_size=4", "data.val_fraction=0.5", *extra, *FAST],
                          tmp_path / "run")
        dm = build_datamodule(cfg)
        dm.setup()
        assert dm.class_names == ["cat", "dog", "owl"] and dm.num_classes == 3
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape[1:] == (3, 16, 16) and y.max() < 3
        # the validation items held out of train are read with the evaluation transform, not cifar10's
        # random crops and flips (which the training items still get)
        assert dm.augment == "clip"
        torch.manual_seed(0)
        assert len(dm.val_set) == 6
        assert all(torch.equal(dm.val_set[i][0], dm.val_set[i][0]) for i in range(len(dm.val_set)))
        assert any(not torch.equal(dm.train_set[i][0], dm.train_set[i][0]) for i in range(len(dm.train_set)))
    # an image folder whose test split lacks a class folder would shift the labels after it: refused,
    # and an empty folder for that class is the fix
    import shutil

    from randlora.data.images import DataConfigError
    shutil.rmtree(tmp_path / "folder" / "test" / "dog")
    folder = [f"data.path={tmp_path / 'folder'}", "data.source=imagefolder", "data.num_classes=3"]
    cfg = compose_cfg(["model=tiny_clip", "data=cifar10", "data.num_workers=0", "data.val_fraction=0.5", *folder,
                       *FAST], tmp_path / "r2")
    with pytest.raises(DataConfigError, match=r"has classes \['cat', 'owl'\] but 'train' has \['cat', 'dog', 'owl'\]"):
        build_datamodule(cfg).setup()
    (tmp_path / "folder" / "test" / "dog").mkdir()
    dm = build_datamodule(cfg)
    dm.setup()
    assert sorted(set(dm.test_set.labels.tolist())) == [0, 2]  # owl keeps label 2


def test_hub_dataset_offline_message(tmp_path):
    cfg = compose_cfg(["model=tiny_vit", "data=food101", *FAST], tmp_path)
    from randlora.models import SourceUnavailableError
    with pytest.raises(SourceUnavailableError, match=r"data=food101: hub dataset 'ethz/food101' is not in the local Hugging Face cache.*data.path="):
        run(cfg)


def test_few_shot_sampling_is_stable_across_methods():
    from randlora.data.images import few_shot_indices
    labels = torch.arange(10).repeat(20)
    a = few_shot_indices(labels, 4, seed=3)
    b = few_shot_indices(labels, 4, seed=3)
    assert a == b and len(a) == 40
    assert sorted(labels[a].bincount().tolist()) == [4] * 10
    assert few_shot_indices(labels, 4, seed=4) != a
    dm1 = build_datamodule(compose_cfg(["adapter=lora", "data.shots=5"]))
    dm2 = build_datamodule(compose_cfg(["adapter=randlora", "model=tiny_clip", "data.shots=5"]))
    dm1.setup(), dm2.setup()
    assert dm1.train_set.indices == dm2.train_set.indices and len(dm1.train_set) == 50


def test_clip_vision_only_variant_trains_image_tower_only(tmp_path):
    res = run(compose_cfg(["model=tiny_clip", "adapter=lora", "task.text_tower=frozen", *FAST], tmp_path))
    assert res["status"] == "completed" and 0 <= res["metrics"]["test/acc"] <= 1
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "checkpoints" / "adapter.safetensors")).keys()
    assert keys and all(k.startswith("visual.") for k in keys)
    # full fine-tuning in that variant trains (and counts) the image tower and the scale only
    cfg = compose_cfg(["model=tiny_clip", "adapter=full", "task.text_tower=frozen", *FAST], tmp_path / "full")
    dm = build_datamodule(cfg)
    dm.setup()
    task = build_task(cfg, build_model(cfg.model), dm)
    trained = {n for n, p in task.net.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in task.net.named_parameters() if n.startswith("visual.")} | {"logit_scale"}
    from randlora.training.build import ParameterCounts
    assert ParameterCounts(task).summary()["trainable"] == sum(p.numel() for p in task.net.parameters() if p.requires_grad)


@pytest.mark.parametrize("loss,scale", [("in_batch_official", "raw"), ("all_classes", "exp")])
def test_clip_loss_variants(loss, scale, tmp_path):
    res = run(compose_cfg(["model=tiny_clip", "adapter=randlora", f"task.loss={loss}", f"task.logit_scale={scale}",
                           *FAST], tmp_path))
    assert res["status"] == "completed" and math.isfinite(res["metrics"]["train/loss_epoch"])
