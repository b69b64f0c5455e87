"""torch.compile (no graph breaks from us; compiled generate), accelerate offloading (CPU and
disk, at load and with accelerate's helpers) and autograd through a rotated model.

The CUDA-graph ("reduce-overhead") and GPU offload tests carry the ``gpu`` marker and run on
the device machine (``python -m pytest -m gpu``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, StaticCache

import hf_hadamard_kq
from tests import tiny_models as tm

GEN = dict(do_sample=False, pad_token_id=0)


# ---------------------------------------------------------------- torch.compile


def _decode_step_inputs(model, cache_len=16):
    """A static cache holding a 7-token prefill, and the next token's inputs."""
    ids, mask = tm.prompt(seq=7)
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **tm.with_cache(model, cache))
    nxt = out.logits[:, -1:].argmax(-1)
    full_mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    full_mask = torch.nn.functional.pad(full_mask, (0, cache_len - full_mask.shape[1]))
    return dict(input_ids=nxt, attention_mask=full_mask, position_ids=torch.full((2, 1), 7),
                cache_position=torch.tensor([7]), **tm.with_cache(model, cache))


@pytest.mark.parametrize("compile_form", ["op", "auto"], indirect=True)
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_neox"])
def test_decode_step_fullgraph_no_graph_breaks(name, compile_form):
    """torch._dynamo.explain on one static-cache decode step: one graph, zero breaks (our
    pre-hook, cache view and the rotation all trace), as for the plain model. With the op
    form the rotations are our custom op (2 per layer: q and k); with the default ``auto``
    form these small decode tensors are traced as plain torch ops (no custom-op node)."""
    results = {}
    for label, model in (("plain", tm.base_model(name)), ("ours", tm.rotated(name))):
        torch._dynamo.reset()
        with torch.no_grad():
            results[label] = torch._dynamo.explain(model)(**_decode_step_inputs(model))
    plain, ours = results["plain"], results["ours"]
    assert plain.graph_break_count == 0
    assert ours.graph_break_count == 0, [str(r.reason) for r in ours.break_reasons]
    assert ours.graph_count == plain.graph_count == 1
    ops = [n for g in ours.graphs for n in g.graph.nodes
           if n.op == "call_function" and "hadamard_kq" in str(n.target)]
    assert len(ops) == (2 * tm.COMMON["num_hidden_layers"] if compile_form == "op" else 0)


def assert_compiled_forward_generate_matches_plain():
    """generate() of a rotated tiny Llama with forward = torch.compile(fullgraph=True)
    (inductor, CPU) and a static cache gives the plain model's tokens. Returns the plain and
    rotated (compiled-forward) models and the prompt, for further checks."""
    plain, ours = tm.base_model("llama"), tm.rotated("llama")
    ours.forward = torch.compile(ours.forward, fullgraph=True)
    ids, mask = tm.prompt(seq=7)
    kw = dict(max_new_tokens=6, cache_implementation="static", **GEN)
    want = plain.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), want)
    return plain, ours, ids, mask


def assert_logits_and_rotated_keys(plain, ours, run, c_plain, c_ours, ids, mask) -> None:
    """``run`` (``ours`` itself, or a compiled form of it) gives the plain model's logits, and
    ``c_ours`` holds the plain model's cached keys rotated in float64."""
    from tests.oracles import rotate64

    with torch.no_grad():
        want = plain(ids, attention_mask=mask, **tm.with_cache(plain, c_plain)).logits
        got = run(ids, attention_mask=mask, **tm.with_cache(ours, c_ours)).logits
    assert tm.max_diff(got, want) < 1e-5
    for k_ours, k_plain in zip(tm.cache_keys(c_ours), tm.cache_keys(c_plain)):
        assert tm.max_diff(k_ours, rotate64(k_plain, tm.HEAD_DIM)) < 1e-5


def test_generate_with_compiled_forward():
    """generate() with forward = torch.compile(fullgraph=True) (inductor, CPU) and a static
    cache gives the plain model's tokens."""
    torch._dynamo.reset()
    assert_compiled_forward_generate_matches_plain()


def test_compile_with_a_graph_break_inside_attention():
    """torch.compile without fullgraph, with a graph break inside every attention module (here
    a user pre-hook): dynamo resumes mid-module and must guard on our per-call cache view
    (it reads its ``__dict__``). Same logits as the plain model, keys rotated once."""
    plain = tm.base_model("llama")
    ours = tm.rotated("llama")

    def graph_break(module, args, kwargs):
        torch._dynamo.graph_break()

    for layer in ours.model.layers:
        layer.self_attn.register_forward_pre_hook(graph_break, with_kwargs=True)
    torch._dynamo.reset()
    compiled = torch.compile(ours)
    ids, mask = tm.prompt()
    from transformers import DynamicCache

    c_plain, c_ours = DynamicCache(config=plain.config), DynamicCache(config=ours.config)
    assert_logits_and_rotated_keys(plain, ours, compiled, c_plain, c_ours, ids, mask)


