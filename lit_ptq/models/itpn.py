"""iTPN classifier (HiViT backbone), written to match the official implementation.

Paper: "Integrally Pre-Trained Transformer Pyramid Networks", Tian et al., CVPR 2023.
Official code: sunsmarterjie/iTPN, ``itpn_pixel/models/models_itpn.py``.

The module tree, parameter names and arithmetic follow the official classifier so that
official fine-tuned checkpoints load strictly and give the same logits. The quantization
package swaps :class:`Attention`, :class:`Mlp`, :class:`PatchMerge` and the plain
``nn.Linear`` / ``nn.Conv2d`` / ``nn.LayerNorm`` leaves for quantized subclasses; this file
knows nothing of quantization.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from ..errors import ConfigError

__all__ = ["iTPN", "Attention", "Mlp", "Block", "PatchEmbed", "PatchMerge", "relative_position_index"]


def relative_position_index(grid: int) -> torch.Tensor:
    """Index into a ``(2*grid-1)**2`` relative-position table for a square token grid.

    Args:
        grid: side of the square grid of tokens.

    Returns:
        A ``(grid*grid, grid*grid)`` long tensor, as the official ``relative_position_index``.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += grid - 1
    rel[:, :, 1] += grid - 1
    rel[:, :, 0] *= 2 * grid - 1
    return rel.sum(-1)


