"""DINOv2 losses against hand-computed values; Sinkhorn-Knopp across 2 gloo ranks."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lspretrain.methods.ssl_losses import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from lspretrain.models.heads import DINOHead


def ce(t, s_logits, temp):
    """-sum t log softmax(s/temp), by hand for a 2-class row."""
    z = [v / temp for v in s_logits]
    lse = math.log(sum(math.exp(v) for v in z))
    return -sum(ti * (zi - lse) for ti, zi in zip(t, z))


def test_dino_loss_by_hand():
    g0, g1, loc = [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]
    t0, t1 = [0.9, 0.1], [0.2, 0.8]
    student = [torch.tensor([g0]), torch.tensor([g1]), torch.tensor([loc])]
    teacher = [torch.tensor([t0]), torch.tensor([t1])]
    # pairs: g0-t1, g1-t0 (never the same view), and the local crop against both teachers
    expected = (ce(t1, g0, 0.1) + ce(t0, g1, 0.1) + ce(t0, loc, 0.1) + ce(t1, loc, 0.1)) / 4
    assert dino_loss(student, teacher, student_temp=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_ibot_loss_by_hand():
    masks = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # the 3 masked patches, in mask order
    t = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]])
    per = [ce(t[i].tolist(), s[i].tolist(), 0.1) for i in range(3)]
    # image 0: mean of its 2 patches; image 1: nothing masked (0); image 2: its 1 patch; / 3 images
    expected = ((per[0] + per[1]) / 2 + 0 + per[2]) / 3
    assert ibot_loss(s, t, masks, student_temp=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_by_hand_and_edge_cases():
    pts = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # normalised: 0°, 90°, 180°
    assert koleo_loss(pts).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    one = torch.randn(1, 8, requires_grad=True)
    loss = koleo_loss(one)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable: every rank can call backward
    dup = torch.ones(4, 8, requires_grad=True)
    loss = koleo_loss(dup)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(dup.grad).all()


def test_sinkhorn_knopp_normalises_rows_and_columns():
    torch.manual_seed(0)
    logits = torch.randn(16, 8)
    q = sinkhorn_knopp(logits, temp=0.5, n_iterations=50)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))  # each sample: a distribution
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 16 / 8), rtol=1e-3, atol=1e-3)  # equal mass per prototype
    q3 = sinkhorn_knopp(logits, temp=0.5)  # the 3-iteration default still gives distributions
    torch.testing.assert_close(q3.sum(dim=1), torch.ones(16))


def test_softmax_center_by_hand():
    c = SoftmaxCenter(2, momentum=0.9)
    t = torch.tensor([[1.0, 3.0], [3.0, 1.0], [2.0, 5.0]])
    probs = c(t, temp=0.5)
    torch.testing.assert_close(probs, torch.softmax(t / 0.5, dim=-1))  # center starts at 0
    torch.testing.assert_close(c.center, 0.1 * torch.tensor([[2.0, 3.0]]))
    probs2 = c(t, temp=0.5)
    torch.testing.assert_close(probs2, torch.softmax((t - torch.tensor([[0.2, 0.3]])) / 0.5, dim=-1))


def test_dino_head_shapes_and_normalised_prototypes():
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 100)
    assert out.abs().max() <= 1.0 + 1e-5  # cosine between unit bottleneck and unit prototypes
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)  # the scale of a prototype does not matter
    torch.testing.assert_close(head(torch.ones(2, 32)), head(torch.ones(2, 32)))


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sk_worker(rank, port, path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    logits = torch.randn(12, 10)
    center = SoftmaxCenter(10, momentum=0.5)
    probs = center(logits[rank * 6:(rank + 1) * 6], temp=0.3)
    uneven = logits[:4] if rank == 0 else logits[4:]  # like masked patches: 4 on one rank, 8 on the other
    out = {"sk": sinkhorn_knopp(logits[rank * 6:(rank + 1) * 6], temp=0.3), "center": center.center, "probs": probs,
           "sk_uneven": sinkhorn_knopp(uneven, temp=0.3)}
    torch.save(out, f"{path}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sinkhorn_and_center_all_reduce_over_ranks(tmp_path):
    mp.spawn(_sk_worker, args=(_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    logits = torch.randn(12, 10)
    whole = sinkhorn_knopp(logits, temp=0.3)
    center = SoftmaxCenter(10, momentum=0.5)
    center(logits, temp=0.3)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([p["sk"] for p in parts]), whole)
    torch.testing.assert_close(torch.cat([p["sk_uneven"] for p in parts]), whole)
    for p in parts:
        torch.testing.assert_close(p["center"], center.center)
