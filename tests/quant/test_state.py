"""lit_ptq/quant/state.py: calibrate once, save the quantizer state, load it into a fresh model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn

from lit_ptq.errors import CheckpointError
from lit_ptq.quant import (
    QuantConfig,
    QuantMode,
    broadcast_quant_state,
    load_quant_state,
    quant_state,
    quantize_,
    quantizers,
    save_quant_state,
    state_meta,
    weights_fingerprint,
)
from lit_ptq.quant.state import STATE_FORMAT, STATE_VERSION

CONFIG = dict(method="omse", placement="full", bits="8/8/4", ptf=True, lis=True)


def test_round_trip_gives_identical_buffers_and_logits(make_quantized, make_tiny, eval_images, tmp_path: Path) -> None:
    model = make_quantized(**CONFIG)
    path = tmp_path / "state.pt"
    save_quant_state(model, str(path), {"model": "itpn_tiny"})
    fresh = quantize_(make_tiny(), QuantConfig(**CONFIG))
    load_quant_state(fresh, str(path), {"model": "itpn_tiny"})
    assert all(q.mode is QuantMode.QUANTIZE for _, q in quantizers(fresh))
    saved, loaded = quant_state(model), quant_state(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(model(eval_images), fresh(eval_images))


def test_the_file_says_what_it_was_made_for(make_quantized, tmp_path: Path) -> None:
    model = make_quantized(**CONFIG)
    save_quant_state(model, str(tmp_path / "s.pt"), {"img_size": 32})
    payload = torch.load(tmp_path / "s.pt", weights_only=True)
    assert (payload["format"], payload["version"]) == (STATE_FORMAT, STATE_VERSION)
    assert payload["meta"] == {**QuantConfig(**CONFIG).describe(), "img_size": 32, "weights_sha256": weights_fingerprint(model)}
    assert payload["meta"] == state_meta(model, {"img_size": 32})


@pytest.mark.parametrize(
    ("fields", "extra", "match"),
    [
        (dict(CONFIG, method="minmax"), {}, r"method: file 'omse', run 'minmax'"),
        (dict(CONFIG, overrides={"head*": None}), {}, r"overrides: file '<missing>', run \{'head\*': None\}"),
        (CONFIG, {"img_size": 64}, r"img_size: file '<missing>', run 64"),
        (CONFIG, {}, None),
    ],
)
def test_a_state_for_another_config_is_refused(
    make_quantized, make_tiny, tmp_path: Path, fields: dict, extra: dict, match: str
) -> None:
    path = tmp_path / "state.pt"
    save_quant_state(make_quantized(**CONFIG), str(path))
    fresh = quantize_(make_tiny(), QuantConfig(**fields))
    if match is None:
        load_quant_state(fresh, str(path), extra)
        return
    with pytest.raises(CheckpointError, match=rf"state file={path} was made for another model or config \(.*{match}"):
        load_quant_state(fresh, str(path), extra)


def test_a_key_the_run_lacks_is_refused_too(make_quantized, make_tiny, tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    save_quant_state(make_quantized(**CONFIG), str(path), {"model": "itpn_tiny"})
    with pytest.raises(CheckpointError, match=r"model: file 'itpn_tiny', run '<missing>'"):
        load_quant_state(quantize_(make_tiny(), QuantConfig(**CONFIG)), str(path))


def test_other_weights_are_refused(make_quantized, make_tiny, tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    save_quant_state(make_quantized(**CONFIG), str(path))
    other = make_tiny()
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(CheckpointError, match=r"weights_sha256: file '[0-9a-f]{64}', run '[0-9a-f]{64}'"):
        load_quant_state(quantize_(other, QuantConfig(**CONFIG)), str(path))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"format": "something else"}, r"is not a lit_ptq quantizer state file"),
        ({"format": STATE_FORMAT, "version": 1, "meta": {}, "state": {}}, r"is a version 1 state file and this lit_ptq reads version 2"),
    ],
)
def test_foreign_files_are_refused(make_tiny, tmp_path: Path, payload: dict, match: str) -> None:
    path = tmp_path / "state.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=match):
        load_quant_state(quantize_(make_tiny(), QuantConfig(**CONFIG)), str(path))


def test_a_file_that_is_no_pickle_is_refused(make_tiny, tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    path.write_text("not a state")
    with pytest.raises(CheckpointError, match=r"option=.* is not a lit_ptq quantizer state|is not a lit_ptq quantizer state \("):
        load_quant_state(quantize_(make_tiny(), QuantConfig(**CONFIG)), str(path), option="option")


def test_broadcast_without_a_process_group_changes_nothing(make_quantized) -> None:
    model: nn.Module = make_quantized(**CONFIG)
    before = quant_state(model)
    broadcast_quant_state(model)
    after = quant_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
