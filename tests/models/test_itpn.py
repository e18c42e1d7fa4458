"""lit_ptq/models/itpn.py, factories.py and registry.py against the official iTPN classifier.

The expected key lists and reference logits in ``data/`` were produced once from the official
implementation (sunsmarterjie/iTPN, ``itpn_pixel/models/models_itpn.py``) with the weights of
the ``fill_by_key`` fixture and the inputs of the ``fixed_input`` fixture (see ``conftest.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_ptq.models import EvalConfig, create_model, list_models
from lit_ptq.models.itpn import Attention, resize_rpe_table

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA = Path(__file__).parent / "data"
# The logits differ from the official ones by 0 to 1.2e-6 (itpn_base), depending on the CPU's
# kernels; one LayerNorm eps of 1e-5 instead of the official 1e-6 (PatchMerge's alone) moves
# them by 4e-6.
LOGITS_ATOL = 3e-6


def _reference(name: str) -> torch.Tensor:
    return torch.load(DATA / f"{name}_reference_logits.pt", weights_only=True)


@pytest.fixture(scope="module")
def base_model(fill_by_key) -> torch.nn.Module:
    """``itpn_base`` with key-seeded weights, built once for this module (tests must not modify it)."""
    return fill_by_key(create_model("itpn_base"))


@pytest.mark.parametrize(("name", "num_keys", "num_params"), [("itpn_base", 364, 78_557_992), ("itpn_large", 560, 288_493_576)])
def test_state_dict_keys_and_shapes_match_official(name: str, num_keys: int, num_params: int) -> None:
    expected = json.loads((DATA / f"{name}_keys.json").read_text())
    with torch.device("meta"):
        model = create_model(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(expected) == num_keys
    assert list(got) == list(expected)
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == num_params


def test_mlp_only_blocks_have_no_attention(base_model) -> None:
    keys = set(base_model.state_dict())
    assert "blocks.0.norm1.weight" not in keys and "blocks.0.attn.qkv.weight" not in keys
    assert {"blocks.3.norm.weight", "blocks.3.reduction.weight", "blocks.7.reduction.weight"} <= keys
    assert "blocks.3.reduction.bias" not in keys
    assert {"blocks.8.norm1.weight", "blocks.8.attn.relative_position_bias_table", "blocks.8.attn.qkv.bias"} <= keys


def test_itpn_tiny_logits_match_official(tiny_model, fixed_input) -> None:
    with torch.no_grad():
        logits = tiny_model(fixed_input(2, 3, 32, 32))
    torch.testing.assert_close(logits, _reference("itpn_tiny"), atol=LOGITS_ATOL, rtol=0)


def test_itpn_tiny_without_rpe_interpolates_position_embedding_as_official(fill_by_key, fixed_input) -> None:
    model = fill_by_key(create_model("itpn_tiny", num_classes=10, rpe=False))
    with torch.no_grad():
        logits = model(fixed_input(2, 3, 48, 48))
    torch.testing.assert_close(logits, _reference("itpn_tiny_norpe_48"), atol=LOGITS_ATOL, rtol=0)


def test_itpn_base_logits_match_official(base_model, fixed_input) -> None:
    with torch.no_grad():
        logits = base_model(fixed_input(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    torch.testing.assert_close(logits[0], _reference("itpn_base"), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize(("name", "num_norms"), [("itpn_tiny", 18), ("itpn_base", 58), ("itpn_large", 88)])
def test_every_layernorm_has_the_official_eps(name: str, num_norms: int) -> None:
    """The official classifier builds every LayerNorm with eps 1e-6: the patch embedding's, each
    block's norm1 / norm2, each PatchMerge's and fc_norm; ``norm_eps`` overrides them all."""
    for overrides, eps in (({}, 1e-6), ({"norm_eps": 1e-5}, 1e-5)):
        with torch.device("meta"):
            model = create_model(name, **overrides)
        norms = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
        assert len(norms) == num_norms
        assert {"patch_embed.norm", "fc_norm", f"blocks.{len(model.blocks) - 1}.norm1"} <= set(norms)
        assert len([n for n in norms if n.startswith("blocks.") and n.endswith(".norm")]) == 2  # PatchMerge
        assert norms == dict.fromkeys(norms, eps)


def test_forward_shapes_and_split(tiny_model, fixed_input) -> None:
    x = fixed_input(3, 3, 32, 32)
    with torch.no_grad():
        tokens = tiny_model.forward_features(x)
        logits = tiny_model(x)
    assert tokens.shape == (3, 16, 128)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(tiny_model.forward_head(tokens), logits, atol=0, rtol=0)


@pytest.mark.parametrize(("model_fixture", "side", "num_classes"), [("tiny_model", 48, 10), ("base_model", 256, 1000)])
def test_other_input_size_resizes_position_encodings(model_fixture, side, num_classes, fixed_input, request) -> None:
    model = request.getfixturevalue(model_fixture)
    grid = side // model.patch_embed.patch_size[0]
    assert model.interpolate_pos_encoding(grid).shape == (1, grid * grid, model.num_features)
    with torch.no_grad():
        logits = model(fixed_input(1, 3, side, side))
    assert logits.shape == (1, num_classes)
    assert torch.isfinite(logits).all()


def test_position_encodings_unchanged_at_built_size(tiny_model) -> None:
    assert tiny_model.interpolate_pos_encoding(4) is tiny_model.absolute_pos_embed
    torch.testing.assert_close(tiny_model.rpe_index(4), tiny_model.relative_position_index.view(-1), atol=0, rtol=0)
    table = tiny_model.blocks[-1].attn.relative_position_bias_table
    torch.testing.assert_close(resize_rpe_table(table, 4, 4), table, atol=1e-6, rtol=0)


def test_relative_position_bias_for_a_larger_grid() -> None:
    attn = Attention(input_size=4, dim=32, num_heads=2)
    torch.nn.init.normal_(attn.relative_position_bias_table)
    assert resize_rpe_table(attn.relative_position_bias_table, 4, 6).shape == (11 * 11, 2)
    index = torch.arange(36 * 36) % (11 * 11)
    assert attn.position_bias(index, 36).shape == (1, 2, 36, 36)


def test_rejects_input_that_does_not_fit_patches(tiny_model) -> None:
    with pytest.raises(ValueError, match="square input whose side divides by 8; got 36x36"):
        tiny_model(torch.zeros(1, 3, 36, 36))
    with pytest.raises(ValueError, match="got 32x40"):
        tiny_model(torch.zeros(1, 3, 32, 40))


def test_overrides_change_the_architecture(fixed_input) -> None:
    model = create_model(
        "itpn_tiny", num_classes=5, img_size=64, embed_dim=64, depth=2, num_heads=2, mlp_depth=2, patch_size=16
    )
    assert len(model.blocks) == 2 * 2 + 2 + 2
    assert model.num_main_blocks == 2
    assert model.patch_embed.proj.kernel_size == (4, 4)
    assert model.patch_embed.proj.out_channels == 16
    assert model.absolute_pos_embed.shape == (1, 16, 64)
    assert model.relative_position_index.shape == (16, 16)
    assert model.blocks[-1].attn.num_heads == 2
    assert model.blocks[-1].attn.relative_position_bias_table.shape == (7 * 7, 2)
    assert model.head.in_features == 64 and model.head.out_features == 5
    assert model.eval_cfg.input_size == (3, 64, 64)
    with torch.no_grad():
        assert model(fixed_input(2, 3, 64, 64)).shape == (2, 5)


def test_no_head(fixed_input) -> None:
    model = create_model("itpn_tiny", num_classes=0)
    assert isinstance(model.head, torch.nn.Identity)
    with torch.no_grad():
        assert model(fixed_input(1, 3, 32, 32)).shape == (1, 128)


def test_create_model_returns_eval_mode_with_metadata() -> None:
    model = create_model("itpn_tiny")
    assert not model.training
    assert model.model_name == "itpn_tiny"
    assert model.eval_cfg.input_size == (3, 32, 32)


def test_itpn_base_eval_config(base_model) -> None:
    assert base_model.eval_cfg == EvalConfig(
        input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bicubic"
    )
    assert int(224 / base_model.eval_cfg.crop_pct) == 256


def test_img_size_updates_eval_config_only_in_the_input_size() -> None:
    model = create_model("itpn_tiny", img_size=48)
    assert model.eval_cfg.input_size == (3, 48, 48)
    assert (model.eval_cfg.crop_pct, model.eval_cfg.interpolation) == (1.0, "bilinear")
    assert model.absolute_pos_embed.shape == (1, 36, 128)


def test_registered_models() -> None:
    assert {"itpn_base", "itpn_large", "itpn_tiny"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'itpn_huge'; registered models: .*itpn_base, itpn_large, itpn_tiny"):
        create_model("itpn_huge")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed_dims": 64}, r"model 'itpn_tiny' does not accept these arguments: .*embed_dims"),
        ({"embed_dim": 130}, r"embed_dim=130 must be divisible by 4 and by num_heads=4"),
        ({"embed_dim": 128, "num_heads": 3}, r"embed_dim=128 must be divisible by 4 and by num_heads=3"),
        ({"patch_size": 6}, r"patch_size=6 must be a multiple of inner_patches=4"),
    ],
)
def test_bad_overrides(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("itpn_tiny", **overrides)