def cuda_graph_generate_setup(name: str):
    """``(ours, ids, kwargs, want)``: the rotated model on CUDA, a prompt, ``generate`` kwargs
    for transformers' auto-compile with a static cache and ``mode="reduce-overhead"`` (CUDA
    graphs), and the plain model's tokens for them (uncompiled)."""
    from transformers import CompileConfig

    plain = tm.fresh(name).to("cuda")
    ours = tm.rotated(name).to("cuda")
    ids, mask = (t.to("cuda") for t in tm.prompt(seq=7))
    kw = dict(attention_mask=mask, max_new_tokens=8, cache_implementation="static", **GEN)
    want = plain.generate(ids, disable_compile=True, **kw)
    kw["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
    return ours, ids, kw, want


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_generate_cuda_graphs_reduce_overhead(name):
    """transformers' own generate auto-compile (static cache, mode="reduce-overhead", i.e.
    CUDA graphs) on a rotated model: same tokens as the plain model, and inductor did not skip
    CUDA-graph capture."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ours, ids, kw, want = cuda_graph_generate_setup(name)
    for _ in range(2):  # capture, then replay
        assert torch.equal(ours.generate(ids, **kw), want)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["stats"]["unique_graphs"] >= 1


# ---------------------------------------------------------------- accelerate


@pytest.fixture(scope="module")
def llama_r3_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_r3")
    hf_hadamard_kq.save_r3_pretrained(tm.rotated("llama"), path)
    return path


def _tokens(model, device="cpu"):
    ids, mask = tm.prompt(seq=7)
    return model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=6,
                          **GEN).cpu()


@pytest.mark.parametrize("device_map", ["cpu+disk", "auto-max-memory"])
def test_device_map_offload_at_load(llama_r3_checkpoint, tmp_path, device_map):
    """from_pretrained(..., device_map=...) with layers offloaded to disk: the load probe and
    generation run through accelerate's hooks and give the plain model's tokens."""
    if device_map == "cpu+disk":
        kw = dict(device_map={"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                              "model.layers.0": "cpu", "model.layers.1": "disk",
                              "model.norm": "cpu", "lm_head": "cpu"})
    else:  # accelerate's planner, with so little memory that some layers go to disk
        kw = dict(device_map="auto", max_memory={"cpu": "40KB"})
    model = AutoModelForCausalLM.from_pretrained(
        llama_r3_checkpoint, attn_implementation="hadamard_kq", offload_folder=tmp_path, **kw)
    assert "disk" in set(model.hf_device_map.values())
    offloaded = [m for m in model.modules() if getattr(m, "q_proj", None) is not None
                 and m.q_proj.weight.device.type == "meta"]
    assert offloaded, "no attention layer was offloaded"
    assert hf_hadamard_kq.rotation_table(model)
    assert torch.equal(_tokens(model), _tokens(tm.base_model("llama")))


@pytest.mark.parametrize("helper", ["cpu_offload", "disk_offload"])
@pytest.mark.parametrize("order", ["rotate_then_offload", "offload_then_rotate"])
def test_accelerate_offload_helpers(helper, order, tmp_path):
    import accelerate

    def offload(model):
        if helper == "cpu_offload":
            return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        return accelerate.disk_offload(model, tmp_path, execution_device=torch.device("cpu"))

    if order == "rotate_then_offload":
        model = tm.rotated("llama")
        offload(model)
    else:
        model = tm.fresh("llama")
        offload(model)
        hf_hadamard_kq.apply_r3(model)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert torch.equal(_tokens(model), _tokens(tm.base_model("llama")))


@pytest.mark.gpu
def test_device_map_cpu_and_disk_offload_gpu(llama_r3_checkpoint, tmp_path):
    """GPU execution with one layer offloaded to CPU and one to disk."""
    model = AutoModelForCausalLM.from_pretrained(
        llama_r3_checkpoint, attn_implementation="hadamard_kq", offload_folder=tmp_path,
        device_map={"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": "cpu",
                    "model.layers.1": "disk", "model.norm": 0, "lm_head": 0})
    assert torch.equal(_tokens(model, "cuda"), _tokens(tm.fresh("llama").to("cuda"), "cuda"))


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("name,checkpointing", [("llama", False), ("llama", True),
                                                ("gemma2", False), ("gpt_neox", False),
                                                ("qwen3_moe", False)])
def test_training_step_gradients_match(name, checkpointing):
    """A training step (no cache, as in fine-tuning / QAT) through the rotated model gets the
    unrotated model's loss and gradients, and after an SGD step the same next loss."""
    ids, mask = tm.prompt(seq=9)
    labels = ids.masked_fill(mask == 0, -100)
    losses, grads, next_losses = {}, {}, {}
    for label, model in (("plain", tm.fresh(name)), ("ours", tm.rotated(name))):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        losses[label] = out.loss.detach()
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters()
                        if p.grad is not None}
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        with torch.no_grad():
            next_losses[label] = model(ids, attention_mask=mask, labels=labels,
                                       use_cache=False).loss
    assert abs(losses["ours"] - losses["plain"]) < 1e-5
    assert grads["ours"].keys() == grads["plain"].keys()
    attn_grads = 0
    for n, g in grads["plain"].items():
        tol = 1e-4 * max(g.abs().max().item(), 1e-3)
        assert tm.max_diff(grads["ours"][n], g) <= tol, n
        attn_grads += any(k in n for k in ("q_proj", "k_proj", "query_key_value"))
    assert attn_grads >= tm.COMMON["num_hidden_layers"]  # gradients reached q/k projections
    assert abs(next_losses["ours"] - next_losses["plain"]) < 1e-5
