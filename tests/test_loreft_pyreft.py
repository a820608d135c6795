"""Our LoReFT intervention against pyreft's reference ``LoreftIntervention`` (Wu et al., 2024) on the same weights.

pyreft 0.1.0 and pyvene 0.1.8 are installed by ``make install`` without their dependencies (pyreft pins
transformers 4.45; both import and run on our stack): a cross-check, not a dependency of the toolkit. Under
CI=true a skipped test fails, so there the import must succeed.
"""

import pytest
import torch

from rlhf.reft import LoReFTIntervention

pyreft = pytest.importorskip(
    "pyreft", reason="pyreft is installed by `make install` (pip install --no-deps pyreft==0.1.0 pyvene==0.1.8)"
)


def reference_like(ours: LoReFTIntervention):
    """pyreft's intervention holding our R, W, b, through its own ``load_state_dict``.

    pyreft keeps R^T (d, r) as ``rotate_layer.weight`` (``x @ weight`` = R x) and W, b in ``learned_source``.
    """
    d, r = ours.rotate.weight.shape[1], ours.rotate.weight.shape[0]
    theirs = pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=r, dtype=torch.float32)  # default: bfloat16
    theirs.load_state_dict({"weight": ours.learned.weight.detach().clone(), "bias": ours.learned.bias.detach().clone(),
                            "rotate_layer": ours.rotate.weight.detach().T.clone()})  # fmt: skip
    return theirs.eval()


@pytest.mark.parametrize("d, r", [(16, 4), (32, 1)])
def test_same_weights_give_the_same_output(d, r):
    torch.manual_seed(d + r)
    ours = LoReFTIntervention(d, r)  # R: a random orthonormal (r, d); W = R, b = 0 at initialisation
    with torch.no_grad():
        ours.learned.weight.normal_()
        ours.learned.bias.normal_()
    theirs = reference_like(ours)
    R = ours.rotate.weight.detach()
    assert torch.allclose(theirs.rotate_layer.weight.detach(), R.T, atol=1e-6)
    assert torch.allclose(R @ R.T, torch.eye(r), atol=1e-5)

    h = torch.randn(3, 5, d)  # (B, T, d)
    with torch.no_grad():
        got, want = ours(h), theirs(h)
        by_hand = h + (h @ ours.learned.weight.T + ours.learned.bias - h @ R.T) @ R  # h + R^T (W h + b - R h)
    assert (got - want).abs().max() < 1e-6
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert not torch.allclose(got, h, atol=1e-3)  # the edit is not the identity


def test_identity_at_initialisation_and_orthonormal_rotation():
    """W = R, b = 0 at the start: both implementations then leave h unchanged."""
    torch.manual_seed(0)
    ours = LoReFTIntervention(24, 3)
    theirs = reference_like(ours)
    h = torch.randn(2, 4, 24)
    with torch.no_grad():
        assert (ours(h) - h).abs().max() < 1e-6
        assert (theirs(h) - h).abs().max() < 1e-6
