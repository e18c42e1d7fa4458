"""The Trainer of the CLI: Lightning's, plus ``export`` (calibrate as ``validate`` does, write a
deployment file through an export backend) and ``predict(output=...)`` (write every image's top-5
classes to a CSV or JSON Lines file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from pytorch_lightning import LightningDataModule, LightningModule, Trainer

from .callbacks import calibration_callback
from .predictions import PredictionWriter
from .run import export_module, prepare_export

__all__ = ["PTQTrainer"]


class PTQTrainer(Trainer):
    """Lightning's Trainer: the devices, precision, logger, callbacks and batch limits of a run.

    :class:`~pytorch_lightning.Trainer` with an :meth:`export` method and a :meth:`predict`
    that writes a predictions file. ``LitPTQCLI`` uses it so that ``main.py export`` parses
    and runs like ``validate`` (LightningCLI builds a subcommand's options from the trainer
    method of that name, its description from the method's docstring, and the title of the
    Trainer's options in ``--help`` from this docstring's first line).
    """

    def validate(
        self,
        model: Optional[LightningModule] = None,
        dataloaders: Any = None,
        ckpt_path: Optional[Union[str, Path]] = None,
        verbose: bool = True,
        datamodule: Optional[LightningDataModule] = None,
        weights_only: Optional[bool] = None,
    ) -> list[Any]:
        """Calibrate on data.root/train, then evaluate every image of data.root/val (top-1, top-5, loss).

        Lightning's :meth:`~pytorch_lightning.Trainer.validate`; the trainer's
        :class:`~lit_ptq.callbacks.CalibrationCallback` calibrates at ``on_validation_start``.

        Args:
            model: the :class:`~lit_ptq.module.PTQModule`.
            dataloaders: validation dataloaders (the CLI uses the datamodule's ``val/``).
            ckpt_path: a Lightning checkpoint to load first (not a CLI option: lit_ptq reads
                its weights from ``model.checkpoint``).
            verbose: print Lightning's table of the metrics (top-1 and top-5 in percent).
            datamodule: the :class:`~lit_ptq.data.ImageNetDataModule`.
            weights_only: passed to ``torch.load`` for ``ckpt_path``.

        Returns:
            Lightning's list of metric dicts, one per dataloader.
        """
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def test(
        self,
        model: Optional[LightningModule] = None,
        dataloaders: Any = None,
        ckpt_path: Optional[Union[str, Path]] = None,
        verbose: bool = True,
        datamodule: Optional[LightningDataModule] = None,
        weights_only: Optional[bool] = None,
    ) -> list[Any]:
        """Calibrate as validate does, then evaluate every image of data.root/test (top-1, top-5, loss).

        Lightning's :meth:`~pytorch_lightning.Trainer.test`; the trainer's
        :class:`~lit_ptq.callbacks.CalibrationCallback` calibrates at ``on_test_start``.

        Args:
            model: the :class:`~lit_ptq.module.PTQModule`.
            dataloaders: test dataloaders (the CLI uses the datamodule's ``test/``).
            ckpt_path: a Lightning checkpoint to load first (not a CLI option: lit_ptq reads
                its weights from ``model.checkpoint``).
            verbose: print Lightning's table of the test metrics (top-1 and top-5 in percent).
            datamodule: the :class:`~lit_ptq.data.ImageNetDataModule`.
            weights_only: passed to ``torch.load`` for ``ckpt_path``.

        Returns:
            Lightning's list of metric dicts, one per dataloader.
        """
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def predict(
        self,
        model: Optional[LightningModule] = None,
        dataloaders: Any = None,
        datamodule: Optional[LightningDataModule] = None,
        return_predictions: Optional[bool] = None,
        ckpt_path: Optional[Union[str, Path]] = None,
        weights_only: Optional[bool] = None,
        output: Optional[str] = None,
    ) -> Optional[list[Any]]:
        """Calibrate as validate does, then write the top-5 classes of every image of data.predict_root to --output.

        Lightning's :meth:`~pytorch_lightning.Trainer.predict`; the trainer's
        :class:`~lit_ptq.callbacks.CalibrationCallback` calibrates at ``on_predict_start``.
        With ``output``, a :class:`~lit_ptq.predictions.PredictionWriter` gathers every
        rank's rows and global rank 0 writes them to ``output`` (CSV or JSON Lines by its
        extension, atomically), one row per image in sorted-path order, and prints one line.

        Args:
            model: the :class:`~lit_ptq.module.PTQModule`.
            dataloaders: predict dataloaders (the CLI uses the datamodule's ``predict_root``).
            datamodule: the :class:`~lit_ptq.data.ImageNetDataModule`.
            return_predictions: also return the rows in memory (default: not with ``output``;
                not a CLI option).
            ckpt_path: a Lightning checkpoint to load first (not a CLI option: lit_ptq reads
                its weights from ``model.checkpoint``).
            weights_only: passed to ``torch.load`` for ``ckpt_path``.
            output: the predictions file, ``.csv`` or ``.jsonl`` (required by ``main.py predict``);
                its folder must exist and be writable (checked before any compute).

        Returns:
            Lightning's predictions when ``return_predictions`` is true, else None.

        Raises:
            ConfigError: ``output`` does not end in ``.csv`` / ``.jsonl`` or cannot be written.
        """
        if output is None:
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)
        writer = PredictionWriter(output)
        self.callbacks.append(writer)
        try:
            return super().predict(model, dataloaders, datamodule, bool(return_predictions), ckpt_path, weights_only)
        finally:
            self.callbacks.remove(writer)

    def export(
        self,
        model: LightningModule,
        output: str,
        datamodule: Optional[LightningDataModule] = None,
        log_points: Literal["raise", "float_ops"] = "raise",
        format: str = "onnx",
    ) -> dict[str, Any]:
        """Calibrate the model as validate does and write it to a deployment file (ONNX QDQ by default).

        The export backend is the one registered as ``format``
        (:data:`lit_ptq.backends.EXPORT_BACKENDS`; ``onnx``: :class:`lit_ptq.export.qdq.OnnxExport`),
        checked with the model before calibrating (:func:`lit_ptq.run.prepare_export`). The
        calibration is :class:`~lit_ptq.callbacks.CalibrationCallback`'s (the trainer's
        instance, so ``calibration.load_state`` / ``save_state`` apply): the same batches on
        the same device as ``validate``, in one process. The model is then exported on the
        CPU (example input: two zero images of the model's input size) with metadata
        describing the run, to a temporary file renamed to ``output`` only when complete
        (:func:`lit_ptq.run.export_module`). One line is printed: the path, its size and what it is.

        Args:
            model: a :class:`~lit_ptq.module.PTQModule` (quantized or float, not ``onnx``).
            output: the file to write (``.onnx`` for ONNX).
            datamodule: gives the calibration batches (not needed for a float model or with
                ``calibration.load_state``).
            log_points: ``raise`` refuses log quantizers and log-int-softmax; ``float_ops``
                exports them as float operators (see :func:`lit_ptq.export.qdq_export_mode`).
            format: the export backend, by its registered name.

        Returns:
            The file's metadata, plus ``path`` and ``bytes``.

        Raises:
            ConfigError: ``model.onnx`` is set, ``format`` is not registered, or ``output`` is
                not a writable path with the backend's suffix (``.onnx``).
            OnnxExportError: the model has a quant point QDQ cannot express (checked before
                calibrating); no file is written.
        """
        backend = prepare_export(model, output, format, log_points=log_points)
        calibration = calibration_callback(self.callbacks)
        model.to(self.strategy.root_device)
        model.eval()
        with torch.no_grad():
            calibration.prepare(model, datamodule, self)
        return export_module(model, backend, output, calibration.result, self.is_global_zero)
