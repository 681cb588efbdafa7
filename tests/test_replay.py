"""Routing replay is exact, and external traces (CSV, a directory of CSVs, our .npz) read into RoutingTraces."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from cfmoe.routing import (DECODE, PREFILL, RoutingTrace, concurrent_requests, default_layer_map, read_trace,
                           record_routing, replay_routing, trace_forward, trace_generate)
from cfmoe.serving import OffloadEngine
from tiny_models import ARCHITECTURES, tiny_moe, tiny_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "routing_csv"


def random_trace(n_tokens, n_layers, n_experts, k, seed=0):
    rng = np.random.default_rng(seed)
    experts = np.stack([[rng.choice(n_experts, k, replace=False) for _ in range(n_layers)] for _ in range(n_tokens)])
    return RoutingTrace(experts, None, np.zeros(n_tokens, int), np.zeros(n_tokens, int), n_experts)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recording_a_replayed_model_gives_back_the_trace(arch):
    lm = tiny_moe(arch, n_experts=8, top_k=2, n_layers=2)
    trace = random_trace(12, 2, 8, 2)
    ids = torch.arange(3, 15)[None]
    with replay_routing(lm, trace) as replay:
        recorded, = trace_forward(lm, ids)
    assert np.array_equal(recorded.experts, trace.experts) and replay.position == [12, 12]


def test_replay_through_generate_and_the_engine(tmp_path):
    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=3), tiny_tokenizer()
    trace = random_trace(40, 2, 8, 2, seed=1)  # 2 trace layers over 3 model layers: 0, 0, 1
    assert default_layer_map(3, 2) == [0, 0, 1] and default_layer_map(27, 6)[:6] == [0, 0, 0, 0, 0, 1]
    with replay_routing(lm, trace):
        recorded, = trace_generate(lm, tok, ["the cat"], max_new_tokens=5, do_sample=False)
    n = recorded.n_tokens
    assert np.array_equal(recorded.experts, trace.experts[:n][:, [0, 0, 1]])
    assert (recorded.phase == DECODE).sum() == 5
    # the offloading engine serves the replayed model token-identically to the replayed model in memory
    ids = tok(["the cat"], return_tensors="pt")["input_ids"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with replay_routing(lm, trace):
        expected = lm.generate(input_ids=ids, **kwargs)
    model = copy.deepcopy(lm)
    with replay_routing(model, trace):
        engine = OffloadEngine(model, tmp_path / "store.safetensors", 3, tier="page_cache")
        out, stats = engine.generate(ids, **kwargs)
    assert torch.equal(out, expected) and stats["decode_misses"] > 0


def test_concurrent_requests_replay_each_rows_own_segment():
    """A batch of long prompts replays each row's contiguous segment of the stream, in the order generate
    consumes tokens; recording the replayed batch gives back every row's segment."""
    lm = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2)
    stream = random_trace(30, 2, 8, 2, seed=2)
    rows, prompt, new = 2, 9, 4
    trace = concurrent_requests(stream, 25, rows, prompt, new)  # wraps at the stream's end
    with replay_routing(lm, trace), record_routing(lm) as recorder:
        lm.generate(input_ids=torch.arange(3, 3 + rows * prompt).reshape(rows, prompt), max_new_tokens=new,
                    do_sample=False, pad_token_id=0, eos_token_id=None)
    calls = recorder.calls()
    prefill = calls[0][0].reshape(rows, prompt, 2, 2)
    decode = np.stack([e.reshape(rows, 2, 2) for e, _ in calls[1:]], axis=1)  # (rows, new - 1, layers, k)
    for row in range(rows):
        segment = stream.experts[(25 + row * (prompt + new) + np.arange(prompt + new)) % 30]
        assert np.array_equal(prefill[row], segment[:prompt])
        assert np.array_equal(decode[row], segment[prompt:prompt + new - 1])
    assert (trace.phase == PREFILL).sum() == rows * prompt and (trace.phase == DECODE).sum() == rows * new
    with pytest.raises(ValueError, match="rows 0, prompt_tokens 9"):
        concurrent_requests(stream, 0, 0, 9, 4)


