"""QAT through ``quantize_(model, ParetoQQATConfig(...))``: layer selection, forward/backward against
the torchao reference autograd functions, training loops, torch.compile, autocast, checkpoints, deepcopy.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao import quantize_
from torchao.prototype.paretoq.models.utils_quant import LsqBinaryTernaryExtension, StretchedElasticQuant

import paretoq_ao
from paretoq_ao import ParetoQQATConfig, ParetoQQATWeight

pytestmark = pytest.mark.usefixtures("single_thread")

ALL_BITS = [1, 1.58, 2, 3, 4]
GRANULARITIES = [None, 16]  # per-row, and groups of 16 input columns (16 divides 48 and 80)
BITS_X_GRAN = [(b, g) for b in ALL_BITS for g in GRANULARITIES]


def _id(v):
    return "row" if v is None else f"g{v}"


def ce(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def qat_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), ParetoQQATWeight)}


# --------------------------------------------------------------------------------------------------
# Independent oracles (written from the paper / design doc, not from paretoq_ao)
# --------------------------------------------------------------------------------------------------


def ref_init_scale(w, bits, group_size):
    out, inp = w.shape
    groups = 1 if group_size is None else inp // group_size
    a = w.detach().abs().reshape(out, groups, inp // groups)
    if bits == 1:
        return a.mean(-1)
    if bits in (1.58, 2):
        return a.amax(-1)
    return a.amax(-1) / (2 ** (bits - 1) - 1)


def ref_fake_quant(w, alpha, bits):
    """The torchao reference autograd functions. Group scales: each group is treated as a row of a
    reshaped [out * groups, group_size] weight (same numel, hence the same gradient scale)."""
    out, inp = w.shape
    groups = alpha.shape[1]
    wr = w.reshape(out * groups, inp // groups)
    ar = alpha.reshape(out * groups, 1)
    if bits == 2:
        q = StretchedElasticQuant.apply(wr, ar, 2, False)
    elif bits == 1.58:
        q = StretchedElasticQuant.apply(wr, ar, 0, False)
    else:
        q = LsqBinaryTernaryExtension.apply(wr, ar, int(bits), False)
    return q.reshape(out, inp)


# --------------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=[f"{b}-{_id(g)}" for b, g in BITS_X_GRAN])
def test_default_filter_converts_exactly_the_block_linears(make_decoder, bits, group_size):
    model = make_decoder()
    plain = copy.deepcopy(model)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))

    assert sorted(qat_modules(model)) == sorted(model.block_linear_names())
    assert type(model.lm_head.weight) is nn.Parameter
    assert type(model.embed.weight) is nn.Parameter
    assert not hasattr(model.lm_head, "weight_scale")
    for name, mod in qat_modules(model).items():
        w = mod.weight
        ref = plain.get_submodule(name)
        assert w.bits == bits and w.group_size == group_size
        assert w.scale is mod.weight_scale
        assert type(mod.weight_scale) is nn.Parameter and mod.weight_scale.requires_grad
        groups = 1 if group_size is None else ref.in_features // group_size
        assert mod.weight_scale.shape == (ref.out_features, groups)
        assert torch.equal(w.detach(), ref.weight.detach())  # the latent weight is the original
        fmt = mod.weight_qat_format
        assert fmt.dtype == torch.int64
        assert fmt.tolist() == [round(100 * bits), group_size or 0]
        assert dict(mod.named_buffers())["weight_qat_format"] is fmt
        if ref.bias is not None:
            assert torch.equal(mod.bias, ref.bias)
    # state_dict: the old entries unchanged plus weight_scale / weight_qat_format per converted layer
    sd = model.state_dict()
    extra = {f"{n}.{k}" for n in model.block_linear_names() for k in ("weight_scale", "weight_qat_format")}
    assert set(sd) == set(sd_before) | extra
    for k, v in sd_before.items():
        assert torch.equal(sd[k], v), k
        assert type(sd[k]) is torch.Tensor, k
    # the quantized model computes something different from the plain one (fake quantization is on)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert not torch.allclose(model(ids), plain(ids), atol=1e-4)
        assert torch.equal(model.lm_head(torch.ones(1, 48)), plain.lm_head(torch.ones(1, 48)))


def test_default_filter_keeps_tied_head_plain(make_decoder):
    model = make_decoder(tie=True)
    quantize_(model, ParetoQQATConfig(bits=2))
    assert sorted(qat_modules(model)) == sorted(model.block_linear_names())
    assert model.lm_head.weight is model.embed.weight
    assert type(model.lm_head.weight) is nn.Parameter


class _HeadNamedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(32, 32)
        self.output = nn.Linear(32, 40)

    def forward(self, x):
        return self.output(self.body(x))


class _HeadViaGetOutputEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(32, 32)
        self.proj_out = nn.Linear(32, 40)

    def get_output_embeddings(self):
        return self.proj_out


class _HeadTiedToEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.body = nn.Linear(32, 32)
        self.decoder = nn.Linear(32, 40, bias=False)
        self.decoder.weight = self.emb.weight


@pytest.mark.parametrize("cls,head", [(_HeadNamedOutput, "output"), (_HeadViaGetOutputEmbeddings, "proj_out"),
                                      (_HeadTiedToEmbedding, "decoder")])
def test_default_filter_recognises_output_heads(cls, head):
    model = cls()
    quantize_(model, ParetoQQATConfig(bits=2))
    assert sorted(qat_modules(model)) == ["body"]
    assert type(model.get_submodule(head).weight) is nn.Parameter


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_llama_default_filter(make_llama, llama_block_linears, tie):
    model = make_llama(tie=tie)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    quantize_(model, ParetoQQATConfig(bits=2))
    assert sorted(qat_modules(model)) == sorted(llama_block_linears(model))
    assert type(model.lm_head.weight) is nn.Parameter
    assert type(model.model.embed_tokens.weight) is nn.Parameter
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.shape == before.shape and not torch.allclose(after, before, atol=1e-4)


def test_explicit_filter_fn_quantizes_the_head(make_decoder, make_llama, llama_block_linears):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=2), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert sorted(qat_modules(model)) == sorted(model.block_linear_names() + ["lm_head"])
    assert model.lm_head.weight.scale is model.lm_head.weight_scale

    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=3), filter_fn=lambda m, fqn: fqn == "lm_head")
    assert sorted(qat_modules(model)) == ["lm_head"]

    llama = make_llama()
    quantize_(llama, ParetoQQATConfig(bits=2), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert sorted(qat_modules(llama)) == sorted(llama_block_linears(llama) + ["lm_head"])


# --------------------------------------------------------------------------------------------------
# Forward / backward vs the torchao reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=[f"{b}-{_id(g)}" for b, g in BITS_X_GRAN])
def test_initial_scale_matches_paper_init(bits, group_size):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 32, bias=False))
    originals = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    for mod, w in zip((model[0], model[2]), originals):
        expected = ref_init_scale(w, bits, group_size)
        torch.testing.assert_close(mod.weight_scale.detach(), expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(paretoq_ao.init_scale(w, bits, group_size), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=[f"{b}-{_id(g)}" for b, g in BITS_X_GRAN])
@pytest.mark.parametrize("scale_mult", [1.0, 0.6], ids=["init", "clipping"])
def test_forward_and_gradients_match_reference(bits, group_size, scale_mult):
    torch.manual_seed(2)
    lin = nn.Linear(48, 80, bias=True)
    model = nn.Sequential(lin)
    w0 = lin.weight.detach().clone()
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    with torch.no_grad():
        lin.weight_scale.mul_(scale_mult)
    alpha0 = lin.weight_scale.detach().clone()
    torch.testing.assert_close(alpha0, ref_init_scale(w0, bits, group_size) * scale_mult, rtol=1e-6, atol=0)

    x = torch.randn(3, 5, 48)
    r = torch.randn(3, 5, 80)
    x1 = x.clone().requires_grad_()
    out = model(x1)
    (out * r).sum().backward()

    w_ref = w0.clone().requires_grad_()
    a_ref = alpha0.clone().requires_grad_()
    b_ref = lin.bias.detach().clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out_ref = F.linear(x2, ref_fake_quant(w_ref, a_ref, bits), b_ref)
    (out_ref * r).sum().backward()

    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.weight.fake_quantized(), ref_fake_quant(w0, alpha0, bits), rtol=0, atol=1e-7)
    torch.testing.assert_close(lin.weight.grad, w_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.weight_scale.grad, a_ref.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(lin.bias.grad, b_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert type(lin.weight.grad) is torch.Tensor
    assert lin.weight_scale.grad.abs().sum() > 0
    if scale_mult != 1.0 or bits == 1:  # some ratios are outside the range: masked weight gradient
        assert (lin.weight.grad == 0).any()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _train(model, batches, steps, lr=1e-2, accum=1, clip=1.0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in batches(step).chunk(accum):
            loss = model.loss(micro) / accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize("bits,group_size", BITS_X_GRAN, ids=[f"{b}-{_id(g)}" for b, g in BITS_X_GRAN])
def test_training_loop_updates_latent_weights_and_scales(make_decoder, tokens, bits, group_size):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mods = qat_modules(model)
    initial = model.loss(tokens).item()
    losses = _train(model, lambda step: tokens, steps=12, lr=3e-3, accum=2)
    with torch.no_grad():
        final = model.loss(tokens).item()
    for name, mod in mods.items():
        assert isinstance(mod.weight, ParetoQQATWeight) and mod.weight.scale is mod.weight_scale
        assert not torch.equal(mod.weight.detach(), before[f"{name}.weight"]), name
        assert not torch.equal(mod.weight_scale.detach(), before[f"{name}.weight_scale"]), name
        assert torch.isfinite(mod.weight).all() and torch.isfinite(mod.weight_scale).all()
    assert not torch.equal(model.lm_head.weight.detach(), before["lm_head.weight"])
    assert all(math.isfinite(l) for l in losses)
    assert final < initial


@pytest.mark.parametrize("group_size", GRANULARITIES, ids=_id)
def test_two_bit_qat_memorises(make_decoder, group_size):
    """Only the quantized block linears (latent weights + scales) and norms train: the embedding and
    the head are frozen, so the loss can only fall through the 2-bit layers."""
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=2, group_size=group_size))
    model.embed.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (4, 8), generator=g)
    targets = torch.randperm(64, generator=g)[ids]
    scales0 = {n: m.weight_scale.detach().clone() for n, m in qat_modules(model).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / 80)
    losses = []
    for _ in range(60):
        loss = model.loss(ids, targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    for n, m in qat_modules(model).items():
        assert not torch.equal(m.weight_scale.detach(), scales0[n])


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


COMPILE_CASES = [(b, None) for b in ALL_BITS] + [(2, 16)]


@pytest.mark.parametrize("bits,group_size", COMPILE_CASES, ids=[f"{b}-{_id(g)}" for b, g in COMPILE_CASES])
def test_compiled_training_step_matches_eager(make_decoder, tokens, dynamo_reset, bits, group_size):
    eager = make_decoder(n_layers=1)
    quantize_(eager, ParetoQQATConfig(bits=bits, group_size=group_size))
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)

    loss_e = ce(eager(tokens), tokens)
    loss_e.backward()
    loss_c = ce(compiled(tokens), tokens)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)

    params_e = dict(eager.named_parameters())
    params_c = dict(twin.named_parameters())
    assert params_e.keys() == params_c.keys()
    assert {n for n in params_e if n.endswith("weight_scale")} == {f"{n}.weight_scale" for n in eager.block_linear_names()}
    for n, p in params_e.items():
        assert p.grad is not None and params_c[n].grad is not None, n
        torch.testing.assert_close(params_c[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
        if n.endswith("weight_scale"):
            assert p.grad.abs().sum() > 0, n

    # one optimizer step each, then the parameters and the next compiled loss agree with eager
    for model in (eager, twin):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    for n, p in params_e.items():
        # AdamW normalises each gradient: float noise on ~1e-8 gradients moves a weight by ~1e-6
        torch.testing.assert_close(params_c[n], p, rtol=1e-5, atol=2e-5, msg=n)
    for name in eager.block_linear_names():
        m = twin.get_submodule(name)
        assert isinstance(m.weight, ParetoQQATWeight) and m.weight.scale is m.weight_scale
    # (with grad enabled, as in training: the compiled graph is reused, no recompilation)
    torch.testing.assert_close(ce(compiled(tokens), tokens), ce(eager(tokens), tokens), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# bf16 autocast
# --------------------------------------------------------------------------------------------------


AUTOCAST_CASES = [(b, None) for b in ALL_BITS] + [(2, 16)]


@pytest.mark.parametrize("bits,group_size", AUTOCAST_CASES, ids=[f"{b}-{_id(g)}" for b, g in AUTOCAST_CASES])
def test_bf16_autocast_training_step(make_decoder, tokens, bits, group_size):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=bits, group_size=group_size))
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    loss = ce(logits, tokens)
    loss.backward()
    ref_loss = ref.loss(tokens)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 0.01

    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all(), n
        if ".blocks." in f".{n}" and (n.endswith(".weight_scale") or n.endswith("proj.weight")
                                       or n.endswith("up.weight") or n.endswith("down.weight")):
            cos = F.cosine_similarity(p.grad.flatten(), ref_params[n].grad.flatten(), dim=0)
            assert cos > 0.99, (n, cos.item())

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    opt.step()
    for name, mod in qat_modules(model).items():
        assert isinstance(mod.weight, ParetoQQATWeight) and mod.weight.dtype == torch.float32
        assert not torch.equal(mod.weight.detach(), before[f"{name}.weight"])
        assert not torch.equal(mod.weight_scale.detach(), before[f"{name}.weight_scale"])


# --------------------------------------------------------------------------------------------------
# Checkpoints mid-training and deepcopy
# --------------------------------------------------------------------------------------------------


RESUME_CASES = [(1, None), (1.58, 16), (2, None), (2, 16), (3, 8), (4, None)]


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 64, (4, 10), generator=g)


def _make_training(model, total_steps):
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return opt, sched


def _steps(model, opt, sched, start, stop, accum=2):
    losses = []
    for step in range(start, stop):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in _batch(step).chunk(accum):
            loss = model.loss(micro) / accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize("bits,group_size", RESUME_CASES, ids=[f"{b}-{_id(g)}" for b, g in RESUME_CASES])
def test_resume_from_checkpoint_matches_uninterrupted_run(make_decoder, tmp_path, bits, group_size):
    cfg = ParetoQQATConfig(bits=bits, group_size=group_size)
    model = make_decoder(seed=0)
    quantize_(model, cfg)
    opt, sched = _make_training(model, 8)
    _steps(model, opt, sched, 0, 3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path)
    expected_losses = _steps(model, opt, sched, 3, 6)
    expected_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    fresh = make_decoder(seed=7)  # different initial values: everything must come from the checkpoint
    quantize_(fresh, ParetoQQATConfig(bits=bits, group_size=group_size))
    ckpt = torch.load(path, weights_only=True)
    fresh.load_state_dict(ckpt["model"])
    opt2, sched2 = _make_training(fresh, 8)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for name, mod in qat_modules(fresh).items():
        assert isinstance(mod.weight, ParetoQQATWeight) and mod.weight.scale is mod.weight_scale
        assert torch.equal(mod.weight_scale.detach(), ckpt["model"][f"{name}.weight_scale"])
    losses = _steps(fresh, opt2, sched2, 3, 6)

    assert losses == expected_losses
    params = dict(fresh.named_parameters())
    assert params.keys() == expected_params.keys()
    for n, p in expected_params.items():
        assert torch.equal(params[n].detach(), p), n


def test_state_dict_holds_plain_tensors_and_loads_weights_only(make_decoder):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=2, group_size=16))
    with torch.no_grad():
        model.blocks[0].up.weight_scale.mul_(1.5)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert all(type(v) is torch.Tensor for v in sd.values())
    assert torch.equal(sd["blocks.0.up.weight_scale"], model.blocks[0].up.weight_scale.detach())
    assert sd["blocks.0.up.weight_scale"].shape == (80, 3)


def test_deepcopy_keeps_qat_weight_with_its_own_scale(make_decoder, tokens):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=2, group_size=16))
    with torch.no_grad():
        for m in qat_modules(model).values():
            m.weight_scale.mul_(0.8)  # not the initial value: the copy must carry the state
    twin = copy.deepcopy(model)
    for name, m in qat_modules(model).items():
        c = twin.get_submodule(name)
        assert isinstance(c.weight, ParetoQQATWeight)
        assert c.weight.scale is c.weight_scale
        assert c.weight_scale is not m.weight_scale and c.weight is not m.weight
        assert c.weight.data_ptr() != m.weight.data_ptr()
        assert torch.equal(c.weight_scale, m.weight_scale) and torch.equal(c.weight.detach(), m.weight.detach())
        assert (c.weight.bits, c.weight.group_size) == (2, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(tokens), model(tokens), rtol=0, atol=0)

    # the copy trains on its own: gradients reach the copy's scales, the original is untouched
    twin.loss(tokens).backward()
    for name, m in qat_modules(model).items():
        c = twin.get_submodule(name)
        assert c.weight_scale.grad is not None and c.weight.grad is not None
        assert m.weight_scale.grad is None and m.weight.grad is None
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[n]), n
    with torch.no_grad():
        twin.blocks[0].proj.weight_scale.mul_(3.0)
        assert not torch.allclose(twin(tokens), model(tokens), atol=1e-4)

    # the copy's checkpoint check refers to the copy's own format
    other = make_decoder()
    quantize_(other, ParetoQQATConfig(bits=1.58, group_size=16))
    with pytest.raises(ValueError, match="bits=1.58"):
        twin.load_state_dict(other.state_dict())


def test_whole_module_pickle_keeps_the_scale_link(make_decoder, tokens, tmp_path):
    model = make_decoder()
    quantize_(model, ParetoQQATConfig(bits=3, group_size=16))
    with torch.no_grad():
        model.blocks[1].up.weight_scale.mul_(1.3)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for name in model.block_linear_names():
        m = loaded.get_submodule(name)
        assert isinstance(m.weight, ParetoQQATWeight) and m.weight.scale is m.weight_scale
        assert (m.weight.bits, m.weight.group_size) == (3, 16)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    loaded.loss(tokens).backward()
    assert loaded.blocks[1].up.weight_scale.grad is not None


# --------------------------------------------------------------------------------------------------
# A module reachable under two parents
# --------------------------------------------------------------------------------------------------


class _SharedModule(nn.Module):
    """One nn.Linear object registered under two parents ('a.0' and 'b.0'), as in models that reuse
    a layer; torchao's traversal visits it twice."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(32, 32)
        self.a = nn.Sequential(shared, nn.ReLU())
        self.b = nn.Sequential(shared)
        self.c = nn.Linear(32, 16)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_module_shared_by_two_parents():
    model = _SharedModule()
    x = torch.randn(3, 32)
    try:
        quantize_(model, ParetoQQATConfig(bits=2))
    except ValueError:
        # refusing is acceptable, but then the model must really be unchanged
        assert type(model.a[0].weight) is nn.Parameter and type(model.c.weight) is nn.Parameter
        assert not hasattr(model.a[0], "weight_scale")
    else:
        assert model.a[0] is model.b[0]
        assert isinstance(model.a[0].weight, ParetoQQATWeight) and isinstance(model.c.weight, ParetoQQATWeight)
        assert model(x).shape == (3, 16)
