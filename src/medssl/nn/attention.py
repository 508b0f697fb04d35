"""Self-attention with linear cost in the sequence length (Nyström approximation), for long token grids.

MIRAM's high-resolution decoders (Vo et al., arXiv 2503.07157) see 4x (2x scale) or 16x (4x scale) as many
tokens as the input grid, so full attention costs 16x / 256x as much there. Nyströmformer (Xiong et al.,
"Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention", AAAI 2021) approximates
``softmax(Q Kᵀ / √d) V`` with ``m`` landmarks:

    Q̃, K̃ = segment means of Q, K over m contiguous segments of the sequence
    F = softmax(Q K̃ᵀ / √d)  (n x m),  A = softmax(Q̃ K̃ᵀ / √d)  (m x m),  B = softmax(Q̃ Kᵀ / √d)  (m x n)
    out ≈ F · A⁺ · (B · V)

costing ``O(n m d)`` instead of ``O(n² d)``. ``A⁺`` is the Moore-Penrose pseudo-inverse, computed with the
iterative scheme of the paper (Razavi et al. 2014): ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)``,
``Z ← ¼ Z (13 I − A Z (15 I − A Z (7 I − A Z)))``. With as many landmarks as tokens, ``F = A = B`` and
the output is full attention up to the accuracy of the pseudo-inverse.

Written here from the paper (no extra dependency). Token order matters for the landmarks: with a row-major
token grid a segment is a run of neighbouring tokens, i.e. a local patch of the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from medssl.errors import ConfigError

ATTENTIONS = ("full", "nystrom")


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a batch of square matrices by the iteration of Xiong et al. 2021.

    Args:
        a: ``(..., m, m)``.
        iterations: Newton-type iterations (6 in the paper).

    Returns:
        ``(..., m, m)`` approximation of ``a⁺``.
    """
    m = a.shape[-1]
    eye = torch.eye(m, device=a.device, dtype=a.dtype)
    norm1 = a.abs().sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)  # max column sum
    norm_inf = a.abs().sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)  # max row sum
    z = a.transpose(-1, -2) / (norm1 * norm_inf)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_landmarks: int,
                      pinv_iterations: int = 6) -> torch.Tensor:
    """Nyström approximation of ``softmax(q kᵀ / √d) v`` (see the module docstring).

    Args:
        q, k, v: ``(B, H, n, d)``.
        num_landmarks: ``m``; capped at ``n``. Landmarks are means over ``m`` contiguous, near-equal segments.
        pinv_iterations: iterations of :func:`iterative_pinv`.

    Returns:
        ``(B, H, n, d)`` in the dtype of ``q`` (computed in float32).
    """
    dtype = q.dtype
    n, d = q.shape[-2], q.shape[-1]
    m = max(1, min(int(num_landmarks), n))
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v = q.float() * d**-0.5, k.float(), v.float()
        if m == n:
            q_l, k_l = q, k
        else:
            b, h = q.shape[:2]
            q_l = F.adaptive_avg_pool1d(q.reshape(b * h, n, d).transpose(1, 2), m).transpose(1, 2).reshape(b, h, m, d)
            k_l = F.adaptive_avg_pool1d(k.reshape(b * h, n, d).transpose(1, 2), m).transpose(1, 2).reshape(b, h, m, d)
        kernel_f = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (n, m)
        kernel_a = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (m, m)
        kernel_b = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (m, n)
        out = kernel_f @ (iterative_pinv(kernel_a, pinv_iterations) @ (kernel_b @ v))
    return out.to(dtype)


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nyström approximation; drop-in for timm's ``Attention``.

    Parameter names (``qkv``, ``proj``) are those of timm's attention, so a block's weights keep their keys.

    Args:
        dim: token width.
        num_heads: heads.
        num_landmarks: landmarks ``m`` per head (64 in the Nyströmformer paper).
        pinv_iterations: pseudo-inverse iterations.
        qkv_bias: bias of the qkv projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, num_landmarks: int = 64, pinv_iterations: int = 6,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attention width {dim} is not divisible by {num_heads} heads")
        if num_landmarks < 1:
            raise ConfigError(f"num_landmarks must be >= 1, got {num_landmarks}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("NystromAttention supports neither attention masks nor causal attention")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = nystrom_attention(q, k, v, self.num_landmarks, self.pinv_iterations)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def transformer_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, attention: str = "full",
                      num_landmarks: int = 64) -> Block:
    """A pre-norm transformer block (timm ``Block``) with full or Nyström self-attention.

    Raises:
        ConfigError: an unknown attention kind.
    """
    if attention not in ATTENTIONS:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTIONS)}, got '{attention}'")
    block = Block(dim, num_heads, mlp_ratio, qkv_bias=True)
    if attention == "nystrom":
        block.attn = NystromAttention(dim, num_heads, num_landmarks=num_landmarks)
    return block
