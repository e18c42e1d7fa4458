"""lit_ptq/models/timm_models.py: timm's DeiT, ViT and Swin under the registry, their checkpoints.

Nothing here touches the network: every ``pretrained=True`` test replaces timm's download
functions, and an autouse fixture refuses socket connections in case one is missed. Models
are built small (depth and width overrides, small inputs) except DeiT-Ti and Swin-T, built
once each at their real size; ViT-L and Swin-B are only built on the meta device.
"""

from __future__ import annotations

import re
import socket
import urllib.error
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn as nn
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from lit_ptq.errors import CheckpointError, ConfigError
from lit_ptq.models.timm_models import CROP_PCT
from lit_ptq.models import WEIGHT_TAGS, EvalConfig, convert_swin_state_dict, create_model, list_models, model_entry

FQVIT_MODELS = [
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
]
EXTRA_MODELS = ["deit_base_patch16_384", "vit_small_patch16_224", "vit_tiny_patch16_224"]

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# The weight files FQ-ViT's models/vit_quant.py and models/swin_quant.py download.
FQVIT_URLS = {
    "deit_tiny_patch16_224": "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
    "deit_small_patch16_224": "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
    "deit_base_patch16_224": "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
    "vit_base_patch16_224": "https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-"
    "wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "vit_large_patch16_224": "https://storage.googleapis.com/vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-"
    "wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "swin_tiny_patch4_window7_224": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_tiny_patch4_window7_224.pth",
    "swin_small_patch4_window7_224": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_small_patch4_window7_224.pth",
    "swin_base_patch4_window7_224": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_base_patch4_window7_224.pth",
}

# name -> (timm class, parameters, state-dict keys, input side, mean/std, crop_pct)
ARCHITECTURES = {
    "deit_tiny_patch16_224": (VisionTransformer, 5_717_416, 152, 224, IMAGENET, 0.875),
    "deit_small_patch16_224": (VisionTransformer, 22_050_664, 152, 224, IMAGENET, 0.875),
    "deit_base_patch16_224": (VisionTransformer, 86_567_656, 152, 224, IMAGENET, 0.875),
    "deit_base_patch16_384": (VisionTransformer, 86_859_496, 152, 384, IMAGENET, 1.0),
    "vit_tiny_patch16_224": (VisionTransformer, 5_717_416, 152, 224, INCEPTION, 0.9),
    "vit_small_patch16_224": (VisionTransformer, 22_050_664, 152, 224, INCEPTION, 0.9),
    "vit_base_patch16_224": (VisionTransformer, 86_567_656, 152, 224, INCEPTION, 0.9),
    "vit_large_patch16_224": (VisionTransformer, 304_326_632, 296, 224, INCEPTION, 0.9),
    "swin_tiny_patch4_window7_224": (SwinTransformer, 28_288_354, 173, 224, IMAGENET, 0.9),
    "swin_small_patch4_window7_224": (SwinTransformer, 49_606_258, 329, 224, IMAGENET, 0.9),
    "swin_base_patch4_window7_224": (SwinTransformer, 87_768_224, 329, 224, IMAGENET, 0.9),
}

# Small configurations for CPU tests (overrides of timm's model arguments).
SMALL_VIT: dict[str, Any] = dict(img_size=32, depth=2, embed_dim=32, num_heads=2)
SMALL_SWIN: dict[str, Any] = dict(img_size=64, window_size=4, embed_dim=16, num_heads=(1, 2, 2, 4))


def _small(name: str) -> dict[str, Any]:
    return dict(SMALL_SWIN if name.startswith("swin") else SMALL_VIT)


def _logits(model: nn.Module, fixed_input: Callable[..., torch.Tensor], side: int) -> torch.Tensor:
    with torch.no_grad():
        return model(fixed_input(2, 3, side, side))


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every socket connection: a download that a test forgot to replace fails fast."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is disabled in the tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------- original Swin layout


