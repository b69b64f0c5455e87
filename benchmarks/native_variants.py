"""GPU time of compiled decode-step RoPE + rotation written in different plain-torch forms.

Why: under torch.compile the default ``auto`` form writes small rotations as plain torch ops
(hf_hadamard_kq/ops/native.py: ``(x[..., :, None] * W).sum(-2)`` with W's signs from ``arange``
bit folding) so that inductor fuses them with RoPE into one reduction kernel. In a Llama-3-8B
decode step at batch 1 those reductions cost more GPU time than the RoPE kernels they replace
(BENCHMARKS.md, session 6). This compiles a stand-in for one layer's step (q/k views of the
projections, rotate-half RoPE, the rotation, the key written into a static cache with
``index_copy_``, like transformers' StaticCache) for each form and times it inside a CUDA graph
of 50 calls (median of 15 replays):

* ``rope_only``: no rotation (what sdpa's compiled step does here);
* ``v0_4folds``: the package's form (4 xor folds of ``i & j``);
* ``v1_3folds``: 3 folds (enough for blocks <= 256);
* ``v3_split2``: one butterfly stage (``H_2 ⊗ H_64``) then a 64-term reduction;
* ``v4_tensor``: the sign matrix as a tensor (a graph constant) instead of ``arange`` bits.

``err``: max abs difference of the compiled query output from the same computation in
float64 (a sanity check that the form computes the rotation; bf16 output).

Usage (GPU): ``python benchmarks/native_variants.py [BATCH]``; prints one JSON line last.
"""
import json
import sys

import torch

dev = "cuda"
B, H, KV, D, T = int(sys.argv[1]) if len(sys.argv) > 1 else 1, 32, 8, 128, 1

def rot_half(x):
    return torch.cat((-x[..., D // 2:], x[..., : D // 2]), -1)

def rope(q, k, cos, sin):
    return q * cos + rot_half(q) * sin, k * cos + rot_half(k) * sin

def signs(n, device, dtype, shifts):
    i = torch.arange(n, device=device)
    p = i[:, None] & i[None, :]
    for s in shifts:
        p = p ^ (p >> s)
    return 1 - 2 * (p & 1).to(dtype)

def dense(x, shifts, w=None):
    xs = x.reshape(*x.shape[:-1], D, 1).float()
    w = signs(D, x.device, torch.float32, shifts) if w is None else w
    return ((xs * w).sum(-2) * D ** -0.5).to(x.dtype)

def split2(x, shifts):
    xf = x.float()
    lo, hi = xf[..., : D // 2], xf[..., D // 2:]
    u = torch.stack((lo + hi, lo - hi), -2)  # (..., 2, 64)
    w = signs(D // 2, x.device, torch.float32, shifts)
    y = (u[..., :, None] * w).sum(-2)  # (..., 2, 64)
    return (y.reshape(*x.shape) * D ** -0.5).to(x.dtype)

W = signs(D, dev, torch.float32, (8, 4, 2, 1))
variants = {
    "rope_only": None,
    "v0_4folds": lambda x: dense(x, (8, 4, 2, 1)),
    "v1_3folds": lambda x: dense(x, (4, 2, 1)),
    "v3_split2": lambda x: split2(x, (4, 2, 1)),
    "v4_tensor": lambda x: dense(x, (), W),
}
res = {}
for name, rot in variants.items():
    torch._dynamo.reset()
    kc = torch.zeros(B, KV, 4096, D, device=dev, dtype=torch.bfloat16)
    def step(qp, kp, cos, sin, pos, rot=rot, kc=kc):
        q = qp.view(B, T, H, D).transpose(1, 2)
        k = kp.view(B, T, KV, D).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        if rot is not None:
            q, k = rot(q), rot(k)
        kc.index_copy_(2, pos, k)
        return q * 0.088
    f = torch.compile(step, fullgraph=True, dynamic=False)
    qp = torch.randn(B, T, H * D, device=dev, dtype=torch.bfloat16)
    kp = torch.randn(B, T, KV * D, device=dev, dtype=torch.bfloat16)
    cos = torch.randn(1, 1, T, D, device=dev, dtype=torch.bfloat16)
    sin = torch.randn(1, 1, T, D, device=dev, dtype=torch.bfloat16)
    pos = torch.tensor([7], device=dev)
    out = f(qp, kp, cos, sin, pos)
    if rot is not None:  # check vs float64
        qr, _ = rope(qp.view(B, T, H, D).transpose(1, 2).double(),
                     kp.view(B, T, KV, D).transpose(1, 2).double(), cos.double(), sin.double())
        ref = dense(qr, (8, 4, 2, 1)) * 0.088
        err = (out.double() - ref).abs().max().item()
    else:
        err = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            f(qp, kp, cos, sin, pos)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(50):
            f(qp, kp, cos, sin, pos)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(15):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / 50)
    ts.sort()
    res[name] = dict(us=round(ts[len(ts) // 2], 3), min=round(ts[0], 3), err=err)
    print(name, res[name], flush=True)
print(json.dumps(res))
