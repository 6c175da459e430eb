"""Spike and energy metrics (``cbp.metrics``) against counts worked out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from spikingjelly.activation_based import functional, neuron
from torch import nn

from cbp import metrics
from cbp.metrics import SpikeProfiler, spike_counts


def two_layer_net() -> nn.Sequential:
    """Linear(4, 3) = the first 3 inputs, IF; Linear(3, 2) of ones, IF."""
    net = nn.Sequential(nn.Linear(4, 3, bias=False), neuron.IFNode(v_reset=0.0),
                        nn.Linear(3, 2, bias=False), neuron.IFNode(v_reset=0.0))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3, 4))  # holds only 0 and 1: still a weight, not spikes
        net[2].weight.fill_(1.0)
    return net


def test_two_layer_net_by_hand():
    net = two_layer_net()
    x = torch.tensor([[1.5, 0.2, 0.0, 0.7], [0.3, 2.0, 1.1, 0.0]])
    with SpikeProfiler(net) as prof:
        net(x)
    r = prof.report()
    # layer 1: analog input -> 2 samples x 4 inputs x 3 outputs = 24 MACs; potentials
    # [1.5, 0.2, 0] and [0.3, 2.0, 1.1] against threshold 1 -> spikes [1,0,0], [0,1,1]
    # layer 2: 3 input spikes x 2 synapses each = 6 SynOps; every output neuron fires
    assert r.samples == 2 and r.macs == 12 and r.synops == 3
    assert r.rates == {"1": 0.5, "3": 1.0}
    assert r.energy_uj == pytest.approx((3 * 0.9 + 12 * 4.6) * 1e-6)
    rates, ops = r.lines()
    assert rates == "firing rate (spikes/neuron/step): 1 0.5000, 3 1.0000"
    assert ops.startswith("SynOps/sample: 3  MACs/sample: 12  energy/sample: 5.79e-05 uJ")
    assert "E_AC 0.9 pJ, E_MAC 4.6 pJ" in ops


def test_multi_step_rates_are_per_neuron_per_step():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), neuron.IFNode(step_mode="m"))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.6, 0.0], [0.0, 2.0]]))
    functional.set_step_mode(net, "m")
    x = torch.ones(3, 1, 2)  # T = 3, one sample, input 1 at every step
    with SpikeProfiler(net, batch_dim=1) as prof:
        net(x)
    r = prof.report()
    # neuron 0 integrates 0.6 per step: 0.6, 1.2 -> spike (reset), 0.6 -> 1 spike;
    # neuron 1 gets 2.0 -> spikes at every step: 4 spikes in 6 neuron-steps
    assert r.samples == 1 and r.rates == {"1": pytest.approx(4 / 6)}
    assert r.synops == 3 * 2 * 2 and r.macs == 0  # 2 input spikes per step, 2 synapses each


def conv_net() -> nn.Conv2d:
    return nn.Conv2d(1, 2, 3, padding=1)


@pytest.mark.parametrize("where, reach", [((0, 0), 4), ((0, 1), 6), ((1, 1), 9)])
def test_conv_synops_follow_the_fan_out(where, reach):
    """A spike at a corner / edge / centre of a 3x3 map reaches 4 / 6 / 9 output positions of
    a padded 3x3 conv, in each of the 2 output channels."""
    s = torch.zeros(1, 1, 3, 3)
    s[(0, 0, *where)] = 1.0
    with SpikeProfiler(conv_net()) as prof:
        prof.model(s)
    assert prof.report().synops == 2 * reach and prof.report().macs == 0


def test_counts_amplitudes_and_analog_inputs():
    conv = conv_net()
    centre = torch.zeros(1, 1, 3, 3)
    centre[0, 0, 1, 1] = 1.0
    cases = [
        (3 * centre, 3 * 18, 0),  # three spikes (an event count, a SEW ADD sum)
        (0.37 * centre, 18, 0),  # a spike of amplitude theta (ANN-to-SNN conversion)
        (centre + 2 * torch.roll(centre, 1, 3), 18 + 2 * 12, 0),  # counts 1 and 2 (edge)
        # analog, 162 MACs: two values, or multiples of one value (time-averaged spikes)
        (0.5 * centre + 0.2 * torch.roll(centre, 1, 3), 0, 9 * 9 * 2),
        (0.25 * centre + 0.5 * torch.roll(centre, 1, 3), 0, 9 * 9 * 2),
    ]
    for x, synops, macs in cases:
        with SpikeProfiler(conv) as prof:
            conv(x)
        r = prof.report()
        assert (r.synops, r.macs) == (synops, macs), x


def test_batch_norm_is_not_counted():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)).eval()
    with SpikeProfiler(net) as prof:
        net(torch.rand(1, 1, 3, 3))
    assert prof.report().macs == 9 * 9 * 2  # the conv only


def test_spike_counts_edge_cases():
    assert torch.equal(spike_counts(torch.tensor([True, False])), torch.tensor([1.0, 0.0]))
    assert torch.equal(spike_counts(torch.tensor([0.0, 2.0, 5.0])), torch.tensor([0.0, 2.0, 5.0]))
    assert torch.equal(spike_counts(torch.tensor([0.0, 0.37, 0.37])),
                       torch.tensor([0.0, 1.0, 1.0]))  # one amplitude
    assert spike_counts(torch.tensor([0.0, 0.3, 0.9])) is None  # multiples: analog by default
    # with a stated amplitude: float noise of a decoded trace is within tolerance
    assert torch.equal(spike_counts(torch.tensor([1.1, 2.2000001, 0.0]), amplitude=1.1),
                       torch.tensor([1.0, 2.0, 0.0]))
    assert spike_counts(torch.tensor([1.1, 1.65]), amplitude=1.1) is None  # 1.5 spikes
    assert spike_counts(torch.tensor([-1.0, 1.0])) is None  # negative: not spikes
    assert spike_counts(torch.tensor([0.0, 0.0])) is not None  # silence is spikes
    assert spike_counts(torch.empty(0)) is None


def test_bit_planes_reassemble_counts():
    k = torch.tensor([0.0, 1.0, 2.0, 5.0, 12.0])
    planes = metrics._bit_planes(k)
    assert [w for w, _ in planes] == [1, 2, 4, 8]
    assert torch.equal(sum(w * p for w, p in planes), k)


def test_non_spiking_call_of_a_registered_module_is_skipped():
    """A neuron type whose output is analog in a call (ANN mode) adds no firing rate."""

    class Relu(nn.ReLU):
        pass

    net = nn.Sequential(nn.Identity(), Relu())
    with SpikeProfiler(net, neurons=[Relu]) as prof:
        net(torch.tensor([[0.3, 0.7]]))
    assert prof.report().rates == {}


def test_layer_rules_replace_the_dispatch_counts():
    """A registered layer is counted by its rule only (its own aten ops are skipped)."""
    lin = nn.Linear(3, 2)

    def rule(module, args, kwargs, out):
        return 7, 11

    with SpikeProfiler(lin, layers={nn.Linear: rule}) as prof:
        lin(torch.rand(4, 3))
    r = prof.report()
    assert (r.synops, r.macs) == (7 / 4, 11 / 4)


def test_linear_and_conv_helpers():
    spikes = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert metrics.linear_ops(spikes, torch.rand(5, 3)) == (3 * 5, 0)
    assert metrics.linear_ops(spikes * 0.3 + 0.1, torch.rand(5, 3)) == (0, 2 * 3 * 5)
    assert metrics.linear_ops(spikes * 2, torch.rand(5, 3)) == (2 * 3 * 5, 0)  # counts
    x = torch.zeros(1, 1, 3, 3, 2)  # (N, C, H, W, T), kernel (3, 3, 1): per time step
    x[0, 0, 0, 0, 1] = 1.0
    w = torch.rand(4, 1, 3, 3, 1)
    out = nn.functional.conv3d(x, w, padding=(1, 1, 0))
    assert metrics.conv_ops(x, w, (1, 1, 1), (1, 1, 0), (1, 1, 1), out=out) == (4 * 4, 0)


def _rank(rank: int, port: int, q) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    t = {"samples": 2.0 + rank, "synops": 10.0 * (rank + 1), "macs": 1.0,
         "spikes:a": 1.0, "slots:a": 4.0}
    if rank == 1:
        t.update({"spikes:b": 3.0, "slots:b": 3.0})  # a layer only rank 1 ran
    q.put((rank, metrics.reduce_totals(t)))
    dist.destroy_process_group()


def test_totals_are_summed_over_processes():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    want = {"samples": 5.0, "synops": 30.0, "macs": 2.0, "spikes:a": 2.0, "slots:a": 8.0,
            "spikes:b": 3.0, "slots:b": 3.0}
    assert got[0] == got[1] == want
    r = metrics.report_from_totals(want)
    assert r.synops == 6.0 and r.rates == {"a": 0.25, "b": 1.0}
