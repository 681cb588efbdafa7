"""Routing traces equal what each architecture's experts module was really given, padded or not, prefill or decode."""

import contextlib

import numpy as np
import peft
import pytest
import torch

from cfmoe.routing import DECODE, PREFILL, RoutingTrace, record_routing, trace_forward, trace_generate
from tiny_models import ARCHITECTURES, EOS_ID, PAD_ID, tiny_moe, tiny_tokenizer

PROMPTS = ["the cat sat", "a", "routing is local, sometimes"]


@contextlib.contextmanager
def experts_calls(model):
    """Independent ground truth: wrap every `*.experts` module's forward to keep the indices it is called with."""
    calls, patched = {}, []
    for name, module in model.named_modules():
        if name.endswith(".experts"):
            calls[name] = []

            def forward(*args, _orig=module.forward, _sink=calls[name], **kwargs):
                indices = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
                _sink.append(indices.clone())
                return _orig(*args, **kwargs)

            module.forward = forward
            patched.append(module)
    try:
        yield calls
    finally:
        for module in patched:
            del module.forward


def own_experts(model, ids) -> np.ndarray:
    """(n_tokens, n_layers, top_k) experts the unpatched-path model uses for one unpadded sequence."""
    with experts_calls(model) as calls, torch.no_grad():
        model(input_ids=torch.as_tensor(ids)[None])
    return torch.stack([c[0] for c in calls.values()], dim=1).numpy()


def padded(sequences, side):
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), PAD_ID)
    mask = torch.zeros_like(ids)
    for b, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[b, cols], mask[b, cols] = torch.tensor(seq), 1
    return ids, mask


def random_sequences(seed, lengths=(9, 3, 14)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trace_forward_equals_experts_module_input(arch, side):
    model = tiny_moe(arch)
    sequences = random_sequences(seed=1)
    ids, mask = padded(sequences, side)
    with experts_calls(model) as calls:
        traces = trace_forward(model, ids, mask, record_probs=True)
    batch_indices = torch.stack([c[0] for c in calls.values()], dim=1).reshape(*ids.shape, len(calls), -1)
    for b, (trace, seq) in enumerate(zip(traces, sequences)):
        assert trace.token_ids.tolist() == seq
        assert (trace.phase == PREFILL).all()
        # what this batch's experts modules received, padding dropped
        np.testing.assert_array_equal(trace.experts, batch_indices[b, mask[b].bool()].numpy())
        # and the same as the sequence run alone: padding changes nothing
        np.testing.assert_array_equal(trace.experts, own_experts(model, seq))
        np.testing.assert_allclose(trace.probs.astype(np.float32).sum(-1), 1, atol=1e-2)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "deepseek_v3"])
def test_softmax_probs_rank_the_chosen_experts_first(arch):
    trace = trace_forward(tiny_moe(arch), [random_sequences(seed=2)[2]], record_probs=True)[0]
    chosen = np.take_along_axis(trace.probs, trace.experts.astype(np.int64), axis=-1)
    others = trace.probs.copy()
    np.put_along_axis(others, trace.experts.astype(np.int64), -1, axis=-1)
    assert (chosen.min(-1) >= others.max(-1)).all()


def test_deepseek_probs_are_normalised_sigmoid_scores():
    model = tiny_moe("deepseek_v3")
    seq = random_sequences(seed=3)[0]
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        hidden = {}
        handle = router.register_forward_pre_hook(lambda m, args: hidden.setdefault("h", args[0]))
        trace = trace_forward(model, [seq], record_probs=True)[0]
        handle.remove()
        scores = torch.sigmoid(hidden["h"].reshape(-1, 32) @ router.weight.T)
    expected = (scores / scores.sum(-1, keepdim=True)).numpy()
    np.testing.assert_allclose(trace.probs[:, 0].astype(np.float32), expected, atol=1e-3)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match",
                            "ignore:`is_gradient_checkpointing`")