def test_replay_refuses_a_short_or_mismatched_trace():
    lm = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2)
    with pytest.raises(ValueError, match=r"the replayed trace has 4 tokens and is exhausted"):
        with replay_routing(lm, random_trace(4, 2, 8, 2)):
            trace_forward(lm, torch.arange(3, 9)[None])
    with replay_routing(lm, random_trace(4, 2, 8, 2), cycle=True) as replay:
        trace_forward(lm, torch.arange(3, 9)[None])
    assert replay.position == [6, 6]
    with pytest.raises(ValueError, match=r"routes top-3 of 8 experts; the model routes top-2 of 8"):
        with replay_routing(lm, random_trace(4, 2, 8, 3)):
            pass
    with pytest.raises(ValueError, match=r"layer_map must give one trace layer in \[0, 2\)"):
        with replay_routing(lm, random_trace(4, 2, 8, 2), layer_map=[0, 2]):
            pass


def test_read_one_csv():
    trace = read_trace(FIXTURE / "prompt_2_data.csv")
    assert trace.experts.shape == (5, 2, 3) and trace.n_experts == 12
    assert trace.phase.tolist() == [PREFILL] * 3 + [DECODE] * 2
    assert trace.token_ids.tolist() == [101, 102, 103, 104, 105]
    assert trace.experts[1].tolist() == [[3, 8, 9], [4, 5, 6]]  # layer ids 1, 2 -> 0, 1
    assert trace.experts[4].tolist() == [[9, 11, 3], [6, 4, 10]]


def test_token_text_that_is_not_an_id_reads_as_zero(tmp_path):
    """The released files name tokens by their text: BPE pieces, superscript digits, quoted commas, negatives."""
    rows = ['1,0,"¹","[1, 2]"', '1,0,Ġdo,"[2, 3]"', '1,0,",","[1, 3]"', '1,0,-4,"[0, 1]"', '1,0,17,"[0, 2]"']
    (tmp_path / "t.csv").write_text("Layer ID,Batch Number,Token,Activated Expert IDs\n" + "\n".join(rows) + "\n",
                                    encoding="utf-8")
    assert read_trace(tmp_path / "t.csv").token_ids.tolist() == [0, 0, 0, 0, 17]


def test_read_a_directory_in_numeric_order_and_our_npz(tmp_path):
    trace = read_trace(FIXTURE, n_experts=16)
    assert trace.n_experts == 16 and trace.meta["requests"] == [5, 3]  # prompt_2 before prompt_10
    assert trace.experts[5].tolist() == [[0, 1, 2], [1, 2, 3]]
    assert trace.experts[6].tolist() == [[0, 1, 5], [2, 3, 4]]  # rows of one batch interleaved by layer
    trace.save(tmp_path / "t.npz")
    again = read_trace(tmp_path / "t.npz")
    assert np.array_equal(again.experts, trace.experts) and again.meta == trace.meta


BAD = [
    ("missing.csv", None, r"no such trace file or directory"),
    ("t.json", "{}", r"unknown trace format '.json'; valid: .npz, .csv"),
    ("t.csv", "a,b\n1,2\n", r"expected columns Layer ID, Batch Number, Token, Activated Expert IDs"),
    ("t.csv", 'Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,5,"[1, 2]"\n1,1,6,"[1]"\n',
     r"every row must activate the same number of experts, got \[1, 2\]"),
    ("t.csv", 'Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,5,"[1, x]"\n',
     r"Activated Expert IDs a bracketed list of integers"),
    ("t.csv", 'Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,5,"[1, 2]"\n2,0,5,"[1, 2]"\n1,0,6,"[1, 3]"\n',
     r"batch 0 has 1 to 2 rows per layer"),
    ("t.csv", 'Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,5,"[1, -2]"\n', r"expert ids must be >= 0"),
    ("t.npz", "not a zip", r"not a readable routing trace .npz"),
]


@pytest.mark.parametrize("name, text, expected", BAD, ids=[m for _, _, m in BAD])
def test_bad_trace_files_give_one_line(name, text, expected, tmp_path):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=expected) as e:
        read_trace(path)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"expert id 11 is out of range for n_experts=8"):
        read_trace(FIXTURE / "prompt_2_data.csv", n_experts=8)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"no prompt_<n>_data.csv files"):
        read_trace(tmp_path / "empty_dir")