def _relative_position_index(window: int) -> torch.Tensor:
    """``relative_position_index`` as the original Swin ``WindowAttention`` computes it."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += window - 1
    relative[:, :, 1] += window - 1
    relative[:, :, 0] *= 2 * window - 1
    return relative.sum(-1)


def _attn_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """``attn_mask`` of a shifted block as the original ``SwinTransformerBlock`` computes it."""
    img_mask = torch.zeros(1, side, side, 1)
    cnt = 0
    for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img_mask[:, h, w, :] = cnt
            cnt += 1
    windows = img_mask.view(1, side // window, window, side // window, window, 1)
    windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _original_swin_layout(
    model: SwinTransformer, img_size: int, patch: int, window_size: int
) -> dict[str, torch.Tensor]:
    """A timm Swin state dict in the original Swin layout (microsoft/Swin-Transformer, FQ-ViT).

    ``layers.i.downsample`` moves to the end of stage ``i - 1``, ``head.fc`` becomes ``head``,
    and each block gets the ``relative_position_index`` buffer and, when shifted, ``attn_mask``,
    computed with the original code's rules: a stage whose resolution is at most the window
    uses one window of that resolution and no shift; odd blocks shift by half a window.
    """
    sd: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        moved = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        if moved:
            key = f"layers.{int(moved[1]) - 1}.downsample.{moved[2]}"
        sd[key.replace("head.fc.", "head.")] = value
    for i, layer in enumerate(model.layers):
        side = img_size // patch // 2**i
        window = min(window_size, side)
        for j in range(len(layer.blocks)):
            prefix = f"layers.{i}.blocks.{j}."
            sd[prefix + "attn.relative_position_index"] = _relative_position_index(window)
            if j % 2 == 1 and side > window_size:
                sd[prefix + "attn_mask"] = _attn_mask(side, window, window // 2)
    return sd


# --------------------------------------------------------------------------- registry and metadata


def test_registry_lists_fqvit_models_and_the_extra_sizes() -> None:
    assert set(FQVIT_MODELS) <= set(list_models())
    timm_names = [n for n in list_models() if not n.startswith("itpn")]
    assert timm_names == sorted(FQVIT_MODELS + EXTRA_MODELS)
    assert sorted(WEIGHT_TAGS) == timm_names


@pytest.mark.parametrize("name", FQVIT_MODELS)
def test_each_name_stands_for_the_weights_fqvit_loads(name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(f"{name}.{WEIGHT_TAGS[name]}")
    assert cfg.url == FQVIT_URLS[name]
    assert cfg.hf_hub_id == f"timm/{name}.{WEIGHT_TAGS[name]}"


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_eval_config_is_timms_pretrained_config(name: str) -> None:
    _, _, _, side, (mean, std), crop_pct = ARCHITECTURES[name]
    expected = EvalConfig(input_size=(3, side, side), mean=mean, std=std, crop_pct=crop_pct, interpolation="bicubic")
    assert model_entry(name)[1] == expected
    cfg = timm.models.get_pretrained_cfg(f"{name}.{WEIGHT_TAGS[name]}")
    timm_crop = 0.9 if name in CROP_PCT else expected.crop_pct  # DeiT: 0.875 as DeiT and FQ-ViT evaluate
    assert (cfg.input_size, cfg.mean, cfg.std, cfg.crop_pct, cfg.interpolation) == (
        expected.input_size,
        expected.mean,
        expected.std,
        timm_crop,
        expected.interpolation,
    )


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_is_timms_module(name: str) -> None:
    cls, params, keys, side, _, _ = ARCHITECTURES[name]
    with torch.device("meta"):
        model = create_model(name)
    assert type(model) is cls and not model.training
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys
    assert model.model_name == name and model.eval_cfg == model_entry(name)[1]
    assert model.pretrained_cfg["tag"] == WEIGHT_TAGS[name]
    with torch.device("meta"):
        reference = timm.create_model(name)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    assert side == model_entry(name)[1].input_size[-1]


# --------------------------------------------------------------------------- building and img_size


@pytest.fixture(scope="module")
def deit_tiny(fill_by_key) -> nn.Module:
    """``deit_tiny_patch16_224`` at its real size with key-seeded weights (do not modify)."""
    return fill_by_key(create_model("deit_tiny_patch16_224"))


@pytest.fixture(scope="module")
def swin_tiny(fill_by_key) -> nn.Module:
    """``swin_tiny_patch4_window7_224`` at its real size with key-seeded weights (do not modify)."""
    return fill_by_key(create_model("swin_tiny_patch4_window7_224"))


def test_deit_tiny_at_224_runs(deit_tiny, fixed_input) -> None:
    assert deit_tiny.pos_embed.shape == (1, 197, 192)
    logits = _logits(deit_tiny, fixed_input, 224)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_swin_tiny_at_224_runs(swin_tiny, fixed_input) -> None:
    assert swin_tiny.patch_embed.grid_size == (56, 56)
    assert [layer.blocks[0].window_size for layer in swin_tiny.layers] == [(7, 7)] * 4
    with torch.no_grad():
        logits = swin_tiny(fixed_input(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_small_overrides_build_each_model(name: str, fixed_input) -> None:
    overrides = _small(name)
    model = create_model(name, num_classes=7, **overrides)
    side = overrides["img_size"]
    assert model.eval_cfg == EvalConfig(
        input_size=(3, side, side),
        mean=model_entry(name)[1].mean,
        std=model_entry(name)[1].std,
        crop_pct=model_entry(name)[1].crop_pct,
    )
    assert _logits(model, fixed_input, side).shape == (2, 7)


@pytest.mark.parametrize(("img_size", "tokens"), [(224, 197), (32, 5), (48, 10)])
def test_vit_img_size(img_size: int, tokens: int, fixed_input) -> None:
    model = create_model("deit_tiny_patch16_224", img_size=img_size, depth=1)
    assert model.pos_embed.shape == (1, tokens, 192)
    assert model.eval_cfg.input_size == (3, img_size, img_size)
    assert _logits(model, fixed_input, img_size).shape == (2, 1000)


@pytest.mark.parametrize(("img_size", "window_size", "grid"), [(224, 7, 56), (64, 4, 16), (112, 7, 28)])
def test_swin_img_size(img_size: int, window_size: int, grid: int, fixed_input) -> None:
    model = create_model(
        "swin_tiny_patch4_window7_224", img_size=img_size, window_size=window_size, embed_dim=16, num_heads=(1, 1, 1, 1)
    )
    assert model.patch_embed.grid_size == (grid, grid)
    assert model.eval_cfg.input_size == (3, img_size, img_size)
    assert _logits(model, fixed_input, img_size).shape == (2, 1000)


def test_unknown_architecture_argument_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model 'deit_tiny_patch16_224' does not accept these arguments: .*'depths'"):
        create_model("deit_tiny_patch16_224", depths=(2, 2))


# --------------------------------------------------------------------------- checkpoints

FORMATS: dict[str, Callable[[dict], object]] = {
    "timm": lambda sd: sd,
    "model": lambda sd: {"model": sd},  # DeiT's and Swin's original releases, FQ-ViT
    "module": lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},  # saved from DDP
    "lightning": lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}},
}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_timm_layout_round_trip(name: str, fmt: str, fill_by_key, fixed_input, tmp_path: Path) -> None:
    source = fill_by_key(create_model(name, num_classes=10, **_small(name)))
    path = tmp_path / "ckpt.pth"
    torch.save(FORMATS[fmt](source.state_dict()), path)
    loaded = create_model(name, num_classes=10, checkpoint=str(path), **_small(name))
    side = _small(name)["img_size"]
    torch.testing.assert_close(_logits(loaded, fixed_input, side), _logits(source, fixed_input, side), atol=0, rtol=0)


def test_deit_tiny_real_size_round_trip(deit_tiny, fixed_input, tmp_path: Path) -> None:
    path = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    torch.save({"model": deit_tiny.state_dict()}, path)
    loaded = create_model("deit_tiny_patch16_224", checkpoint=str(path))
    torch.testing.assert_close(_logits(loaded, fixed_input, 224), _logits(deit_tiny, fixed_input, 224), atol=0, rtol=0)


def test_original_swin_buffers_built_here_equal_timms(swin_tiny) -> None:
    sd = _original_swin_layout(swin_tiny, 224, 4, 7)
    for i, layer in enumerate(swin_tiny.layers):
        for j, block in enumerate(layer.blocks):
            prefix = f"layers.{i}.blocks.{j}."
            assert torch.equal(sd[prefix + "attn.relative_position_index"], block.attn.relative_position_index)
            if block.attn_mask is None:
                assert prefix + "attn_mask" not in sd
            else:
                assert torch.equal(sd[prefix + "attn_mask"], block.attn_mask)


def test_original_swin_layout_has_fqvits_keys(swin_tiny) -> None:
    sd = _original_swin_layout(swin_tiny, 224, 4, 7)
    assert len(sd) == 190  # FQ-ViT's swin_tiny_patch4_window7_224 state dict
    masks = sorted(k for k in sd if k.endswith("attn_mask"))
    assert masks == [
        "layers.0.blocks.1.attn_mask",
        "layers.1.blocks.1.attn_mask",
        "layers.2.blocks.1.attn_mask",
        "layers.2.blocks.3.attn_mask",
        "layers.2.blocks.5.attn_mask",
    ]
    assert sd["layers.0.blocks.1.attn_mask"].shape == (64, 49, 49)
    assert sd["layers.0.blocks.0.attn.relative_position_index"].shape == (49, 49)
    assert {"layers.0.downsample.reduction.weight", "layers.2.downsample.norm.bias", "head.weight"} <= set(sd)
    assert not any(k.startswith("layers.3.downsample") or k.startswith("head.fc") for k in sd)


def test_original_swin_layout_real_size_loads_with_identical_logits(swin_tiny, fixed_input, tmp_path: Path) -> None:
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": _original_swin_layout(swin_tiny, 224, 4, 7)}, path)
    loaded = create_model("swin_tiny_patch4_window7_224", checkpoint=str(path))
    with torch.no_grad():
        x = fixed_input(1, 3, 224, 224)
        torch.testing.assert_close(loaded(x), swin_tiny(x), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224"])
def test_original_swin_layout_round_trip(name: str, fmt: str, fill_by_key, fixed_input, tmp_path: Path) -> None:
    source = fill_by_key(create_model(name, num_classes=10, **SMALL_SWIN))
    path = tmp_path / "ckpt.pth"
    torch.save(FORMATS[fmt](_original_swin_layout(source, 64, 4, 4)), path)
    loaded = create_model(name, num_classes=10, checkpoint=str(path), **SMALL_SWIN)
    torch.testing.assert_close(_logits(loaded, fixed_input, 64), _logits(source, fixed_input, 64), atol=0, rtol=0)


def test_convert_swin_state_dict_names_the_layout(fill_by_key) -> None:
    model = fill_by_key(create_model("swin_tiny_patch4_window7_224", **SMALL_SWIN))
    own = model.state_dict()
    converted, layout = convert_swin_state_dict(_original_swin_layout(model, 64, 4, 4), model)
    assert layout == "the original Swin layout"
    assert sorted(converted) == sorted(own)
    # renamed, never resized or copied: the same storage
    assert all(converted[k].shape == own[k].shape and converted[k].data_ptr() == own[k].data_ptr() for k in own)
    unchanged, layout = convert_swin_state_dict(own, model)
    assert layout is None and list(unchanged) == list(own)


def test_swin_tiny_checkpoint_does_not_fit_swin_small(fill_by_key, tmp_path: Path) -> None:
    source = fill_by_key(create_model("swin_tiny_patch4_window7_224", **SMALL_SWIN))
    path = tmp_path / "swin_tiny.pth"
    torch.save({"model": _original_swin_layout(source, 64, 4, 4)}, path)
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint .*swin_tiny\.pth does not fit swin_small_patch4_window7_224: 156 missing keys "
        r"\(layers\.2\.blocks\.6\.norm1\.weight, layers\.2\.blocks\.6\.norm1\.bias, "
        r"layers\.2\.blocks\.6\.attn\.relative_position_bias_table, layers\.2\.blocks\.6\.attn\.qkv\.weight, "
        r"layers\.2\.blocks\.6\.attn\.qkv\.bias, \.\.\.\); "
        r"keys read from the original Swin layout and renamed to the model's$",
    ):
        create_model("swin_small_patch4_window7_224", checkpoint=str(path), **SMALL_SWIN)


def test_swin_window_of_another_size_is_reported_not_resized(fill_by_key, tmp_path: Path) -> None:
    source = fill_by_key(create_model("swin_tiny_patch4_window7_224", **SMALL_SWIN))
    path = tmp_path / "window4.pth"
    torch.save({"model": _original_swin_layout(source, 64, 4, 4)}, path)
    with pytest.raises(
        CheckpointError,
        match=r"does not fit swin_tiny_patch4_window7_224: 10 wrong-shape keys "
        r"\(layers\.0\.blocks\.0\.attn\.relative_position_bias_table \(49, 1\) vs \(9, 1\), .*\); "
        r"keys read from the original Swin layout and renamed to the model's$",
    ):
        create_model("swin_tiny_patch4_window7_224", checkpoint=str(path), **{**SMALL_SWIN, "window_size": 2})


def test_deit_small_checkpoint_does_not_fit_deit_tiny(tmp_path: Path) -> None:
    path = tmp_path / "deit_small.pth"
    torch.save({"model": create_model("deit_small_patch16_224", img_size=32, depth=2).state_dict()}, path)
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint .*deit_small\.pth does not fit deit_tiny_patch16_224: 31 wrong-shape keys "
        r"\(cls_token \(1, 1, 384\) vs \(1, 1, 192\), .*, \.\.\.\); "
        r"it looks like a checkpoint of another architecture$",
    ):
        create_model("deit_tiny_patch16_224", img_size=32, depth=2, checkpoint=str(path))


@pytest.mark.parametrize(
    ("name", "head"), [("deit_tiny_patch16_224", "head"), ("swin_tiny_patch4_window7_224", "head.fc")]
)
def test_head_of_another_size_names_num_classes(name: str, head: str, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": create_model(name, num_classes=10, **_small(name)).state_dict()}, path)
    width = 32 if name.startswith("deit") else 128
    h = re.escape(head)
    with pytest.raises(
        CheckpointError,
        match=rf"2 wrong-shape keys \({h}\.weight \(10, {width}\) vs \(1000, {width}\), "
        rf"{h}\.bias \(10,\) vs \(1000,\)\); "
        r"its head has 10 classes: pass num_classes=10$",
    ):
        create_model(name, checkpoint=str(path), **_small(name))


# --------------------------------------------------------------------------- pretrained=True


def _unreachable_hub(*args: object, **kwargs: object) -> None:
    raise LocalEntryNotFoundError(
        "An error happened while trying to locate the file on the Hub and we cannot find the requested files in the "
        "local cache. Please check your connection and try again or make sure your Internet connection is on."
    )


def _unreachable_url(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError(OSError(101, "Network is unreachable"))


@pytest.fixture(params=["hf-hub", "url"])
def offline(request, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """timm without a network, through the Hugging Face hub or through the weights' plain URL."""
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", _unreachable_hub)
    monkeypatch.setattr(timm.models._hub, "download_url_to_file", _unreachable_url)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _unreachable_url)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    if request.param == "url":
        monkeypatch.setattr(timm.models._builder, "has_hf_hub", lambda necessary=False: False)
    return request.param


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_pretrained_without_network_fails_in_one_line(name: str, offline: str) -> None:
    tagged = re.escape(f"{name}.{WEIGHT_TAGS[name]}")
    error = "LocalEntryNotFoundError: An error happened" if offline == "hf-hub" else "URLError: <urlopen error"
    with pytest.raises(
        CheckpointError,
        match=rf"^the pretrained weights of {name} \({tagged}\) could not be downloaded \({error}.*\); "
        r"without a network, pass checkpoint= the path of a local file$",
    ) as info:
        create_model(name, pretrained=True, **_small(name))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", FQVIT_MODELS)