@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss"])
def test_trace_forward_through_peft_lora_on_experts(arch):
    model = tiny_moe(arch)
    config = peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    wrapped = peft.get_peft_model(model, config)
    sequences = random_sequences(seed=4)
    ids, mask = padded(sequences, "left")
    with experts_calls(wrapped) as calls:
        traces = trace_forward(wrapped, ids, mask)
    assert len(calls) == 2  # one patched (outermost peft) experts module per MoE layer
    for b, trace in enumerate(traces):
        batch_indices = torch.stack([c[0] for c in calls.values()], dim=1).reshape(*ids.shape, 2, -1)
        np.testing.assert_array_equal(trace.experts, batch_indices[b, mask[b].bool()].numpy())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trace_generate_phases_and_decode_equal_teacher_forcing(arch):
    model, tokenizer = tiny_moe(arch), tiny_tokenizer()
    traces = trace_generate(model, tokenizer, PROMPTS, record_probs=True, max_new_tokens=5, do_sample=False)
    reference = model.generate(**tokenizer(PROMPTS, return_tensors="pt", padding=True), max_new_tokens=5,
                               do_sample=False, eos_token_id=None)
    for trace, prompt, ref in zip(traces, PROMPTS, reference):
        generated = ref[-5:].tolist()
        generated = generated[:generated.index(EOS_ID) + 1] if EOS_ID in generated else generated
        n_prompt = len(prompt)  # one token per character
        assert trace.phase.tolist() == [PREFILL] * n_prompt + [DECODE] * len(generated)
        assert trace.token_ids.tolist() == tokenizer(prompt).input_ids + generated
        teacher = trace_forward(model, trace.token_ids, record_probs=True)[0]
        # KV-cache decode against a full forward in float32: identical top-k in every architecture
        np.testing.assert_array_equal(trace.experts, teacher.experts)
        np.testing.assert_allclose(trace.probs.astype(np.float32), teacher.probs.astype(np.float32), atol=2e-3)
    assert [t.decode.n_tokens for t in traces] != [5, 5, 5] or arch != "mixtral"  # mixtral's 3rd prompt hits EOS


def test_trace_generate_stops_each_sequence_at_eos():
    model, tokenizer = tiny_moe("qwen2_moe"), tiny_tokenizer()
    free = trace_generate(model, tokenizer, PROMPTS, max_new_tokens=6, eos_token_id=[])  # no EOS at all
    eos = int(free[0].decode.token_ids[1])  # the first prompt's 2nd generated token becomes the EOS
    stopped = trace_generate(model, tokenizer, PROMPTS, max_new_tokens=6, eos_token_id=eos)
    for before, after in zip(free, stopped):
        generated = before.decode.token_ids.tolist()
        n_new = generated.index(eos) + 1 if eos in generated else 6
        assert after.decode.token_ids.tolist() == generated[:n_new]
        np.testing.assert_array_equal(after.experts, before.experts[:after.n_tokens])
    assert stopped[0].decode.n_tokens == 2


def test_record_routing_removes_hooks_even_on_error():
    model = tiny_moe("mixtral")
    hooked = [m for name, m in model.named_modules() if name.endswith((".experts", ".gate"))]
    with pytest.raises(RuntimeError, match="boom"):
        with record_routing(model, record_probs=True) as recorder:
            assert all(m._forward_pre_hooks or m._forward_hooks for m in hooked)
            raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in hooked)
    assert recorder.n_calls == 0


def test_record_routing_one_entry_per_forward():
    model = tiny_moe("olmoe")
    with record_routing(model, record_probs=True) as recorder, torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
        model(input_ids=torch.tensor([[8, 9], [10, 11]]))
    (e1, p1), (e2, p2) = recorder.calls()
    assert e1.shape == (3, 2, 2) and e2.shape == (4, 2, 2)
    assert p1.shape == (3, 2, 8) and p2.dtype == np.float16


