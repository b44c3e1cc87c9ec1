"""ringattn inside PyTorch: the operators pass torch.library.opcheck, a small model trains
under torch.compile(fullgraph=True) with the eager gradients, the seed's DilatedAttention and
MultiheadDilatedAttention are reproduced (forward, gradients, parameter names, state dicts),
and bad input is a ringattn.Error carrying the C++ message."""

import ctypes

import pytest
import torch
from torch import nn

import oracle
import ringattn
from test_functions import assert_close, leaves, qkv, rand


def test_opcheck_dilated_operators():
    q, k, v = leaves(*qkv(b=1, n=64, h=4, hkv=2, d=16, seed=20))
    args = ([16, 64], [1, 2], "groups", True, None, 0, "cpu")
    torch.library.opcheck(torch.ops.ringattn.dilated_attn_fwd.default, (q, k, v, *args))
    out, lse = torch.ops.ringattn.dilated_attn_fwd(q.detach(), k.detach(), v.detach(), *args)
    dout = rand(*q.shape, seed=21)
    torch.library.opcheck(torch.ops.ringattn.dilated_attn_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, *args))


def test_opcheck_block_sparse_operators():
    q, k, v = leaves(*qkv(b=1, n=64, h=2, hkv=2, d=16, seed=22))
    code = ringattn.ops.encode_pattern(ringattn.BlockPattern.local_window(16, 16))
    args = (code, False, None, 0, "cpu")
    torch.library.opcheck(torch.ops.ringattn.block_sparse_attn_fwd.default, (q, k, v, *args))
    out, lse = torch.ops.ringattn.block_sparse_attn_fwd(q.detach(), k.detach(), v.detach(), *args)
    torch.library.opcheck(torch.ops.ringattn.block_sparse_attn_bwd.default,
                          (rand(*q.shape, seed=23), q.detach(), k.detach(), v.detach(), out, lse,
                           *args))