def test_pretrained_loads_the_tagged_weights_through_timm(name: str, fill_by_key, monkeypatch) -> None:
    depth = {"depths": (1, 1, 1, 1)} if name.startswith("swin") else {"depth": 1}
    overrides = {**_small(name), **depth}
    weights = fill_by_key(create_model(name, **overrides)).state_dict()
    asked: list[str] = []

    def hub(hub_id: str, **kwargs: object) -> dict[str, torch.Tensor]:
        asked.append(hub_id)
        return dict(weights)

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", hub)
    model = create_model(name, pretrained=True, **overrides)
    assert asked == [f"timm/{name}.{WEIGHT_TAGS[name]}"]
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    assert model.model_name == name and not model.training


def test_pretrained_and_checkpoint_together_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^pass either pretrained=True or checkpoint='.*w\.pth' for deit_tiny_patch16_224, not both$"
    ):
        create_model("deit_tiny_patch16_224", pretrained=True, checkpoint=str(tmp_path / "w.pth"))


@pytest.mark.parametrize("name", ["itpn_tiny", "itpn_base"])
def test_itpn_has_no_pretrained_download(name: str) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"^model '{name}' has no published weights that lit_ptq can download; "
        r"pass checkpoint= the path of a local file$",
    ):
        create_model(name, pretrained=True)
