"""lit_ptq/models/checkpoint.py: every accepted checkpoint format, and every refusal."""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from lit_ptq.errors import CheckpointError
from lit_ptq.models import create_model, load_checkpoint, read_state_dict


class NotAllowed:
    """A class the weights-only unpickler has never heard of."""


class CallsPrint:
    """Unpickling with ``pickle.load`` would call ``print("unpickled")``."""

    def __reduce__(self):
        return (print, ("unpickled",))


class CallsSystem:
    """Unpickling with ``pickle.load`` would run the harmless shell command ``true``."""

    def __reduce__(self):
        return (os.system, ("true",))


def _official(sd: dict) -> dict:
    args = argparse.Namespace(model="itpn_base_3324_patch16_224", input_size=224, nb_classes=10, drop_path=0.1)
    return {"model": sd, "args": args, "epoch": 3}


FORMATS: dict[str, Callable[[dict], object]] = {
    "model": lambda sd: {"model": sd},
    "official": _official,
    "model_ema": lambda sd: {"model_ema": sd},
    "lightning": lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 0},
    "bare": lambda sd: sd,
    "ddp": lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},
    "lightning_ddp": lambda sd: {"state_dict": {"model.module." + k: v for k, v in sd.items()}},
}


@pytest.fixture
def tiny_sd(tiny_model) -> dict[str, torch.Tensor]:
    return tiny_model.state_dict()


def _logits(model: torch.nn.Module, fixed_input) -> torch.Tensor:
    with torch.no_grad():
        return model(fixed_input(2, 3, 32, 32))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_formats_round_trip(fmt: str, tiny_model, tiny_sd, fixed_input, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(FORMATS[fmt](tiny_sd), path)
    loaded = create_model("itpn_tiny", num_classes=10, checkpoint=str(path))
    torch.testing.assert_close(_logits(loaded, fixed_input), _logits(tiny_model, fixed_input), atol=0, rtol=0)


def test_official_format_loads_under_weights_only(tiny_sd, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-best.pth"
    torch.save(_official(tiny_sd), path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert torch.load(path, weights_only=True)["epoch"] == 3
    assert list(read_state_dict(path)) == list(tiny_sd)


def test_safetensors_round_trip(tiny_model, tiny_sd, fixed_input, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sd.items()}, str(path))
    loaded = create_model("itpn_tiny", num_classes=10, checkpoint=str(path))
    torch.testing.assert_close(_logits(loaded, fixed_input), _logits(tiny_model, fixed_input), atol=0, rtol=0)


def test_load_checkpoint_fills_a_built_model_and_accepts_pathlike(tiny_model, tiny_sd, fixed_input, tmp_path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": tiny_sd}, path)
    model = create_model("itpn_tiny", num_classes=10)
    assert load_checkpoint(model, path) is model
    torch.testing.assert_close(_logits(model, fixed_input), _logits(tiny_model, fixed_input), atol=0, rtol=0)


def test_non_strict_skips_the_head_of_another_size(tiny_sd, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": tiny_sd}, path)
    model = create_model("itpn_tiny", num_classes=3, checkpoint=str(path), strict=False)
    torch.testing.assert_close(model.blocks[9].mlp.fc2.weight, tiny_sd["blocks.9.mlp.fc2.weight"], atol=0, rtol=0)
    assert model.head.weight.shape == (3, 128)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope\.pth does not exist"):
        create_model("itpn_tiny", checkpoint=str(tmp_path / "nope.pth"))


def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist; pass the path of a .pth or .safetensors file"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world\nthis is not a checkpoint\n", *(random.Random(seed).randbytes(1000) for seed in range(8))],
    ids=["empty", "text", *(f"random{seed}" for seed in range(8))],
)
def test_not_a_checkpoint(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"ckpt\.pth is not a PyTorch checkpoint"):
        read_state_dict(path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(random.Random(0).randbytes(1000))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable \.safetensors file"):
        read_state_dict(path)


def test_weights_only_refuses_arbitrary_classes(tiny_sd, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": tiny_sd, "extra": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match=r"holds a .*NotAllowed object, which a weights-only load refuses; re-save"):
        read_state_dict(path)


@pytest.mark.parametrize(("obj", "name"), [(CallsPrint(), "print"), (CallsSystem(), f"{os.name}.system")])
def test_weights_only_never_calls_code(obj: object, name: str, tiny_sd, tmp_path: Path, capsys) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": tiny_sd, "hook": obj}, path)
    with pytest.raises(CheckpointError, match=rf"holds a {name} object, which a weights-only load refuses"):
        read_state_dict(path)
    assert "unpickled" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [[1, 2, 3], {"epoch": 3}, {"model": "weights.bin"}])
def test_no_state_dict_inside(content: object, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=r"holds no state dict: expected \{'model': state_dict\}"):
        read_state_dict(path)


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": create_model("itpn_tiny", num_classes=10, embed_dim=64).state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        create_model("itpn_tiny", num_classes=10, checkpoint=str(path))
    message = str(info.value)
    assert "does not fit itpn_tiny: 98 wrong-shape keys (absolute_pos_embed (1, 16, 64) vs (1, 16, 128)," in message
    assert message.endswith("; it looks like a checkpoint of another architecture")
    assert "num_classes" not in message


def test_checkpoint_of_another_depth(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": create_model("itpn_tiny", depth=4).state_dict()}, path)  # 2 blocks of 13 keys fewer
    with pytest.raises(CheckpointError, match=r"itpn_tiny: 26 missing keys \(blocks\.8\.norm1\.weight, .*, \.\.\.\)$"):
        create_model("itpn_tiny", checkpoint=str(path))


def test_head_of_another_size_names_num_classes(tiny_sd, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": tiny_sd}, path)
    with pytest.raises(
        CheckpointError,
        match=r"2 wrong-shape keys \(head\.weight \(10, 128\) vs \(1000, 128\), head\.bias \(10,\) vs \(1000,\)\); "
        r"its head has 10 classes: pass num_classes=10$",
    ):
        create_model("itpn_tiny", checkpoint=str(path))


def test_missing_and_unexpected_keys_are_listed_with_counts(tiny_sd, tmp_path: Path) -> None:
    sd = {k: v for k, v in tiny_sd.items() if not k.startswith("blocks.7.")}  # an attention block: 13 keys
    sd["decoder.weight"] = torch.zeros(3)
    sd["mask_token"] = torch.zeros(1, 1, 128)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(
        CheckpointError,
        match=r"does not fit itpn_tiny: 13 missing keys \(blocks\.7\.norm1\.weight, blocks\.7\.norm1\.bias, "
        r"blocks\.7\.attn\.relative_position_bias_table, blocks\.7\.attn\.qkv\.weight, blocks\.7\.attn\.qkv\.bias, \.\.\.\); "
        r"2 unexpected keys \(decoder\.weight, mask_token\)$",
    ):
        create_model("itpn_tiny", num_classes=10, checkpoint=str(path))


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)
