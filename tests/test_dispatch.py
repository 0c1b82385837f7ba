"""The router's padded path for small eager steps (RouterDispatcher layer_graphs, run eagerly on CPU), in a one-rank
gloo group: the router holds every expert, so each layer's answer is its own experts' and must equal ExpertPart's on
the real rows; padding rows must reach the experts routed nowhere, never with a previous step's routing. And the
engine's warm-up reaches every padded size."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cluster.dispatch import LAYER_GRAPH_MAX_TOKENS, PADDING_EXPERT, RouterDispatcher, layer_graph_tokens


class Recording:
    """An ExpertPart that records the expert ids of every call."""

    def __init__(self, experts):
        self.experts, self.ids = experts, []

    def forward(self, layer, x, ids, weights):
        self.ids.append(ids.clone())
        return self.experts.forward(layer, x, ids, weights)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_layer_graph_tokens_are_powers_of_two_up_to_the_limit():
    assert [layer_graph_tokens(n) for n in (1, 2, 3, 5, 96, 128, 129)] == [1, 2, 4, 8, 128, 128, 256]
    assert layer_graph_tokens(LAYER_GRAPH_MAX_TOKENS) == LAYER_GRAPH_MAX_TOKENS
    assert layer_graph_tokens(LAYER_GRAPH_MAX_TOKENS + 1) is None


def test_padded_steps_answer_the_real_rows_and_route_padding_nowhere(one_rank_group, reference_parts):
    _, experts = reference_parts
    cfg = experts.cfg
    local = Recording(experts)
    disp = RouterDispatcher("cpu", local=local, layer_graphs=True)
    gen = torch.Generator().manual_seed(0)
    for n in (7, 5, 300):  # 7 and 5 share the padded size 8: the second must not see the first's routing in rows 5-6
        h = torch.randn(n, cfg.hidden_size, generator=gen)
        ids = torch.stack([torch.randperm(cfg.num_local_experts, generator=gen)[:2] for _ in range(n)])
        weights = torch.rand(n, 2, generator=gen)
        disp.begin_step(n)
        assert disp.padded_tokens == layer_graph_tokens(n)
        for layer in range(cfg.num_hidden_layers):
            out = disp(layer, h, ids, weights)
            assert out.shape == (n, cfg.hidden_size)
            torch.testing.assert_close(out, experts.forward(layer, h, ids, weights), rtol=1e-5, atol=1e-5)
            seen = local.ids[-1]
            assert seen.shape[0] == disp.padded_tokens
            assert torch.equal(seen[:n], ids) and bool((seen[n:] == PADDING_EXPERT).all())
        disp.finish_step()
    assert sorted(disp.buffers) == [8, 512]


def test_without_layer_graphs_steps_are_not_padded(one_rank_group, reference_parts):
    _, experts = reference_parts
    local = Recording(experts)
    disp = RouterDispatcher("cpu", local=local)  # the default on CPU
    h = torch.randn(5, experts.cfg.hidden_size)
    ids, weights = torch.tensor([[0, 1]] * 5), torch.full((5, 2), 0.5)
    disp.begin_step(5)
    out = disp(0, h, ids, weights)
    assert disp.padded_tokens is None and local.ids[-1].shape[0] == 5 and not disp.buffers
    torch.testing.assert_close(out, experts.forward(0, h, ids, weights))


@pytest.mark.parametrize("full", [1, 3, 96, 1000, 16384])
def test_warmup_steps_reach_every_layer_graph_size(full):
    """Every padded size a step of at most `full` tokens can have is one the engine's warm-up runs (its sizes, then
    its full step), so no capture happens inside a user's step."""
    from cluster.engine.engine import warmup_step_tokens

    needed = {layer_graph_tokens(n) for n in range(1, full + 1)} - {None}
    assert needed <= {layer_graph_tokens(n) for n in warmup_step_tokens(full, layer_graphs=True) + [full]}
