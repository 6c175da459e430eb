"""SNN calibration: bias / membrane-potential correction and layer-wise weight calibration.

``light`` = thresholds by MSE search + ``bias_corr_model``;
``advanced`` = thresholds + ``weights_cali_model`` + ``bias_corr_model(correct_mempot=True)``.
Layers are calibrated one after another in input-to-output order, each seeing the already
calibrated earlier layers.
"""

from __future__ import annotations

import torch
from distributed_utils.dist_helper import allaverage, allreduce

from CIFAR.models.spiking_layer import SpikeModel, SpikeModule, lp_loss


def bias_corr_model(model: SpikeModel, train_loader, correct_mempot: bool = False,
                    dist_avg: bool = False, verbose: bool = True) -> None:
    """Correct every layer's bias (or initial membrane potential) on one training batch so the
    SNN's mean firing rate matches the ANN's mean activation.  Leaves the model in spike mode."""
    device = next(model.parameters()).device
    inputs, _ = next(iter(train_loader))
    inputs = inputs.to(device)
    for name, module in model.named_modules():
        if isinstance(module, SpikeModule):
            if verbose:
                what = "Potential" if correct_mempot else "Bias"
                print(f"\nEmpirical {what} Correction for layer {name}:")
            emp_bias_corr(model, module, inputs, correct_mempot, dist_avg, verbose)


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the channel axis, as ``x.mean(3).mean(2).mean(0)`` for (N, C, H, W)."""
    return x.mean(3).mean(2).mean(0) if x.dim() == 4 else x.mean(0)


def emp_bias_corr(model: SpikeModel, module: SpikeModule, train_data: torch.Tensor,
                  correct_mempot: bool = False, dist_avg: bool = False, verbose: bool = True
                  ) -> None:
    get_out = GetLayerInputOutput(model, module)
    model.set_spike_state(use_spike=False)
    org_out = get_out(train_data)[1]
    model.set_spike_state(use_spike=True)
    get_out.data_saver.reset()
    snn_out = get_out(train_data)[1] / model.T
    if not correct_mempot:
        # per-channel means reduced axis by axis (W, H, then batch), in the reference's order:
        # a one-call mean((0, 2, 3)) differs in the last bit, which can flip a spike in the
        # next layer and, through the layer-by-layer correction, the whole network
        delta = (channel_mean(snn_out) - channel_mean(org_out)).detach()
        if dist_avg:
            allaverage(delta)
        if module.bias is None:
            module.bias = -delta  # plain attribute (the pooling layers have no bias parameter)
        else:
            module.bias.data = module.bias.data - delta
        if verbose:
            print(float((-delta).mean()), float((-delta).var()) if delta.numel() > 1 else 0.0)
    else:
        pot = ((org_out.mean(0, keepdim=True) - snn_out.mean(0, keepdim=True)) * model.T).detach()
        if dist_avg:
            allaverage(pot)
        module.mem_pot_init = pot


class ActivationSaverHook:
    """Stores a layer's input and output, summed over the calls (over T steps in spike mode)."""

    def __init__(self) -> None:
        self.reset()

    def __call__(self, module, input_batch, output_batch) -> None:
        out, inp = output_batch.detach(), input_batch[0].detach()
        self.stored_output = out if self.stored_output is None else self.stored_output + out
        self.stored_input = inp if self.stored_input is None else self.stored_input + inp

    def reset(self) -> None:
        self.stored_output = None
        self.stored_input = None
        self.stored_residual = 0


class GetLayerInputOutput:
    """Run the whole model on a batch and return (input, output, residual) of one layer."""

    def __init__(self, model: SpikeModel, target_module: SpikeModule) -> None:
        self.model = model
        self.module = target_module
        self.data_saver = ActivationSaverHook()

    @torch.no_grad()
    def __call__(self, input: torch.Tensor):
        self.model.eval()
        h = self.module.register_forward_hook(self.data_saver)
        try:
            self.model(input)
        finally:
            h.remove()
        return (self.data_saver.stored_input, self.data_saver.stored_output,
                self.data_saver.stored_residual)


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """floor in the forward pass, identity in the backward pass."""
    return (x.floor() - x).detach() + x


def weights_cali_model(model: SpikeModel, train_loader, learning_rate: float = 4e-5,
                       optimize_iter: int = 5000, batch_size: int = 32,
                       num_cali_samples: int = 1024, dist_avg: bool = False,
                       verbose: bool = True) -> None:
    """Layer-wise weight calibration on ``num_cali_samples`` training images."""
    samples, n = [], 0
    for inputs, _ in train_loader:
        samples.append(inputs)
        n += inputs.shape[0]
        if n >= num_cali_samples:
            break
    data = torch.cat(samples)[:num_cali_samples]
    for name, module in model.named_modules():
        if isinstance(module, SpikeModule):
            if verbose:
                print(f"\nEmpirical Weights Calibration for layer {name}:")
            weights_cali_layer(model, module, data, learning_rate, optimize_iter, batch_size,
                               dist_avg=dist_avg, verbose=verbose)


def weights_cali_layer(model: SpikeModel, module: SpikeModule, data_sample: torch.Tensor,
                       learning_rate: float = 1e-5, optimize_iter: int = 10000,
                       batch_size: int = 32, num_cali_samples: int | None = None,
                       keep_gpu: bool = True, loss_func=lp_loss, dist_avg: bool = False,
                       verbose: bool = True) -> list[float]:
    """Fit ``module.weight`` so that floor_STE(clamp(conv(r_in)/theta*T, 0, T))*theta/T (r_in =
    the layer's mean spike input) matches the ANN output; returns the loss per iteration."""
    get_out = GetLayerInputOutput(model, module)
    device = module.weight.device
    data_sample = data_sample.to(device)
    batch_size = min(batch_size, data_sample.size(0))
    inps, outs = [], []
    for i in range(data_sample.size(0) // batch_size):
        chunk = data_sample[i * batch_size:(i + 1) * batch_size]
        model.set_spike_state(use_spike=False)
        _, cur_out, _ = get_out(chunk)
        get_out.data_saver.reset()
        model.set_spike_state(use_spike=True)
        cur_inp, _, _ = get_out(chunk)
        get_out.data_saver.reset()
        inps.append(cur_inp.cpu())
        outs.append(cur_out.cpu())
    cached_inps = torch.cat(inps) / model.T
    cached_outs = torch.cat(outs)
    del inps, outs
    if keep_gpu:
        cached_inps, cached_outs = cached_inps.to(device), cached_outs.to(device)
    n = cached_inps.size(0)

    optimizer = torch.optim.SGD([module.weight], lr=learning_rate, weight_decay=0, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=optimize_iter,
                                                           eta_min=0.0)
    model.set_spike_state(use_spike=True)
    theta, T = module.threshold, model.T
    losses = []
    for i in range(optimize_iter):
        idx = torch.randperm(n)[:batch_size]
        cur_inp, cur_out = cached_inps[idx].to(device), cached_outs[idx].to(device)
        optimizer.zero_grad()
        out = module.fwd_func(cur_inp, module.weight, module.bias, **module.fwd_kwargs)
        out = floor_ste(torch.clamp(out / theta * T, min=0, max=T)) * theta / T
        err = loss_func(out, cur_out)
        err.backward()
        if dist_avg:
            allreduce(module.weight.grad)
        optimizer.step()
        scheduler.step()
        losses.append(float(err.detach()))
        if verbose and i % 300 == 0:
            print(f"Iteration {i}\tLoss: {err.item()},")
    module.weight.grad = None
    return losses