class Attention(nn.Module):
    """Multi-head self-attention with a relative position bias (``rpe``).

    Args:
        input_size: side of the token grid the bias table is built for.
        dim: channel width.
        num_heads: number of heads.
        qkv_bias: whether the fused ``qkv`` projection has a bias.
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout after the output projection.
        rpe: whether to learn a relative position bias table.
    """

    def __init__(
        self,
        input_size: int,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rpe: bool = True,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = (
            nn.Parameter(torch.zeros((2 * input_size - 1) ** 2, num_heads)) if rpe else None
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the ``qkv`` output ``(B, N, 3C)`` into q, k, v of shape ``(B, H, N, C/H)``."""
        B, N, C3 = x.shape
        qkv = x.reshape(B, N, 3, self.num_heads, C3 // (3 * self.num_heads)).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def position_bias(self, rpe_index: Optional[torch.Tensor], num_tokens: int) -> Optional[torch.Tensor]:
        """The ``(1, H, N, N)`` relative position bias for ``rpe_index`` (None without rpe)."""
        if rpe_index is None or self.relative_position_bias_table is None:
            return None
        table = self.relative_position_bias_table
        grid = math.isqrt(num_tokens)
        if grid != self.input_size:
            table = resize_rpe_table(table, self.input_size, grid)
        bias = table[rpe_index].view(-1, num_tokens, num_tokens, self.num_heads)
        return bias.permute(0, 3, 1, 2).contiguous()

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, C/H)`` -> ``(B, N, C)``."""
        B, H, N, D = x.shape
        return x.transpose(1, 2).reshape(B, N, H * D)

    def forward(self, x: torch.Tensor, rpe_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.split_heads(self.qkv(x))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.position_bias(rpe_index, x.shape[1])
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj(self.merge_heads(attn @ v)))


def resize_rpe_table(table: torch.Tensor, src_grid: int, dst_grid: int) -> torch.Tensor:
    """Bicubically resize a ``((2s-1)**2, H)`` relative-position table to another grid side."""
    src, dst = 2 * src_grid - 1, 2 * dst_grid - 1
    heads = table.shape[1]
    grid = table.T.reshape(1, heads, src, src)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.reshape(heads, dst * dst).T


class Mlp(nn.Module):
    """Two-layer perceptron ``fc1 -> act -> fc2`` (timm ``Mlp`` with the official names)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm residual block; an MLP-only block when ``num_heads == 0`` (no norm1/attn).

    Args:
        input_size: side of the token grid (for the attention bias table).
        dim: channel width.
        num_heads: attention heads, 0 for an MLP-only block.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: bias in ``qkv``.
        drop: dropout rate.
        attn_drop: attention dropout rate.
        drop_path: stochastic depth rate.
        rpe: relative position bias in attention.
        norm_layer: LayerNorm constructor.
    """

    def __init__(
        self,
        input_size: int,
        dim: int,
        num_heads: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        rpe: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        with_attn = num_heads > 0
        self.norm1 = norm_layer(dim) if with_attn else None
        self.attn = (
            Attention(input_size, dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, rpe=rpe)
            if with_attn
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, rpe_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x), rpe_index))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Image to ``(B, N, inner, inner, C)`` patches with a stride ``patch/inner`` convolution."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        inner_patches: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__()
        if patch_size % inner_patches:
            raise ValueError(f"patch_size={patch_size} must be a multiple of inner_patches={inner_patches}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.inner_patches = inner_patches
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        conv = patch_size // inner_patches
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=conv, stride=conv)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        hp, wp = H // self.patch_size[0], W // self.patch_size[1]
        inner = self.inner_patches
        x = self.proj(x).view(B, -1, hp, inner, wp, inner)
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(B, hp * wp, inner, inner, -1)
        return self.norm(x) if self.norm is not None else x


class PatchMerge(nn.Module):
    """Concatenate 2x2 neighbours inside each patch, LayerNorm(4d), Linear(4d -> 2d)."""

    def __init__(self, dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(dim * 4)
        self.reduction = nn.Linear(dim * 4, dim * 2, bias=False)

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        """``(..., h, w, d)`` -> ``(..., h/2, w/2, 4d)`` in the official neighbour order."""
        return torch.cat(
            [x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], dim=-1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(self.gather(x)))


class iTPN(nn.Module):
    """The iTPN image classifier (``num_outs=1`` of the official code).

    Args:
        img_size: input side the position embeddings are built for.
        patch_size: token stride of the attention stage.
        in_chans: input channels.
        num_classes: classifier width (0 for no head).
        embed_dim: width of the attention stage; the MLP stages use ``embed_dim/4`` and ``/2``.
        mlp_depth: MLP-only blocks in each of the two early stages.
        depth: attention blocks.
        num_heads: attention heads.
        bridge_mlp_ratio: MLP ratio of the early-stage blocks.
        mlp_ratio: MLP ratio of the attention blocks.
        qkv_bias: bias in ``qkv``.
        drop_rate: dropout rate.
        attn_drop_rate: attention dropout rate.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        norm_eps: LayerNorm epsilon.
        ape: absolute position embedding.
        rpe: relative position bias.
        patch_norm: LayerNorm after the patch embedding.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 512,
        mlp_depth: int = 3,
        depth: int = 24,
        num_heads: int = 8,
        bridge_mlp_ratio: float = 3.0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        ape: bool = True,
        rpe: bool = True,
        patch_norm: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim % 4 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by 4 and by num_heads={num_heads}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.num_main_blocks = depth
        dims = (embed_dim // 4, embed_dim // 2, embed_dim)

        self.patch_embed = PatchEmbed(img_size, patch_size, 4, in_chans, dims[0], norm_layer if patch_norm else None)
        grid = self.patch_embed.patches_resolution[0]
        self.absolute_pos_embed = (
            nn.Parameter(trunc_normal_(torch.zeros(1, self.patch_embed.num_patches, embed_dim), std=0.02))
            if ape
            else None
        )
        if rpe:
            self.register_buffer("relative_position_index", relative_position_index(grid))
        else:
            self.relative_position_index = None
        self.pos_drop = nn.Dropout(drop_rate)

        # device="cpu" so that the model also builds under `with torch.device("meta")`.
        dpr = iter(torch.linspace(0, drop_path_rate, 2 * mlp_depth + depth, device="cpu").tolist())
        common = dict(qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate, rpe=rpe, norm_layer=norm_layer)
        self.blocks = nn.ModuleList()
        for stage, dim in enumerate(dims[:2]):
            self.blocks.extend(
                Block(grid, dim, 0, bridge_mlp_ratio, drop_path=next(dpr), **common) for _ in range(mlp_depth)
            )
            self.blocks.append(PatchMerge(dim, norm_layer))
        self.blocks.extend(Block(grid, embed_dim, num_heads, mlp_ratio, drop_path=next(dpr), **common) for _ in range(depth))

        self.fc_norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay."""
        return {"absolute_pos_embed"}

    def interpolate_pos_encoding(self, grid: int) -> torch.Tensor:
        """The absolute position embedding for a ``grid x grid`` token map (bicubic, as official)."""
        pos = self.absolute_pos_embed
        n = pos.shape[1]
        if grid * grid == n:
            return pos
        side, dim = math.isqrt(n), pos.shape[-1]
        g0 = grid + 0.1  # the official code's offset against floating point error in the scale factor
        pos = F.interpolate(
            pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(g0 / side, g0 / side),
            mode="bicubic",
        )
        return pos.permute(0, 2, 3, 1).reshape(1, -1, dim)

    def rpe_index(self, grid: int) -> Optional[torch.Tensor]:
        """Flattened relative-position index for a ``grid x grid`` token map."""
        if self.relative_position_index is None:
            return None
        if grid == self.patch_embed.patches_resolution[0]:
            return self.relative_position_index.view(-1)
        return relative_position_index(grid).to(self.relative_position_index.device).view(-1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 3, H, W)`` -> tokens ``(B, N, embed_dim)`` after the last block."""
        H, W = x.shape[-2:]
        ph, pw = self.patch_embed.patch_size
        if H != W or H % ph:
            raise ConfigError(f"iTPN needs a square input whose side divides by {ph}; got {H}x{W}")
        grid = H // ph
        x = self.patch_embed(x)
        for blk in self.blocks[: -self.num_main_blocks]:
            x = blk(x)
        x = x[..., 0, 0, :]
        if self.absolute_pos_embed is not None:
            x = x + self.interpolate_pos_encoding(grid)
        x = self.pos_drop(x)
        rpe_index = self.rpe_index(grid)
        for blk in self.blocks[-self.num_main_blocks :]:
            x = blk(x, rpe_index)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens -> logits: mean over tokens, ``fc_norm``, ``head``."""
        return self.head(self.fc_norm(x.mean(dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
