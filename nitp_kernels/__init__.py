"""nitp_kernels: fused Next Implicit Token Prediction (NITP) + cross-entropy losses for PyTorch.

    from nitp_kernels import fused_nitp_loss, NITPProjector
    out = fused_nitp_loss(hidden, lm_head.weight, labels, shallow, projector)
    out.loss.backward()
"""
from .api import LinearCrossEntropyOutput, NITPLossOutput, fused_linear_cross_entropy, fused_nitp_loss
from .chunked import default_chunk_size
from .geometry import average_cosine_similarity, effective_rank
from .modules import NITPLoss, NITPProjector

__all__ = ["fused_nitp_loss", "fused_linear_cross_entropy", "NITPProjector", "NITPLoss", "NITPLossOutput",
           "LinearCrossEntropyOutput",
           "default_chunk_size", "effective_rank", "average_cosine_similarity"]
__version__ = "0.1.0"
