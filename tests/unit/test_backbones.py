"""Backbones: one registry for specs and factory, the uniform interface (maps, tokens, attention), ViT training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
import torchvision
from pydantic import ValidationError

from shared.specs import DistillSpec, EvalSpec, SslTrainSpec
from shared.specs.vision import BACKBONES as TABLE
from shared.specs.vision import Backbone, image_size_problem
from workers.vision import backbones
from workers.vision.backbones import create_backbone, load_backbone

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
JOB = "00000000-0000-0000-0000-000000000001"


# --- one registry ---------------------------------------------------------------------------------------
def test_spec_table_literal_and_factory_agree() -> None:
    assert tuple(TABLE) == get_args(Backbone) == backbones.BACKBONES
    assert {n for n, i in TABLE.items() if i.family == "resnet"} == set(backbones._RESNETS)
    with torch.device("meta"):  # builds every architecture without allocating or initialising weights
        for name, info in TABLE.items():
            model = create_backbone(name)
            assert (model.name, model.family, model.out_dim) == (name, info.family, info.feature_dim), name
            if info.vit:
                assert model.patch_embed.patch_size == (info.vit.patch_size,) * 2
                assert (len(model.blocks), model.blocks[0].attn.num_heads) == (info.vit.depth, info.vit.heads)


def test_specs_import_without_torch() -> None:
    code = "import sys, shared.specs, shared.specs.vision; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_spec_fields_validate_against_the_registry() -> None:
    base = {"kind": "ssl-train", "method": "msf", "batch_size": 32}
    ok = SslTrainSpec.model_validate({**base, "backbone": "vit_micro_p4", "image_size": 16})
    assert ok.backbone == "vit_micro_p4"
    with pytest.raises(ValidationError, match=r"backbone[\s\S]*multiple of its patch size 4, got 30"):
        SslTrainSpec.model_validate({**base, "backbone": "vit_micro_p4", "image_size": 30})
    with pytest.raises(ValidationError, match="takes image_size 16-64 px.*got 128.*try vit_micro_p8"):
        SslTrainSpec.model_validate({**base, "backbone": "vit_micro_p4", "image_size": 128})
    with pytest.raises(ValidationError, match=r"stem[\s\S]*ResNets only"):
        SslTrainSpec.model_validate({**base, "backbone": "vit_micro_p4", "stem": "imagenet"})
    with pytest.raises(ValidationError, match="vit_small_p16"):  # an unknown name lists the known ones
        SslTrainSpec.model_validate({**base, "backbone": "vit_huge"})
    with pytest.raises(ValidationError, match="multiple of its patch size 16"):
        DistillSpec.model_validate({"kind": "distill", "teachers": [f"job:{JOB}"], "backbone": "vit_small_p16",
                                    "image_size": 100, "batch_size": 32})
    assert image_size_problem("resnet18", 28) is None
    with pytest.raises(ValueError, match="unknown backbone 'nope'; choose one of: resnet10"):
        create_backbone("nope")
    # eval reads the backbone from the checkpoint; its spec has no backbone field to get wrong
    assert "backbone" not in EvalSpec.model_fields


# --- ResNets: unchanged checkpoints ------------------------------------------------------------------------
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_resnet_is_torchvision_keys_and_seeded_init(stem: str) -> None:
    torch.manual_seed(3)
    ours = create_backbone("resnet18", stem=stem)
    torch.manual_seed(3)
    ref = torchvision.models.resnet18()
    ref_state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert set(ours.state_dict()) == set(ref_state)
    if stem == "imagenet":  # the same construction as torchvision's builder: identical seeded weights
        assert all(torch.equal(v, ref_state[k]) for k, v in ours.state_dict().items())
    else:
        assert load_backbone(create_backbone("resnet18", stem="cifar"), backbone_sd(ours)) == len(ref_state)


def backbone_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return backbones.backbone_state_dict(model)


def test_a_plain_torchvision_resnet_state_dict_still_loads() -> None:
    ref = torchvision.models.resnet50()
    state = {f"module.{k}": v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    model = create_backbone("resnet50", stem="imagenet")
    assert load_backbone(model, state) == len(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))


def test_resnet_extract_gives_per_stage_maps_and_the_same_pooled_feature() -> None:
    model = create_backbone("resnet18", stem="cifar").eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model.extract(x)
    assert [tuple(m.shape) for m in out.maps] == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]
    assert out.tokens is None and out.attentions is None
    torch.testing.assert_close(out.pooled, model(x))
    assert model.cam_layer is model.layer4
    (grad,) = torch.autograd.grad(out.pooled.sum(), out.maps[-1])  # Grad-CAM differentiates w.r.t. layer4
    assert grad.shape == out.maps[-1].shape and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no attention"):
        model.extract(x, attentions=True)


# --- ViT --------------------------------------------------------------------------------------------------
def test_vit_extract_tokens_maps_and_attention_probabilities() -> None:
    torch.manual_seed(0)
    model = create_backbone("vit_micro_p4").eval()
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    fused = [blk.attn.fused_attn for blk in model.blocks]
    out = model.extract(x, attentions=True)
    T = 1 + 8 * 8  # CLS + 8x8 patches of 4 px
    assert out.pooled.shape == (3, 64) and len(out.tokens or []) == len(out.attentions or []) == len(out.maps) == 4
    assert all(t.shape == (3, T, 64) for t in out.tokens or [])
    assert all(m.shape == (3, 64, 8, 8) for m in out.maps)
    attn = out.attentions or []
    assert all(a.shape == (3, 4, T, T) for a in attn)
    for a in attn:  # probabilities: non-negative rows that sum to one
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, T))
    # the same pooled feature as the (fused-attention) forward; the explicit path was only for this call
    torch.testing.assert_close(out.pooled, model(x), rtol=1e-4, atol=1e-5)
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    # the maps are the patch tokens folded onto their grid (row-major), CLS dropped
    torch.testing.assert_close(out.maps[1][:, :, 2, 5], out.tokens[1][:, 1 + 2 * 8 + 5])  # type: ignore[index]
    # block 0's probabilities are softmax(q k^T / sqrt(d)) of its own qkv projection
    seen: list[torch.Tensor] = []
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    blk = model.blocks[0].attn
    q, k, _ = blk.qkv(seen[0]).reshape(3, T, 3, 4, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(attn[0], ((q @ k.transpose(-2, -1)) * 16 ** -0.5).softmax(-1), rtol=1e-4, atol=1e-5)
    # attention-gradient rollout needs d(score)/d(attention) of every block
    grads = torch.autograd.grad(out.pooled[:, 0].sum(), attn)
    assert all(g.shape == (3, 4, T, T) and g.abs().sum() > 0 for g in grads)
    assert model.cam_layer is model.blocks[-1].norm1
    assert model.extract(x).attentions is None
    # Grad-CAM on a ViT (PatchSearch): hook cam_layer, fold its tokens onto the patch grid
    cam: list[torch.Tensor] = []
    handle = model.cam_layer.register_forward_hook(lambda _m, _in, o: cam.append(o))
    pooled = model(x)
    handle.remove()
    # one feature, not pooled.sum(): the sum of a fresh LayerNorm's outputs is constant (weight 1, bias 0), so its
    # gradient is rounding noise - exactly zero on some CPUs
    (g,) = torch.autograd.grad(pooled[:, 0].sum(), cam[0])
    folded, folded_g = model.to_map(cam[0], (32, 32)), model.to_map(g, (32, 32))
    assert folded.shape == folded_g.shape == (3, 64, 8, 8) and folded_g.abs().sum() > 0
    torch.testing.assert_close(folded[:, :, 7, 0], cam[0][:, 1 + 7 * 8])


def test_vit_takes_other_sizes_and_rejects_non_multiples() -> None:
    model = create_backbone("vit_micro_p4").eval()
    n_pos = model.pos_embed.shape[1]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 64)  # position embedding resampled to 4x4
        out = model.extract(torch.randn(1, 3, 48, 48), attentions=True)
    assert out.maps[-1].shape == (1, 64, 12, 12) and (out.attentions or [])[0].shape == (1, 4, 145, 145)
    assert model.pos_embed.shape[1] == n_pos  # the stored tensor (and so a checkpoint) keeps the native grid
    with pytest.raises(ValueError, match="multiples of its patch size 4"):
        model(torch.randn(1, 3, 30, 30))


def test_vit_state_dict_roundtrip_and_wrapper_prefix() -> None:
    torch.manual_seed(1)
    a = create_backbone("vit_micro_p2").eval()
    torch.manual_seed(2)
    b = create_backbone("vit_micro_p2").eval()
    state = {f"module.{k}": v for k, v in backbones.backbone_state_dict(a).items()}
    assert load_backbone(b, state) == len(a.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="wrong shape"):
        load_backbone(create_backbone("vit_micro_p4"), backbones.backbone_state_dict(a))


# --- ViT through ssl-train and eval ---------------------------------------------------------------------
VIT_SPEC: dict[str, Any] = {
    "kind": "ssl-train", "method": "msf", "dataset": "builtin://shapes", "limit_train": 64, "limit_test": 32,
    "image_size": 16, "backbone": "vit_micro_p4", "batch_size": 32, "bank_size": 64, "epochs": 1,
    "knn_k": [1, 5], "proj_hidden_dim": 64, "proj_dim": 16,
}


def test_msf_trains_a_vit_for_an_epoch_and_eval_and_distill_read_its_checkpoint(tmp_path: Path) -> None:
    from shared.data import load_dataset
    from workers.evaluator.run import evaluate
    from workers.runtime.local import LocalContext
    from workers.ssl_trainer.train import train
    from workers.vision.checkpoints import load_encoder

    spec = SslTrainSpec.model_validate(VIT_SPEC)
    data = load_dataset({"uri": spec.dataset}, image_size=16, limit_train=64, limit_test=32)
    ctx = LocalContext(spec, checkpoint_dir=tmp_path)
    result = train(spec, data, ctx=ctx)
    assert result["epochs"] == 1 and 0 < result["final_loss"] < 4 and 0 <= result["knn_top1_k1"] <= 1
    final = Path(ctx.checkpoints[-1]["path"])
    state = torch.load(final, weights_only=False)
    assert state["meta"]["backbone"] == "vit_micro_p4" and state["meta"]["out_dim"] == 64
    assert "pos_embed" in state["backbone"] and "blocks.3.attn.qkv.weight" in state["backbone"]  # timm keys
    assert all(torch.equal(state["model"][f"online.backbone.{k}"], v) for k, v in state["backbone"].items())

    encoder, meta = load_encoder(final)
    assert meta["feature_dim"] == 64 and encoder.backbone.family == "vit"
    eval_spec = EvalSpec.model_validate({
        "kind": "eval", "checkpoint": f"job:{JOB}", "limit_train": 64, "limit_test": 32, "protocols": ["knn", "linear"],
        "knn_k": [1, 5], "linear": {"epochs": 1, "batch_size": 32, "milestones": [1], "augment": False}})
    scores = evaluate(eval_spec, data, final, ctx=LocalContext(eval_spec, checkpoint_dir=tmp_path / "eval"))
    assert scores["knn_top1_k1"] == pytest.approx(result["knn_top1_k1"])  # same features, same k-NN
    assert 0 <= scores["linear_top1"] <= 1

    # ... and distill reads it as a teacher for a ViT student
    from workers.distiller.train import train as distill

    dspec = DistillSpec.model_validate({
        "kind": "distill", "method": "simreg", "teachers": [f"job:{JOB}"], "dataset": spec.dataset, "limit_train": 64,
        "limit_test": 32, "image_size": 16, "backbone": "vit_micro_p4", "batch_size": 32, "epochs": 1, "knn_k": [1]})
    dctx = LocalContext(dspec, checkpoint_dir=tmp_path / "distill")
    distilled = distill(dspec, data, [final], ctx=dctx)
    assert distilled["teacher0_knn_top1_k1"] == pytest.approx(result["knn_top1_k1"]) and distilled["final_loss"] > 0
    student = torch.load(dctx.checkpoints[-1]["path"], weights_only=False)
    assert student["meta"]["backbone"] == "vit_micro_p4" and "cls_token" in student["backbone"]


@pytest.mark.gpu
def test_vit_attention_on_cuda_under_autocast() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = create_backbone("vit_small_p16").cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.extract(x, attentions=True)
        fused = model(x)
    attn = out.attentions or []
    assert len(attn) == 12 and attn[0].shape == (2, 6, 197, 197)
    torch.testing.assert_close(attn[-1].float().sum(-1), torch.ones(2, 6, 197, device="cuda"), atol=2e-2, rtol=0)
    torch.testing.assert_close(out.pooled.float(), fused.float(), atol=5e-2, rtol=5e-2)
