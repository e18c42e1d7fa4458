"""Specification of lit_ptq/module.py (PTQModule) and lit_ptq/metrics.py (ExactMean)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import Trainer
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lit_ptq.errors import ConfigError
from lit_ptq.metrics import ExactMean, PercentAccuracy
from lit_ptq.models import create_model
from lit_ptq.module import PTQModule
from lit_ptq.quant import QuantMode, TensorQuantizer, calibrate, quantizers

BATCH = 8


def _trainer() -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def _images_and_targets(n: int = 29, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def _module(method: str | None = None, num_classes: int = 10, **kwargs) -> PTQModule:
    torch.manual_seed(0)
    return PTQModule(model_name="itpn_tiny", num_classes=num_classes, method=method, **kwargs)


def _hand_metrics(module: PTQModule, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 (in percent) and mean cross-entropy computed directly from the logits, batch by batch."""
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]).float()
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {
        "val/acc1": 100 * (top[:, 0] == targets).double().mean().item(),
        "val/acc5": 100 * (top == targets[:, None]).any(dim=1).double().mean().item(),
        "val/loss": F.cross_entropy(logits, targets, reduction="none").double().mean().item(),
        "val/num_images": float(len(targets)),
    }


def _validate(module: PTQModule, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    loader = DataLoader(TensorDataset(images, targets), batch_size=BATCH)
    (metrics,) = _trainer().validate(module, loader, verbose=False)
    return metrics


class TestBuild:
    def test_float_module_has_no_quantizers(self):
        module = _module(method=None)
        assert not module.quantized
        assert module.quant_config is None
        summary = module.run_summary()
        assert summary == dict(
            model="itpn_tiny", checkpoint=None, num_classes=10, method="fp32", placement=None, bits="32/32/32"
        )

    @pytest.mark.parametrize("placement", ["seed", "full"])
    @pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse"])
    def test_quantized_module(self, method, placement):
        module = _module(method=method, placement=placement)
        assert module.quantized
        assert module.quant_config.method == method and module.quant_config.placement == placement
        assert all(q.mode is QuantMode.FLOAT for _, q in quantizers(module.model))
        summary = module.run_summary()
        assert summary["method"] == method and summary["placement"] == placement and summary["bits"] == "8/8/8"

    def test_full_placement_quantizes_more_points_than_seed(self):
        seed = sum(1 for _ in quantizers(_module("minmax", placement="seed").model))
        full = sum(1 for _ in quantizers(_module("minmax", placement="full").model))
        assert full > seed > 0

    def test_ptf_lis_variant(self):
        module = _module("minmax", placement="full", bits="8/8/4", ptf=True, lis=True)
        summary = module.run_summary()
        assert (summary["bits"], summary["ptf"], summary["lis"]) == ("8/8/4", True, True)

    def test_hparams_are_saved(self):
        module = _module("omse", bits="8/8/4")
        assert module.hparams.method == "omse" and module.hparams.bits == "8/8/4"
        assert module.hparams.model_name == "itpn_tiny" and module.hparams.num_classes == 10

    def test_float_weights_are_the_created_model(self, tiny_checkpoint):
        module = PTQModule(model_name="itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint))
        reference = create_model("itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint))
        for (name, a), (_, b) in zip(module.model.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(a, b), name

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(method="kmeans"), "method='kmeans' is not one of"),
            (dict(method="minmax", placement="everywhere"), "placement='everywhere' is not defined for the itpn model family"),
            (dict(method="minmax", bits="8/8"), "bits='8/8' must be three integers"),
            (dict(method="minmax", arithmetic="fast"), "arithmetic='fast' is not one of"),
        ],
    )
    def test_bad_quantization_settings_are_refused(self, kwargs, match):
        with pytest.raises(ConfigError, match=match):
            _module(**kwargs)

    def test_fewer_than_five_classes_caps_top5(self):
        module = _module(num_classes=3)
        assert module.acc5.top_k == 3


class TestEvalStep:
    def test_float_metrics_equal_a_hand_computation(self):
        module = _module(method=None)
        images, targets = _images_and_targets()
        expected = _hand_metrics(module, images, targets)
        metrics = _validate(module, images, targets)
        assert metrics["val/num_images"] == expected["val/num_images"] == 29
        assert metrics["val/acc1"] == pytest.approx(expected["val/acc1"], abs=1e-4)  # percent, 4 decimals
        assert metrics["val/acc5"] == pytest.approx(expected["val/acc5"], abs=1e-4)
        assert metrics["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-9)

    @pytest.mark.parametrize("method, placement", [("minmax", "seed"), ("ema", "full")])
    def test_quantized_metrics_equal_a_hand_computation(self, method, placement):
        module = _module(method=method, placement=placement)
        images, targets = _images_and_targets()
        calibrate(module.model, [images[:16], images[16:]])
        expected = _hand_metrics(module, images, targets)
        metrics = _validate(module, images, targets)
        assert metrics["val/acc1"] == pytest.approx(expected["val/acc1"], abs=1e-4)  # percent, 4 decimals
        assert metrics["val/acc5"] == pytest.approx(expected["val/acc5"], abs=1e-4)
        assert metrics["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-9)
        assert metrics["val/num_images"] == 29

    def test_quantized_logits_differ_from_float(self):
        module = _module(method="minmax")
        images, _ = _images_and_targets()
        with torch.no_grad():
            float_logits = module(images)
            calibrate(module.model, [images])
            quant_logits = module(images)
        assert all(q.mode is QuantMode.QUANTIZE for _, q in quantizers(module.model))
        assert not torch.equal(float_logits, quant_logits)
        # float logits reach 0.81 in magnitude; 8-bit quantization moves them by at most 0.148
        torch.testing.assert_close(quant_logits, float_logits, atol=0.2, rtol=0)

    def test_test_step_logs_under_test_prefix(self):
        module = _module(method=None)
        images, targets = _images_and_targets(n=10)
        loader = DataLoader(TensorDataset(images, targets), batch_size=BATCH)
        (metrics,) = _trainer().test(module, loader, verbose=False)
        assert set(metrics) == {"test/acc1", "test/acc5", "test/loss", "test/num_images"}
        assert metrics["test/num_images"] == 10

    def test_the_printed_table_shows_percent(self, capsys):
        module = _module(method=None)
        images, targets = _images_and_targets()
        expected = _hand_metrics(module, images, targets)
        loader = DataLoader(TensorDataset(images, targets), batch_size=BATCH)
        (metrics,) = _trainer().validate(module, loader, verbose=True)
        table = capsys.readouterr().out
        for key in ("val/acc1", "val/acc5"):
            assert metrics[key] == pytest.approx(expected[key], abs=1e-4)
            row = next(line for line in table.splitlines() if key in line)
            assert str(metrics[key]) in row.split() and len(str(metrics[key]).split(".")[1]) <= 4

    def test_empty_batch_is_skipped(self):
        module = _module(method=None)
        module.eval()
        module._eval_step((torch.empty(0), torch.empty(0, dtype=torch.int64)), "val")
        assert int(module.loss.count) == 0
        assert not module.num_images.update_called

    def test_quantizers_are_buffers_in_state_dict(self):
        module = _module(method="minmax")
        keys = module.state_dict().keys()
        name, q = next(quantizers(module.model))
        assert isinstance(q, TensorQuantizer)
        assert {f"model.{name}.scale", f"model.{name}.zero_point", f"model.{name}.calibrated"} <= set(keys)


class TestPercentAccuracy:
    @pytest.mark.parametrize("top_k", [1, 5])
    def test_is_the_fraction_times_100_rounded_to_4_decimals_in_float64(self, top_k):
        g = torch.Generator().manual_seed(2)
        for n in (29, 59, 1000):
            logits, targets = torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g)
            reference = MulticlassAccuracy(num_classes=10, top_k=top_k, average="micro")
            percent = PercentAccuracy(num_classes=10, top_k=top_k, average="micro")
            reference.update(logits, targets)
            percent.update(logits, targets)
            value = percent.compute()
            assert value.dtype == torch.float64
            assert value.item() == round(100.0 * reference.compute().item(), 4)  # the results JSON's formula before

    def test_every_count_of_59_images_keeps_the_jsons_digits(self):
        targets = torch.zeros(59, dtype=torch.int64)
        for hits in range(60):
            logits = torch.zeros(59, 10)
            logits[:hits, 0] = 1.0
            logits[hits:, 1] = 1.0
            metric = PercentAccuracy(num_classes=10, top_k=1, average="micro")
            metric.update(logits, targets)
            fraction = (torch.tensor(float(hits)) / 59).item()  # float32, as torchmetrics divides
            assert metric.compute().item() == round(100.0 * fraction, 4)


class TestExactMean:
    def _values(self, n: int = 1000) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return (torch.rand(n, generator=g, dtype=torch.float64) * 20).float()

    def test_equals_the_float64_mean(self):
        values = self._values()
        metric = ExactMean()
        for chunk in values.split(97):
            metric.update(chunk)
        assert metric.compute().dtype == torch.float64
        assert abs(metric.compute().item() - values.double().mean().item()) < 1e-9

    def test_order_independent_bit_for_bit(self):
        values = self._values()
        forward, backward, shuffled = ExactMean(), ExactMean(), ExactMean()
        for chunk in values.split(97):
            forward.update(chunk)
        for chunk in values.flip(0).split(13):
            backward.update(chunk)
        perm = torch.randperm(len(values), generator=torch.Generator().manual_seed(5))
        for chunk in values[perm].split(250):
            shuffled.update(chunk)
        assert forward.compute().item() == backward.compute().item() == shuffled.compute().item()

    def test_merged_shards_equal_one_process(self):
        """Summing the integer states of strided shards (what a DDP all-reduce does) is exact."""
        values = self._values(1001)
        whole = ExactMean()
        whole.update(values)
        shards = [ExactMean() for _ in range(3)]
        for rank, shard in enumerate(shards):
            shard.update(values[rank::3])
        total = sum(int(s.total) for s in shards)
        count = sum(int(s.count) for s in shards)
        assert (total, count) == (int(whole.total), int(whole.count))
        for shard in shards[1:]:
            shards[0].merge_state(shard)
        assert shards[0].compute().item() == whole.compute().item()

    @pytest.mark.parametrize(
        "ulps, fixed",
        [
            (0.75, 1),  # truncation or floor would give 0
            (1.25, 1),  # ceil would give 2
            (-0.75, -1),  # truncation toward zero or ceil would give 0
            (2.5, 2),  # a tie goes to the even multiple (torch.round)
            (3.5, 4),
        ],
    )
    def test_values_round_to_the_nearest_multiple_of_2_pow_minus_32(self, ulps, fixed):
        """A value ``ulps * 2**-32`` adds ``fixed`` to the sum: rounded to nearest, ties to even."""
        metric = ExactMean()
        metric.update(torch.tensor([ulps * 2.0**-32], dtype=torch.float32))
        assert (int(metric.total), int(metric.count)) == (fixed, 1)
        assert metric.compute().item() == fixed * 2.0**-32

    def test_empty_is_nan(self):
        assert torch.isnan(ExactMean().compute())

    def test_large_losses_do_not_overflow(self):
        metric = ExactMean()
        metric.update(torch.full((100_000,), 1000.0))
        assert metric.compute().item() == 1000.0


def test_model_kwargs_naming_an_option_of_its_own_is_one_line() -> None:
    from lit_ptq.errors import ConfigError
    from lit_ptq.module import PTQModule

    with pytest.raises(ConfigError, match=r"^model.model_kwargs sets img_size, num_classes, which are options of their own: "
                                          r"use --model.img_size, use --model.num_classes$"):  # fmt: skip
        PTQModule(model_name="itpn_tiny", model_kwargs=dict(img_size=32, num_classes=10, depth=1))