def make_trace(n_tokens=7, with_probs=True):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8), size=(n_tokens, 3)) if with_probs else None
    return RoutingTrace(experts=rng.integers(0, 8, (n_tokens, 3, 2)), probs=probs,
                        phase=np.array([PREFILL] * 4 + [DECODE] * (n_tokens - 4)),
                        token_ids=rng.integers(0, 100, n_tokens), n_experts=8, meta={"note": "synthetic"})


@pytest.mark.parametrize("with_probs", [True, False])
def test_save_load_round_trip(tmp_path, with_probs):
    trace = make_trace(with_probs=with_probs)
    assert trace.experts.dtype == np.int16 and trace.phase.dtype == np.uint8 and trace.token_ids.dtype == np.int32
    loaded = RoutingTrace.load(trace.save(tmp_path / "t.npz"))
    for name in ("experts", "phase", "token_ids"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
        assert getattr(loaded, name).dtype == getattr(trace, name).dtype
    if with_probs:
        np.testing.assert_array_equal(loaded.probs, trace.probs)
    else:
        assert loaded.probs is None
    assert (loaded.n_experts, loaded.meta) == (8, {"note": "synthetic"})
    assert loaded.decode.n_tokens == 3 and loaded.decode.top_k == 2 and loaded.n_layers == 3


def test_generated_trace_round_trips(tmp_path):
    trace = trace_generate(tiny_moe("deepseek_v3"), tiny_tokenizer(), PROMPTS[:2], record_probs=True,
                           max_new_tokens=3)[1]
    loaded = RoutingTrace.load(trace.save(tmp_path / "g.npz"))
    np.testing.assert_array_equal(loaded.experts, trace.experts)
    assert loaded.meta == trace.meta and loaded.meta["architecture"] == "deepseek_v3"


def test_truncated_file_raises_naming_it(tmp_path):
    path = make_trace().save(tmp_path / "t.npz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="t.npz"):
        RoutingTrace.load(path)


def test_non_trace_files_raise(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not a trace")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    for path in (text, other):
        with pytest.raises(ValueError, match=path.name):
            RoutingTrace.load(path)


def test_wrong_version_or_values_raise(tmp_path):
    trace = make_trace()
    arrays = dict(np.load(trace.save(tmp_path / "t.npz")))
    for change, message in [({"schema_version": np.int32(99)}, "schema_version"),
                            ({"experts": np.full((7, 3, 2), 8, np.int16)}, r"\[0, n_experts=8\)"),
                            ({"phase": np.full(7, 2, np.uint8)}, "phase"),
                            ({"token_ids": np.zeros(7, np.int64)}, "token_ids has dtype int64"),
                            ({"probs": np.zeros((7, 3, 5), np.float16)}, "probs must have shape")]:
        path = tmp_path / "bad.npz"
        np.savez(path, **(arrays | change))
        with pytest.raises(ValueError, match=message):
            RoutingTrace.load(path)


def test_construction_validates():
    with pytest.raises(ValueError, match="phase"):
        RoutingTrace(np.zeros((2, 1, 1), int), None, np.array([0, 3]), np.array([1, 2]), 4)
    with pytest.raises(ValueError, match="n_experts=4"):
        RoutingTrace(np.full((2, 1, 1), 4), None, np.array([0, 1]), np.array([1, 2]), 4)


def test_bad_inputs_raise_value_error():
    model, tokenizer = tiny_moe("qwen3_moe"), tiny_tokenizer()
    with pytest.raises(ValueError, match="same shape"):
        trace_forward(model, torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty list of strings"):
        trace_generate(model, tokenizer, "not a list")
    with pytest.raises(ValueError, match="at least one token"):
        trace_generate(model, tokenizer, ["ab", ""])
    with pytest.raises(ValueError, match="num_beams=2"):
        trace_generate(model, tokenizer, ["ab"], num_beams=2)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        trace_generate(model, tokenizer, ["ab"])
