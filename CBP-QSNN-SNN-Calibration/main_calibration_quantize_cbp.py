"""Convert the pretrained VGG ANN to an SNN (threshold search + calibration), then quantize the
SNN with constrained backpropagation (CBP), training it directly with BPTT over T steps.

Examples (working directory = CBP-QSNN-SNN-Calibration/):
    python main_calibration_quantize_cbp.py --dataset CIFAR10 --arch VGG16 --T 32 --calib light --dpath ./datasets --device cuda:0 --opt SGD --quant bin --lr 1e-2 --lr_lambda 1e-3
    python main_calibration_quantize_cbp.py --dataset CIFAR100 --arch VGG16 --T 32 --calib light --dpath ./datasets --device cuda:0 --opt SGD --quant ter --lr 1e-2 --lr_lambda 1e-3
    python main_calibration_quantize_cbp.py --dataset DIGITS --dpath . --device cpu --width 0.125 --usebn --T 16 --calib light --quant bin --opt Adam --lr 1e-3 --lr_lambda 1e-3 -epochs 10 --trials 1 --seed 0

Reads ./trained_params/ANN_<arch>_<wBN|woBN>_<DATASET>[_w<width>]_ckpt.pth.  Per trial i writes
./logs/<arch>_<DS>_T<T>_<i>_<calib>_ckpt.pth (calibrated SNN), the CBP checkpoints
./logs/<stem>_<i>_ckpt.pth (best), _<i>_<epoch>.pth (snapshots), _<i>_last.pth (resume),
_<i>_packed.pth (packed low-bit export), and ./progress/<arch>_<DS>_T_<T>_..._progress_<i>.txt.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import calib_engine as E
import torch
import torch.nn.functional as F

from cbp import CBP, MODES, clip_gradients, param_groups
from cbp import distributed as D
from cbp.checkpoint import check_finite, extract_state_dict, load_file
from cbp.export import pack_model, weight_memory_mbit
from cbp.run import Run
from cbp.runtime import (
    Scalars,
    UserError,
    progress,
    run_main,
    select_device,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    E.add_common_args(p)
    p.add_argument("--calib", default="none", type=str, help="calibration methods",
                   choices=["none", "light", "advanced"])
    p.add_argument("--T", default=32, type=E.positive_int, help="snn simulation length")
    p.add_argument("--reset_pool", action="store_true",
                   help="set the pooling kernels to exactly 1/4 before conversion (default: "
                        "convert them as loaded, as the reference does)")
    p.add_argument("-epochs", "--epochs", dest="epochs", default=100, type=E.nonneg_int,
                   metavar="N", help="number of total epochs to run")
    p.add_argument("--opt", type=str, default="SGD", choices=["SGD", "Adam"],
                   help="use which optimizer. SGD or Adam")
    p.add_argument("--lr", default=1e-4, type=E.positive_float, help="learning rate")
    p.add_argument("--momentum", default=0.9, type=float, help="momentum for SGD")
    p.add_argument("--wd", default=None, type=float,
                   help="weight decay (default: 1e-4 without BN, 5e-4 with BN)")
    p.add_argument("--lr_lambda", default=1e-5, type=E.positive_float,
                   help="learning rate for lambda update")
    p.add_argument("--quant", default="bin", type=str, choices=list(MODES), help="quantization")
    p.add_argument("--period", type=E.positive_int, default=20,
                   help="max period of lambda update")
    # additions
    p.add_argument("--trials", type=E.positive_int, default=3,
                   help="number of trials (seeds seed, seed+1, ...)")
    p.add_argument("--wc_iters", type=E.positive_int, default=5000,
                   help="advanced calibration: weight-calibration iterations per layer")
    p.add_argument("--wc_samples", type=E.positive_int, default=1024,
                   help="advanced calibration: number of calibration images")
    p.add_argument("--wc_lr", type=E.positive_float, default=1e-5,
                   help="advanced calibration: weight-calibration learning rate")
    p.add_argument("--evaluate", type=str, default=None, metavar="CKPT",
                   help="only evaluate a CBP checkpoint (e.g. a ..._ckpt.pth written here)")
    args = p.parse_args(argv)
    if args.wd is None:
        args.wd = 5e-4 if args.usebn else 1e-4
    if args.wd < 0:
        p.error(f"--wd must be >= 0, got {args.wd}")
    return args


def names(args, trial: int) -> dict[str, str]:
    w = E.width_tag(args.width)
    base = f"{args.arch}_{args.dataset}{w}_T{args.T}"
    stem = (f"./logs/{base}_{args.opt}_lr{args.lr}lr_lambda{args.lr_lambda}wd{args.wd}_"
            f"{args.quant}_{trial}")
    return {
        "calib": f"logs/{base}_{trial}_{args.calib}_ckpt.pth",
        "stem": stem,
        "best": f"{stem}_ckpt.pth",
        "last": f"{stem}_last.pth",
        "packed": f"{stem}_packed.pth",
        "progress": (f"./progress/{args.arch}_{args.dataset}{w}_T_{args.T}_lr_{args.lr}_lrlambda_"
                     f"{args.lr_lambda}_wd_{args.wd}_period_{args.period}_{args.quant}"
                     f"_progress_{trial}.txt"),
        "run": f"{base}_{args.quant}_{args.calib}_{trial}",
    }




def build_optimizer(snn_q, args) -> torch.optim.Optimizer:
    g = param_groups(snn_q)  # pooling kernels and BN slots are frozen, hence in no group
    if args.opt == "SGD":
        return torch.optim.SGD([{"params": g["qweight"], "lr": args.lr, "weight_decay": args.wd},
                                {"params": g["nqweight"], "lr": args.lr, "weight_decay": args.wd},
                                {"params": g["otherparam"], "lr": args.lr}],
                               momentum=args.momentum)
    return torch.optim.Adam([{"params": g[k], "lr": args.lr}
                             for k in ("qweight", "nqweight", "otherparam")])


def convert_trial(args, trial, train_loader, test_loader, device, show) -> dict:
    """ANN -> calibrated SNN; returns the calibration checkpoint (written with the first
    finished CBP epoch, so a run that fails before leaves the earlier file alone)."""
    path = E.require_ann(args)
    ann = E.load_ann(args, path)
    snn, ann_acc, snn_acc = E.convert(args, ann, train_loader, test_loader, device, show)
    ckpt = {
        "net_snn": snn.state_dict(),
        "threshold_dict": {n: float(m.threshold) for n, m in snn.spike_modules()},
        "mem_pot_init_dict": E.mem_pot_dict(snn),
        "pool_bias_dict": E.pool_bias_dict(snn),
        "snn_test_acc": snn_acc,
        "ann_test_acc": ann_acc,
    }
    print(f"{trial} trial: DNN-to-SNN conversion end!! (ANN {ann_acc:.3f}%, SNN {snn_acc:.3f}%)")
    return ckpt


def snapshot_epochs(epochs: int) -> list[int]:
    return [e for e in range(epochs) if e == 0 or (e + 1) % 5 == 0]


def cbp_trial(args, trial, train_loader, test_loader, device, show) -> None:
    f = names(args, trial)
    outputs = [f["calib"], f["best"], f["last"], f["packed"], f["progress"],
               *(f"{f['stem']}_{e}.pth" for e in snapshot_epochs(args.epochs))]
    identity = {"pipeline": "SNN-Calibration", "script": "cbp", "dataset": args.dataset,
                "arch": args.arch, "usebn": bool(args.usebn), "width": float(args.width),
                "T": int(args.T), "calib": args.calib, "quant": args.quant}
    with Run(identity, outputs, lr_flag="--lr") as run:
        resume_state = None
        if args.resume:
            path = f["last"] if args.resume == "auto" else args.resume
            if args.resume != "auto" or os.path.isfile(path):
                with D.collective():
                    resume_state = run.resume(path, last_hint=f"resume from {f['last']}")
                if int(resume_state["epoch"]) + 1 >= args.epochs:
                    print(f"trial {trial} already finished ({path})")
                    return
        if resume_state is None:
            E.seed_all(args.seed + trial)
            with D.collective():
                calib_ckpt = convert_trial(args, trial, train_loader, test_loader, device, show)
            pending = {f["calib"]: calib_ckpt}
            snn_q = E.load_calibrated_snn_q(args, calib_ckpt, device)
            D.broadcast_(list(snn_q.state_dict().values()))  # every rank starts from rank 0's
            extras = {"pool_bias_dict": calib_ckpt.get("pool_bias_dict", {}),
                      "mem_pot_init_dict": calib_ckpt.get("mem_pot_init_dict", {})}
        else:
            pending = {}
            extras = {"pool_bias_dict": resume_state.get("pool_bias_dict", {}),
                      "mem_pot_init_dict": resume_state.get("mem_pot_init_dict", {})}
            snn_q = E.load_calibrated_snn_q(args, {"net_snn": {}, **extras}, device)
            state = extract_state_dict(resume_state)
            with D.collective():
                check_finite(state, f["last"])
                snn_q.load_state_dict(state)
        train_part, test_part = D.split_loaders(train_loader, test_loader, args.seed + trial)
        _train(args, trial, snn_q, extras, train_part, test_part, device, show, run,
               resume_state, f, pending)


def _train(args, trial, snn_q, extras, train_loader, test_loader, device, show, run: Run,
           resume_state, f, pending: dict) -> None:
    """CBP epochs; ``pending`` files (the calibration checkpoint) are written with the first
    finished epoch."""
    optimizer = build_optimizer(snn_q, args)
    cbp = CBP(snn_q, args.lr_lambda, period_max=args.period, init_scales=resume_state is None)
    rows: list[list[float]] = [[0.0] * 7]
    max_test_acc, start_epoch = 0.0, 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer1"])
        cbp.load_checkpoint_entries(resume_state)
        rows = resume_state["progress"].tolist()
        max_test_acc = float(resume_state["max_test_acc"])
        start_epoch = int(resume_state["epoch"]) + 1
        run.restore_rng(resume_state["rng"])
        print(f"resumed trial {trial} at epoch {start_epoch}")
    else:
        cbp.start()  # initial lambda update with ucs = 0
    print(f"Start Quantization ({args.quant}, {cbp.param_size} quantized weights)")

    tb = Scalars((f"./runs/{f['run']}" if args.logdir is None else
                  (os.path.join(args.logdir, f"trial{trial}") if args.logdir else ""))
                 if run.main else None)
    snapshots = set(snapshot_epochs(args.epochs))
    net = D.ddp(snn_q)
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        D.set_epoch(train_loader, epoch)
        snn_q.train()
        train_loss, train_correct, n = 0.0, 0, 0
        for idx, (images, labels) in enumerate(progress(train_loader, f"epoch {epoch}",
                                                        enabled=show)):
            optimizer.zero_grad()
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss = F.cross_entropy(outputs, labels)
            lag = cbp.lagrangian(loss)
            run.check_loss(lag, epoch, idx)
            lag.backward()
            clip_gradients(snn_q.parameters(), 1.0)
            optimizer.step()
            cbp.clamp_()
            n += labels.numel()
            train_loss += loss.item() * labels.numel()
            train_correct += int((outputs.argmax(1) == labels).sum())
            if idx % 50 == 0:
                print(f"samples/acc = {n}/{train_correct}")
        train_loss /= max(n, 1)
        train_acc = train_correct / max(n, 1)
        decision = cbp.end_epoch(optimizer)
        run.check_epoch(snn_q, epoch, decision.lagsum)
        print(f"epoch={epoch}...lagsum_pre={decision.compared_to}...lagsum={decision.lagsum}")
        if decision.updated:
            print(f"Lambda update.... (g={cbp.g}, ucs={cbp.ucs:.4f}"
                  + (", lr x0.1" if decision.lr_decayed else "") + ")")

        test_loss, test_acc = E.evaluate_ce(snn_q, test_loader, device, show)
        cfs = cbp.cfs()
        rows.append([epoch, train_acc, test_acc, train_loss, test_loss, cfs, cbp.lagsum_pre])
        for tag, value in (("loss/train", train_loss), ("accuracy/train", train_acc),
                           ("loss/test", test_loss), ("accuracy/test", test_acc), ("cfs", cfs),
                           ("lagsum", decision.lagsum), ("g", cbp.g), ("ucs", cbp.ucs),
                           ("lambda/mean", cbp.lambda_mean()),
                           ("lr", optimizer.param_groups[0]["lr"])):
            tb.add(tag, value, epoch)

        save_max = test_acc > max_test_acc
        if save_max:
            max_test_acc = test_acc
            print("save_max")
        checkpoint = run.checkpoint({
            "net": snn_q.state_dict(),
            "factor": [list(m.factor) for _, m in _qmods(snn_q)],
            "scale": [t.scale.detach().clone() for t in cbp.targets],
            "optimizer1": optimizer.state_dict(),
            **cbp.checkpoint_entries(),
            "epoch": epoch,
            "progress": torch.tensor(rows, dtype=torch.float64),
            "args": {k: v for k, v in vars(args).items()},
            "max_test_acc": max_test_acc,
            **extras,
        })
        rng = run.rng_state()  # every rank's (a collective: outside the writes)
        with run.writes():
            while pending:
                path, obj = pending.popitem()
                run.save(obj, path)
            run.write_table(f["progress"], rows)
            if save_max:
                run.save(checkpoint, f["best"])
                run.save(pack_model(snn_q), f["packed"])
            if epoch in snapshots:
                run.save(checkpoint, f"{f['stem']}_{epoch}.pth")
            # the training state last: a run killed before it redoes this epoch on resume
            run.save({**checkpoint, "rng": rng}, f["last"])
        total_time = time.time() - start
        eta = datetime.datetime.now() + datetime.timedelta(seconds=total_time * (args.epochs - epoch))
        print(f"epoch={epoch}, train_loss={train_loss}, train_acc={train_acc}, "
              f"test_loss={test_loss}, test_acc={test_acc}, max_test_acc={max_test_acc}, "
              f"cfs={cfs}, total_time={total_time}, "
              f"escape_time={eta.strftime('%Y-%m-%d %H:%M:%S')}")
    with run.writes():
        for path, obj in pending.items():  # no epoch to run: the conversion alone
            run.save(obj, path)
    tb.close()
    run.finish(snn_q, cbp)
    print(f"trial {trial}: max_test_acc={max_test_acc}, weight memory "
          f"{weight_memory_mbit(snn_q):.4f} Mbit")


def evaluate(args, device, show) -> None:
    """Test accuracy, CFS and weight memory of a saved CBP checkpoint."""
    from cbp import cfs as model_cfs
    from cbp.checkpoint import load_into
    from cbp.metrics import profiled

    if not os.path.isfile(args.evaluate):
        raise UserError(f"checkpoint {args.evaluate} not found")
    state = load_file(args.evaluate)
    extras = {k: state.get(k, {}) if isinstance(state, dict) else {}
              for k in ("pool_bias_dict", "mem_pot_init_dict")}
    snn_q = E.load_calibrated_snn_q(args, {"net_snn": {}, **extras}, device)
    load_into(snn_q, state, nonfinite="warn")
    _, test_loader = E.loaders(args, device)
    # spike metrics: the IF layers emit spikes of amplitude theta (see cbp.metrics)
    (test_loss, test_acc), _ = profiled(
        snn_q, lambda: E.evaluate_ce(snn_q, test_loader, device, show),
        neurons=snn_q.spike_types)
    print(f"test_loss={test_loss}, test_acc={test_acc}")
    print(f"CFS: {model_cfs(snn_q):.6g}  weight memory: {weight_memory_mbit(snn_q):.4f} Mbit")


def _qmods(model):
    from cbp import quantized_modules

    return quantized_modules(model)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = D.start(lambda: select_device(args.device), args.device)
    print(args)
    show = not args.no_progress
    if args.evaluate:
        evaluate(args, device, show)
        return
    os.makedirs("./logs", exist_ok=True)
    os.makedirs("./progress", exist_ok=True)
    if args.resume not in (None, "auto") and args.trials != 1:
        raise UserError("--resume PATH resumes one trial: add --trials 1 (or give --resume "
                        "alone to continue every trial from its _last.pth)")
    have_last = [os.path.isfile(names(args, i)["last"]) for i in range(args.trials)]
    if args.resume == "auto" and not any(have_last):
        raise UserError(f"cannot resume: {names(args, 0)['last']} not found "
                        "(run without --resume first)")
    if not (args.resume == "auto" and all(have_last)) and args.resume in (None, "auto"):
        E.require_ann(args)  # a trial still has to be converted from the ANN
    with D.collective():
        train_loader, test_loader = E.loaders(args, device)
    for trial in range(args.trials):
        cbp_trial(args, trial, train_loader, test_loader, device, show)


if __name__ == "__main__":
    run_main(main)