class TinyLongNet(nn.Module):
    """Embedding, one pre-norm block around ringattn's MultiheadDilatedAttention, an MLP, a head."""

    def __init__(self, vocab=64, dim=64, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = ringattn.nn.MultiheadDilatedAttention(dim, heads, [1, 2], [16, 32])
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(self.norm(x), is_causal=True)
        return self.head(x + self.mlp(x))


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager = TinyLongNet()
    twin = TinyLongNet()
    twin.load_state_dict(eager.state_dict())
    compiled_model = torch.compile(twin, fullgraph=True)  # a graph break is an error
    tokens = torch.randint(0, 64, (2, 65), generator=torch.Generator().manual_seed(1))

    def step(model, tokens):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss

    loss = step(eager, tokens)
    compiled_loss = step(compiled_model, tokens)
    assert torch.allclose(loss, compiled_loss, atol=1e-5)
    for (name, p), c in zip(eager.named_parameters(), twin.parameters()):
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert torch.allclose(p.grad, c.grad, atol=1e-5, rtol=1e-4), name


def test_dilated_attention_module_matches_the_seed():
    """The seed's groups-mode algorithm (bench/seed_python.py on torch's attention), forward
    and torch.autograd gradients, on random inputs."""
    module = ringattn.nn.DilatedAttention([32, 64, 128], [1, 2, 4])
    q, k, v = qkv(h=6, hkv=6, seed=24)
    dout = rand(*q.shape, seed=25)
    for causal in (False, True):
        ours = leaves(q, k, v)
        out = module(*ours, is_causal=causal)
        out.backward(dout)
        seed = leaves(q.double(), k.double(), v.double())
        ref = oracle.seed_dilated_attention(*seed, [32, 64, 128], [1, 2, 4], causal)
        ref.backward(dout.double())
        assert_close(out, ref, 1e-5)
        for a, b in zip(ours, seed):
            assert_close(a.grad, b.grad, 1e-5)


def seed_multihead(m, x, causal):
    """The seed's MultiheadDilatedAttention forward (SPEC.md), composed from the module's own
    torch parameters around the seed's attention core."""
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    q, k = m.q_ln(q), m.k_ln(k)
    b, n, e = q.shape
    heads = (b, n, m.num_heads, e // m.num_heads)
    o = oracle.seed_dilated_attention(q.view(heads), k.view(heads), v.view(heads),
                                      m.attention.segment_lengths, m.attention.dilation_rates,
                                      causal)
    return m.out_proj(m.q_ln(o.reshape(b, n, e)))


def test_multihead_matches_the_seed_layer():
    """Forward and every parameter's gradient against the seed's layer computed in fp64 on the
    same (widened) parameters."""
    torch.manual_seed(2)
    m = ringattn.nn.MultiheadDilatedAttention(96, 6, [1, 2, 4], [32, 64, 128])
    ref_m = ringattn.nn.MultiheadDilatedAttention(96, 6, [1, 2, 4], [32, 64, 128],
                                                  dtype=torch.float64)
    ref_m.load_state_dict(m.state_dict())
    x = rand(2, 128, 96, seed=26)
    dy = rand(2, 128, 96, seed=27)
    for causal in (False, True):
        m.zero_grad()
        ref_m.zero_grad()
        y = m(x, is_causal=causal)
        y.backward(dy)
        y_ref = seed_multihead(ref_m, x.double(), causal)
        y_ref.backward(dy.double())
        assert_close(y, y_ref, 2e-5)
        for (name, p), r in zip(m.named_parameters(), ref_m.parameters()):
            assert_close(p.grad, r.grad, 2e-5)


def test_multihead_names_initialisation_and_state_dict():
    m = ringattn.nn.MultiheadDilatedAttention(256, 8, [1, 2], [64, 128], gamma_init=0.5)
    assert sorted(m.state_dict()) == sorted(
        f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj", "q_ln", "k_ln")
        for w in ("weight", "bias"))
    for proj in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
        std = proj.weight.std().item()
        assert abs(std - 0.5 * (2.0 / 512) ** 0.5) < 0.02 * std  # xavier_normal_(gain=0.5)
        assert torch.equal(proj.bias, torch.zeros(256))
    assert torch.equal(m.q_ln.weight, torch.ones(256))
    assert torch.equal(m.k_ln.bias, torch.zeros(256))
    plain = ringattn.nn.MultiheadDilatedAttention(64, 4, [1], [32], bias=False, layer_norm=False)
    assert sorted(plain.state_dict()) == [f"{p}.weight" for p in ("k_proj", "out_proj", "q_proj",
                                                                    "v_proj")]


@pytest.mark.parametrize("layer_norm", [True, False])
def test_fused_cpp_layer_equals_the_module(layer_norm):
    torch.manual_seed(3)
    m = ringattn.nn.MultiheadDilatedAttention(64, 4, [1, 2], [32, 64], layer_norm=layer_norm)
    with torch.no_grad():  # non-trivial norms and biases, so that each one is exercised
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = rand(2, 64, 64, seed=28)
    fused = m.fused()
    for causal in (False, True):
        with torch.no_grad():
            assert_close(fused(x, is_causal=causal), m(x, is_causal=causal), 2e-5)


def test_unsupported_arguments_name_the_alternative():
    m = ringattn.nn.MultiheadDilatedAttention(32, 2, [1], [16], dropout=0.1)
    x = rand(1, 16, 32, seed=29)
    with pytest.raises(ringattn.UnsupportedError, match="attn_mask.*is_causal=True"):
        m.eval()(x, attn_mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ringattn.UnsupportedError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ringattn.UnsupportedError, match="need_weights=False"):
        m(x, need_weights=True)
    with pytest.raises(ringattn.UnsupportedError, match=r"dropout.*\.eval\(\)"):
        m.train()(x)
    assert m.eval()(x).shape == x.shape  # no dropout in eval
    core = ringattn.nn.DilatedAttention([16], [1])
    with pytest.raises(ringattn.UnsupportedError, match="attention_mask"):
        core(*qkv(1, 16, 2, 2, 8), attention_mask=torch.ones(16, 16))
    with pytest.raises(ringattn.Error):
        m(x, need_weights=True)
    assert issubclass(ringattn.UnsupportedError, RuntimeError)
    assert not issubclass(ringattn.UnsupportedError, ValueError)


def error_of(fn):
    with pytest.raises(ringattn.Error) as info:
        fn()
    return info.value


def test_bad_inputs_raise_with_the_cpp_message():
    q, k, v = qkv(b=1, n=64, h=4, hkv=4, d=16)
    call = ringattn.dilated_attn_func
    e = error_of(lambda: call(q[0], k, v, [64], [1]))
    assert isinstance(e, ValueError) and e.code == "invalid_argument"
    assert "q has 3 dimensions [64, 4, 16]; it must be [B, N, H, D]" in str(e)
    e = error_of(lambda: call(q, k.bfloat16(), v, [64], [1]))
    assert "dtypes differ" in str(e) and isinstance(e, ringattn.InvalidArgumentError)
    e = error_of(lambda: call(q.double(), k.double(), v.double(), [64], [1]))
    assert "q has dtype float64" in str(e) and "q.float()" in str(e)
    e = error_of(lambda: call(q, k, v, [48], [1]))
    assert "segment_lengths[0] = 48" in str(e)
    wide = rand(1, 64, 4, 32, seed=30)
    e = error_of(lambda: call(wide[..., ::2], k, v, [64], [1]))
    assert "q.strides[3] = 2" in str(e) and isinstance(e, ValueError)
    e = error_of(lambda: call(q, k, v, [64], [1], mode="dilated"))
    assert "dilated" in str(e) and isinstance(e, ValueError)
    e = error_of(lambda: call(q, k, v, [64, 32], [1]))
    assert "segment_lengths" in str(e)
    e = error_of(lambda: ringattn.BlockPattern.local_window(0, 8))
    assert "block_size" in str(e)


class _FakeCudaArray:
    """A DLPack producer that claims its (host) buffer lives on CUDA device 0."""

    class _DLTensor(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32),
                    ("device_id", ctypes.c_int32), ("ndim", ctypes.c_int32),
                    ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
                    ("shape", ctypes.POINTER(ctypes.c_int64)),
                    ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]

    class _Managed(ctypes.Structure):
        pass

    _Managed._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                         ("deleter", ctypes.c_void_p)]

    def __init__(self, tensor):
        self.tensor = tensor.contiguous()
        self.shape = (ctypes.c_int64 * 4)(*self.tensor.shape)
        self.strides = (ctypes.c_int64 * 4)(*self.tensor.stride())
        self.managed = self._Managed()
        self.managed.dl_tensor = self._DLTensor(self.tensor.data_ptr(), 2, 0, 4, 2, 32, 1,
                                                self.shape, self.strides, 0)

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, **_):
        new_capsule = ctypes.pythonapi.PyCapsule_New
        new_capsule.restype = ctypes.py_object
        new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new_capsule(ctypes.addressof(self.managed), b"dltensor", None)


def test_cuda_tensors_in_this_build_or_without_a_gpu():
    """A CUDA tensor where the build has no CUDA backend, or the machine no usable GPU, is a
    ringattn.Error with the library's message (never a crash or a fallback)."""
    if torch.cuda.is_available() and ringattn.has_cuda:
        pytest.skip("a GPU is present: tests/python/test_cuda.py runs the CUDA tensors")
    q, k, v = qkv(b=1, n=64, h=2, hkv=2, d=16)
    fake = [_FakeCudaArray(t) for t in (q, k, v)]
    out = _FakeCudaArray(torch.empty_like(q))
    spec = ringattn._C.DilatedSpec([64], [1], "groups", False, None)
    e = error_of(lambda: ringattn._C.forward(*fake, out, None, spec, None))
    if ringattn.has_cuda:
        assert isinstance(e, ringattn.DeviceError) and "no CUDA device is usable" in str(e)
    else:
        assert isinstance(e, ringattn.UnsupportedError) and "has no CUDA backend" in str(e), str(e)
